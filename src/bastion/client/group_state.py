"""Group chats on the client: the verified membership chain, room keys, sending and receiving.

The group's state is never taken from the server: this client replays the
signed chain (:mod:`bastion.groups.chain`) against its pinned account keys and
shows every change as a :class:`GroupChangeEvent`. Room keys go only to devices
whose certificates verify under the key that the verified state names for the
member; when the server's idea of the member list differs, the user gets a
:class:`GroupWarningEvent` and nothing is shared with the difference.

This module keeps the chain (sync, ingest, create and change, forks settled by
the removal rule); :mod:`bastion.client.group_messages`, built on it, sends and
receives messages and room keys; :mod:`bastion.client.groups` shows both as one API.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from bastion.client import group_heads, group_keys
from bastion.client._util import GROUP_PREFIX, group_conversation, now_ms
from bastion.client.events import Event, FeatureEvent
from bastion.client.feature import ClientCore
from bastion.client.records import ContactRecord
from bastion.errors import (
    AuthenticationError,
    KeyChangedError,
    ProtocolError,
    RejectedMessageError,
    StateError,
)
from bastion.groups import chain
from bastion.protocol import frames

INDEX = "groups:index"
UNKNOWN_KEYS = "groups:unknown-keys"
MAX_INBOUND_PER_DEVICE = 20
MAX_UNKNOWN_GROUP_KEYS = 32  # room-key records held for groups this device does not know
MAX_UNKNOWN_GROUP_KEYS_PER_SENDER = 4
MAX_SYNC_PAGES = 10_000  # fetches per sync; each must bring a change or the sync stops


class GroupRecord(msgspec.Struct, kw_only=True):
    """A group's verified chain as this client applied it."""

    group_id: bytes
    changes: list[bytes]


class InboundSessions(msgspec.Struct, kw_only=True):
    """The room keys one sender device shared for one group, newest last."""

    sessions: list[group_keys.InboundSession]


@dataclass(frozen=True, slots=True)
class GroupChangeEvent(FeatureEvent):
    """A verified change to a group's name, members or admins."""

    group_id: str
    name: str
    seq: int
    author: str
    change: str
    user: str | None
    at: int

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form."""
        return {
            "type": "group_change",
            "group": self.group_id,
            "conversation": GROUP_PREFIX + self.group_id,
            "name": self.name,
            "seq": self.seq,
            "by": self.author,
            "change": self.change,
            "user": self.user,
        }

    def describe(self) -> str:
        """One sentence."""
        what = {
            "create": "created the group",
            "add_member": f"added {self.user}",
            "remove_member": f"removed {self.user}",
            "leave": "left",
            "promote": f"made {self.user} an admin",
            "demote": f"made {self.user} a plain member",
            "rename": f"renamed the group to {self.name!r}",
        }.get(self.change, self.change)
        return f"[{self.name}] {self.author} {what}"


@dataclass(frozen=True, slots=True)
class GroupWarningEvent(FeatureEvent):
    """Something about a group failed a check (a forged change, a ghost member...)."""

    group_id: str
    reason: str
    at: int

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form."""
        return {"type": "group_warning", "group": self.group_id, "reason": self.reason}

    def describe(self) -> str:
        """One sentence."""
        return f"warning about group {self.group_id[:12]}: {self.reason}"


# --- local state ------------------------------------------------------------------------------


def _record_name(group_id: bytes) -> str:
    return group_conversation(group_id)  # the record of a group is filed under its conversation


def conversation(group_id: bytes) -> str:
    """The history conversation of a group: ``group:<hex id>``."""
    return group_conversation(group_id)


def _verified(client: ClientCore, group_id: bytes) -> tuple[chain.GroupState, list[bytes]] | None:
    """The verified state of a group and the state hash at every position (cached)."""
    record = client.profile.get(_record_name(group_id), GroupRecord)
    if record is None or not record.changes:
        return None
    cache = client.extensions.get("groups")
    if not isinstance(cache, dict):
        cache = client.extensions["groups"] = {}
    cached = cache.get(group_id)
    if cached is not None and cached[0] == len(record.changes):
        found: tuple[chain.GroupState, list[bytes]] = cached[1]
        return found
    changes = [chain.decode_change(raw) for raw in record.changes]
    first = chain.apply_change(None, changes[0])
    states = [first, *chain.verify_branch(first, changes[1:])]
    found = (states[-1], [s.state_hash for s in states])
    cache[group_id] = (len(record.changes), found)
    return found


def state_of(client: ClientCore, group_id: bytes) -> chain.GroupState | None:
    """The verified state of a group this client knows (None if unknown)."""
    verified = _verified(client, group_id)
    return None if verified is None else verified[0]


def change_log(client: ClientCore, group_id: bytes) -> list[GroupChangeEvent]:
    """Every signed change of a group's verified chain, oldest first (empty if unknown).

    Only a chain that verified end to end is stored, so each entry here was
    signed by a member allowed to make it when it was made.
    """
    record = client.profile.get(_record_name(group_id), GroupRecord)
    if record is None or not record.changes:
        return []
    changes = [chain.decode_change(raw) for raw in record.changes]
    state = chain.apply_change(None, changes[0])
    out = [_event(state, changes[0])]
    for change, after in zip(changes[1:], chain.verify_branch(state, changes[1:]), strict=True):
        out.append(_event(after, change))
    return out


def chain_hashes(client: ClientCore, group_id: bytes) -> list[bytes]:
    """The verified state hash at each chain position (empty for an unknown group)."""
    verified = _verified(client, group_id)
    return [] if verified is None else verified[1]


def groups(client: ClientCore) -> list[chain.GroupState]:
    """Every group this client knows, by name."""
    ids = client.profile.get(INDEX, list[str]) or []
    found = [state_of(client, bytes.fromhex(i)) for i in ids]
    return sorted((s for s in found if s is not None), key=lambda s: (s.name, s.group_id))


def resolve(client: ClientCore, ref: str) -> chain.GroupState:
    """A group by hex id (or a unique prefix of 8+ digits) or unambiguous name.

    Raises :class:`StateError` when none or several match.
    """
    known = groups(client)
    by_id = [s for s in known if len(ref) >= 8 and s.group_id.hex().startswith(ref.lower())]
    matches = by_id or [s for s in known if s.name == ref]
    if not matches:
        raise StateError(f"no group called {ref!r}")
    if len(matches) > 1:
        raise StateError(f"several groups are called {ref!r}; use the group id")
    return matches[0]


def _save(client: ClientCore, group_id: bytes, changes: list[bytes]) -> None:
    client.profile.put(_record_name(group_id), GroupRecord(group_id=group_id, changes=changes))
    cache = client.extensions.get("groups")
    if isinstance(cache, dict):
        cache.pop(group_id, None)  # a settled fork may keep the length and change the content
    ids = client.profile.get(INDEX, list[str]) or []
    if group_id.hex() not in ids:
        client.profile.put(INDEX, [*ids, group_id.hex()])


def _pins(client: ClientCore, users: Iterable[str]) -> dict[str, bytes]:
    pins = {}
    for user in users:
        contact = client.contact(user)
        if contact is not None:
            pins[user] = contact.identity_key
    return pins


def _named(change: chain.GroupChange) -> list[str]:
    args = change.args
    if isinstance(args, chain.CreateGroup):
        return [change.author, *(m.user for m in args.members)]
    if isinstance(args, chain.AddMember):
        return [args.user]
    return []


def _event(state: chain.GroupState, change: chain.GroupChange) -> GroupChangeEvent:
    return GroupChangeEvent(
        group_id=state.group_id.hex(),
        name=state.name,
        seq=change.seq,
        author=change.author,
        change=change.kind,
        user=getattr(change.args, "user", None),
        at=change.timestamp_ms,
    )


def ingest(client: ClientCore, group_id: bytes, raw_changes: Iterable[bytes]) -> list[Event]:
    """Check changes received for a group against its verified state and apply them.

    Returns an event per applied change; the first change that fails a check
    (forged, replayed, reordered, from another group, a member's key changed)
    becomes a :class:`GroupWarningEvent` and nothing after it is applied.
    """
    record = client.profile.get(_record_name(group_id), GroupRecord)
    changes = list(record.changes) if record is not None else []
    state = state_of(client, group_id)
    events: list[Event] = []
    applied = False
    for raw in raw_changes:
        try:
            change = chain.decode_change(raw)
            if not hmac.compare_digest(change.group_id, group_id):
                raise chain.GroupSequenceError("change belongs to another group")
            state = chain.apply_change(state, change, pinned=_pins(client, _named(change)))
        except (ProtocolError, AuthenticationError, KeyChangedError) as exc:
            events.append(_warning(group_id, f"membership change rejected: {exc}"))
            break
        changes.append(raw)
        applied = True
        events.append(_event(state, change))
    if applied and state is not None:
        with client.profile.transaction():
            _save(client, group_id, changes)
            _pin_members(client, state)
            _forget_unknown_keys(client, group_id)
    return events


def _pin_members(client: ClientCore, state: chain.GroupState) -> None:
    """Pin, trust on first use, the account key the verified chain names for a member.

    The pin has the contacts' states (unverified, verified, changed): a key
    directory that later shows another key for the member marks it changed.
    """
    for user, key in state.members.items():
        if client.contact(user) is None:
            client.profile.put("contact:" + user, ContactRecord(user=user, identity_key=key))


def _warning(group_id: bytes, reason: str) -> GroupWarningEvent:
    return GroupWarningEvent(group_id=group_id.hex(), reason=reason[:300], at=now_ms())


def _compare_members(
    group_id: bytes, state: chain.GroupState, server_members: list[str], invited: list[str]
) -> list[Event]:
    """Warnings where the server's delivery list differs from the verified members.

    Members who have not joined (``invited``: an invitation not accepted) are
    expected to get nothing.
    """
    ghosts = sorted(set(server_members) - set(state.members))
    missing = sorted(set(state.members) - set(server_members) - set(invited))
    events: list[Event] = []
    if ghosts:
        events.append(
            _warning(
                group_id,
                "the server delivers to " + ", ".join(ghosts) + ", whom no signed change added;"
                " they get no keys",
            )
        )
    if missing:
        events.append(
            _warning(group_id, "the server does not deliver to members " + ", ".join(missing))
        )
    return events


# --- talking to the server --------------------------------------------------------------------


async def _fetch(client: ClientCore, group_id: bytes, after_seq: int) -> frames.GroupChain:
    reply = await client.request(frames.GroupFetch(req=0, group_id=group_id, after_seq=after_seq))
    if not isinstance(reply, frames.GroupChain) or reply.group_id != group_id:
        raise RejectedMessageError("the server answered a group fetch for another group")
    return reply


async def sync(
    client: ClientCore, group_id: bytes, *, max_pages: int = MAX_SYNC_PAGES
) -> list[Event]:
    """Fetch the changes this client lacks, check and apply them; events for each.

    Stops at the first rejected change, and when the server says ``more`` but
    a page brings no new change (or after ``max_pages`` pages); either way the
    group's status records why, and sending to it stops until a later sync
    verifies the chain to the head (:func:`group_heads.send_blocker`).
    """
    events: list[Event] = []
    stopped: str | None = None
    for _page in range(max_pages):
        state = state_of(client, group_id)
        reply = await _fetch(client, group_id, -1 if state is None else state.seq)
        applied = ingest(client, group_id, reply.changes)
        events += applied
        rejected = [e for e in applied if isinstance(e, GroupWarningEvent)]
        if rejected:
            stopped = rejected[0].reason
            break
        if not reply.more:
            break
        if not reply.changes:
            stopped = "the server says the chain goes on but sends no further change"
            events.append(_warning(group_id, stopped))
            break
    else:
        stopped = f"the chain did not end after {max_pages} pages"
        events.append(_warning(group_id, stopped))
    status = group_heads.status_of(client, group_id)
    if status.rejected != stopped:
        status.rejected = stopped
        group_heads.save_status(client, group_id, status)
    state = state_of(client, group_id)
    if state is not None and client.account.username in state.members:
        events += _compare_members(group_id, state, reply.members, reply.invited)
    return events


async def _post(client: ClientCore, change: chain.GroupChange) -> None:
    await client.request(frames.GroupPost(req=0, change=chain.encode_change(change)))
    ingested = ingest(client, change.group_id, [chain.encode_change(change)])
    warnings = [e for e in ingested if isinstance(e, GroupWarningEvent)]
    if warnings:
        raise StateError(warnings[0].reason)


async def _key_of(client: ClientCore, user: str) -> bytes:
    """The account key to name for ``user``: pinned (first sight pins the server's)."""
    await client.devices_of(user)
    contact = client.contact(user)
    if contact is None:
        raise StateError(f"no account key known for {user}")
    if contact.trust == "changed":
        raise KeyChangedError(user)
    return contact.identity_key


async def create(
    client: ClientCore, name: str, members: Iterable[str], *, now: float | None = None
) -> chain.GroupState:
    """Create a group with ``members``; returns its verified first state.

    Raises ValueError for a bad name, KeyChangedError, ServerRefusedError.
    """
    if not name or len(name) > chain.MAX_GROUP_NAME_CHARS:
        raise ValueError("a group name has 1 to 256 characters")
    me = client.account.username
    keys = {user: await _key_of(client, user) for user in sorted(set(members) - {me})}
    change = chain.create_group(client.identity(), me, name, keys, now=_seconds(now))
    await _post(client, change)
    state = state_of(client, change.group_id)
    if state is None:
        raise StateError("the new group could not be stored")
    return state


async def change(
    client: ClientCore,
    group: chain.GroupState,
    args: chain.MemberChange,
    *,
    now: float | None = None,
) -> chain.GroupState:
    """Sign and post one change to ``group`` (after catching up with its chain).

    Raises StateError if the change breaks a rule, ServerRefusedError.
    """
    await sync(client, group.group_id)
    state = state_of(client, group.group_id) or group
    signed = chain.make_change(
        client.identity(), state, client.account.username, args, now=_seconds(now)
    )
    try:
        chain.apply_change(state, signed)
    except (ProtocolError, AuthenticationError) as exc:
        raise StateError(str(exc)) from None
    await _post(client, signed)
    return state_of(client, group.group_id) or state


async def add_member(client: ClientCore, group: chain.GroupState, user: str) -> chain.GroupState:
    """Add ``user`` (with the account key this client pins for them)."""
    return await change(client, group, chain.AddMember(user=user, key=await _key_of(client, user)))


def _seconds(now: float | None) -> float:
    return now_ms() / 1000 if now is None else now


# --- forks -----------------------------------------------------------------------------------


def _inbound_name(group_id: bytes, sender: str, device: str) -> str:
    return f"group-in:{group_id.hex()}:{sender}:{device}"


def _forget_unknown_keys(client: ClientCore, group_id: bytes) -> None:
    """The group is known now: its room keys no longer count against the cap."""
    held = client.profile.get(UNKNOWN_KEYS, list[str]) or []
    prefix = _inbound_name(group_id, "", "").rstrip(":")
    kept = [n for n in held if not n.startswith(prefix + ":")]
    if kept != held:
        client.profile.put(UNKNOWN_KEYS, kept)


def _record_fork(
    client: ClientCore, group_id: bytes, seq: int, their_hash: bytes, by: str
) -> GroupWarningEvent:
    """Keep a fork at ``seq`` (sending stops until it is settled) and say so."""
    status = group_heads.status_of(client, group_id)
    if status.fork is None:
        status.fork = group_heads.ForkRecord(seq=seq, their_hash=their_hash, by=by)
        group_heads.save_status(client, group_id, status)
    return _warning(
        group_id,
        f"fork: {by} names another group state at position {seq} of the chain than this"
        " client verified; sending to the group is stopped until it is settled",
    )


async def settle_fork(
    client: ClientCore, group_id: bytes, *, max_pages: int = MAX_SYNC_PAGES
) -> list[Event]:
    """Try to settle a recorded fork with the removal rule; events saying what happened.

    Fetches the server's chain from the fork's position and, if it is the
    branch the member named, keeps the branch :func:`chain.settle_fork` says
    stands (a change signed by an admin at or after their removal on the other
    branch is void). An unsettled fork stays recorded and sending stays stopped.
    """
    status = group_heads.status_of(client, group_id)
    fork = status.fork
    record = client.profile.get(_record_name(group_id), GroupRecord)
    if fork is None or record is None or not 0 < fork.seq < len(record.changes):
        return []
    ours_raw = record.changes[fork.seq :]
    try:
        base = chain.verify_chain(chain.decode_change(r) for r in record.changes[: fork.seq])
        theirs_raw: list[bytes] = []
        for _page in range(max_pages):
            reply = await _fetch(client, group_id, fork.seq - 1 + len(theirs_raw))
            theirs_raw += reply.changes
            if not reply.more or not reply.changes:
                break
        theirs = [chain.decode_change(r) for r in theirs_raw]
        states = chain.verify_branch(base, theirs, pinned=_pins(client, base.members))
    except (ProtocolError, AuthenticationError, KeyChangedError):
        return []
    if not states or not hmac.compare_digest(states[0].state_hash, fork.their_hash):
        return []  # the server still shows our branch (or a third one): not settled
    ours = [chain.decode_change(r) for r in ours_raw]
    verdict = chain.settle_fork(ours, theirs)
    if verdict is None:
        return []
    with client.profile.transaction():
        if verdict == "theirs":
            _save(client, group_id, [*record.changes[: fork.seq], *theirs_raw])
        status.fork = None
        group_heads.save_status(client, group_id, status)
    void = ours if verdict == "theirs" else theirs
    bad = chain.void_change(void, chain.admin_removals(theirs if verdict == "theirs" else ours))
    who = bad.author if bad is not None else "an admin"
    kept = "the other branch" if verdict == "theirs" else "this client's branch"
    return [
        _warning(
            group_id,
            f"fork settled: {who} signed a change after their removal, which is void;"
            f" the group follows {kept}",
        )
    ]
