"""Group chats on the client: the verified membership chain, room keys, sending and receiving.

The group's state is never taken from the server: this client replays the
signed chain (:mod:`bastion.groups.chain`) against its pinned account keys and
shows every change as a :class:`GroupChangeEvent`. Room keys go only to devices
whose certificates verify under the key that the verified state names for the
member; when the server's idea of the member list differs, the user gets a
:class:`GroupWarningEvent` and nothing is shared with the difference.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from bastion.client import group_keys
from bastion.client.client import (
    TRANSIENT_ERRORS,
    Client,
    Event,
    FeatureEvent,
    MessageEvent,
    WarningEvent,
    certified_device,
    now_ms,
)
from bastion.client.records import DeviceEntry, HistoryRecord
from bastion.crypto.payload import Payload
from bastion.errors import (
    AuthenticationError,
    FrameError,
    KeyChangedError,
    ProtocolError,
    RejectedMessageError,
    ServerRefusedError,
    StateError,
)
from bastion.groups import chain
from bastion.protocol import frames

INDEX = "groups:index"
MAX_INBOUND_PER_DEVICE = 20


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
            "conversation": "group:" + self.group_id,
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
    return "group:" + group_id.hex()


def conversation(group_id: bytes) -> str:
    """The history conversation of a group: ``group:<hex id>``."""
    return "group:" + group_id.hex()


def state_of(client: Client, group_id: bytes) -> chain.GroupState | None:
    """The verified state of a group this client knows (None if unknown)."""
    record = client.profile.get(_record_name(group_id), GroupRecord)
    if record is None or not record.changes:
        return None
    cache = client.extensions.get("groups")
    if not isinstance(cache, dict):
        cache = client.extensions["groups"] = {}
    cached = cache.get(group_id)
    if cached is not None and cached[0] == len(record.changes):
        state: chain.GroupState = cached[1]
        return state
    state = chain.verify_chain(chain.decode_change(raw) for raw in record.changes)
    cache[group_id] = (len(record.changes), state)
    return state


def groups(client: Client) -> list[chain.GroupState]:
    """Every group this client knows, by name."""
    ids = client.profile.get(INDEX, list[str]) or []
    found = [state_of(client, bytes.fromhex(i)) for i in ids]
    return sorted((s for s in found if s is not None), key=lambda s: (s.name, s.group_id))


def resolve(client: Client, ref: str) -> chain.GroupState:
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


def _save(client: Client, group_id: bytes, changes: list[bytes]) -> None:
    client.profile.put(_record_name(group_id), GroupRecord(group_id=group_id, changes=changes))
    ids = client.profile.get(INDEX, list[str]) or []
    if group_id.hex() not in ids:
        client.profile.put(INDEX, [*ids, group_id.hex()])


def _pins(client: Client, users: Iterable[str]) -> dict[str, bytes]:
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


def ingest(client: Client, group_id: bytes, raw_changes: Iterable[bytes]) -> list[Event]:
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
    if applied:
        with client.profile.transaction():
            _save(client, group_id, changes)
    return events


def _warning(group_id: bytes, reason: str) -> GroupWarningEvent:
    return GroupWarningEvent(group_id=group_id.hex(), reason=reason[:300], at=now_ms())


def _compare_members(
    group_id: bytes, state: chain.GroupState, server_members: list[str]
) -> list[Event]:
    ghosts = sorted(set(server_members) - set(state.members))
    missing = sorted(set(state.members) - set(server_members))
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


async def _request(client: Client, frame: frames.Frame) -> frames.ServerFrame:
    conn = client.conn
    if conn is None:
        raise ServerRefusedError("disconnected", "not connected to the server")
    req = conn.next_req()
    return await conn.request(msgspec.structs.replace(frame, req=req), req)


async def sync(client: Client, group_id: bytes) -> list[Event]:
    """Fetch the changes this client lacks, check and apply them; events for each."""
    events: list[Event] = []
    while True:
        state = state_of(client, group_id)
        reply = await _request(
            client,
            frames.GroupFetch(
                req=0, group_id=group_id, after_seq=-1 if state is None else state.seq
            ),
        )
        if not isinstance(reply, frames.GroupChain) or reply.group_id != group_id:
            raise RejectedMessageError("the server answered a group fetch for another group")
        applied = ingest(client, group_id, reply.changes)
        events += applied
        if not reply.more or any(isinstance(e, GroupWarningEvent) for e in applied):
            break
    state = state_of(client, group_id)
    if state is not None and client.account.username in state.members:
        events += _compare_members(group_id, state, reply.members)
    return events


async def _post(client: Client, change: chain.GroupChange) -> None:
    await _request(client, frames.GroupPost(req=0, change=chain.encode_change(change)))
    ingested = ingest(client, change.group_id, [chain.encode_change(change)])
    warnings = [e for e in ingested if isinstance(e, GroupWarningEvent)]
    if warnings:
        raise StateError(warnings[0].reason)


async def _key_of(client: Client, user: str) -> bytes:
    """The account key to name for ``user``: pinned (first sight pins the server's)."""
    await client.devices_of(user)
    contact = client.contact(user)
    if contact is None:
        raise StateError(f"no account key known for {user}")
    if contact.trust == "changed":
        raise KeyChangedError(user)
    return contact.identity_key


async def create(
    client: Client, name: str, members: Iterable[str], *, now: float | None = None
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
    client: Client, group: chain.GroupState, args: chain.MemberChange, *, now: float | None = None
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


async def add_member(client: Client, group: chain.GroupState, user: str) -> chain.GroupState:
    """Add ``user`` (with the account key this client pins for them)."""
    return await change(client, group, chain.AddMember(user=user, key=await _key_of(client, user)))


def _seconds(now: float | None) -> float:
    return now_ms() / 1000 if now is None else now


# --- room keys and messages ---------------------------------------------------------------------


async def _member_devices(
    client: Client, group_id: bytes, user: str, key: bytes
) -> tuple[list[DeviceEntry], list[Event]]:
    """``user``'s devices certified by ``key`` (the verified state's key), and warnings."""
    reply = await _request(client, frames.QueryKeys(req=0, user=user))
    if not isinstance(reply, frames.KeysResult) or reply.user != user:
        raise RejectedMessageError("the server answered a key query for someone else")
    contact = client.contact(user)
    pinned = contact.identity_key if contact is not None else reply.identity_key
    if not (hmac.compare_digest(reply.identity_key, key) and hmac.compare_digest(pinned, key)):
        return [], [_warning(group_id, f"{user}'s account key is not the group's; no key shared")]
    devices: list[DeviceEntry] = []
    events: list[Event] = []
    for d in reply.devices:
        entry = certified_device(user, key, d)
        if entry is None:
            events.append(
                _warning(
                    group_id,
                    f"device {d.device_id} listed for {user} has no valid certificate;"
                    " no key shared with it",
                )
            )
        else:
            devices.append(entry)
    return devices, events


def _outbound_name(group_id: bytes) -> str:
    return "group-out:" + group_id.hex()


async def send_text(
    client: Client,
    group: chain.GroupState,
    text: str,
    *,
    now: int | None = None,
    rotate_after_messages: int = group_keys.ROTATE_AFTER_MESSAGES,
) -> HistoryRecord:
    """Encrypt ``text`` once for the group and post it (see :func:`send_body`)."""
    return await send_body(
        client, group, text, now=now, rotate_after_messages=rotate_after_messages
    )


async def send_body(
    client: Client,
    group: chain.GroupState,
    text: str,
    *,
    kind: str = "text",
    now: int | None = None,
    rotate_after_messages: int = group_keys.ROTATE_AFTER_MESSAGES,
) -> HistoryRecord:
    """Encrypt ``text`` once for the group and post it; the server fans it out.

    The room key goes over Olm to every certified device of every member of the
    verified state that lacks it; the session is replaced first when a member
    or device is gone, or after ``rotate_after_messages`` messages or 7 days. Warnings about the
    server's member list or uncertified devices go to ``client.notices``.
    Raises ValueError, StateError (not a member), ServerRefusedError.
    """
    if not text or len(text) > 16_000:
        raise ValueError("a message has 1 to 16,000 characters")
    group_id = group.group_id
    client.notices.extend(await sync(client, group_id))
    state = state_of(client, group_id)
    me = client.account.username
    if state is None or me not in state.members:
        raise StateError("you are not a member of this group")
    at = now_ms() if now is None else now
    targets: dict[str, list[str]] = {}
    for user in sorted(state.members):
        devices, warnings = await _member_devices(client, group_id, user, state.members[user])
        client.notices.extend(warnings)
        ids = [d.device_id for d in devices if d.device_id != client.account.device_id]
        if ids:
            targets[user] = ids
    key = client.profile.pickle_key
    out = client.profile.get(_outbound_name(group_id), group_keys.OutboundSession)
    gone = out is not None and any(
        device not in targets.get(user, []) for user, ids in out.shared.items() for device in ids
    )
    if (
        out is None
        or gone
        or group_keys.needs_rotation(out, at, max_messages=rotate_after_messages)
    ):
        out = group_keys.new_outbound(group_id, key, at)
    room_key = msgspec.json.encode(group_keys.room_key(out, key)).decode()
    for user, ids in targets.items():
        if user == me or set(ids) <= set(out.shared.get(user, [])):
            continue
        await client.send_payload(user, group_keys.ROOM_KEY_KIND, room_key, history=False)
        out.shared[user] = ids
    if me in targets and targets[me] != out.shared.get(me):
        out.shared[me] = targets[me]  # our other devices got each send_payload's copy
    message_id = secrets.token_bytes(16)
    plaintext = group_keys.GroupPlaintext(
        group_id=group_id,
        sender=me,
        sender_device=client.account.device_id,
        message_id=message_id,
        sent_at=at,
        body=text,
        kind=kind,
    )
    with client.profile.transaction():
        device = client._device()  # the device key signs the plaintext
        out, ciphertext = group_keys.encrypt(out, plaintext, device.sign, key)
        client.profile.put(_outbound_name(group_id), out)  # index used: never again
    reply = await _request(
        client,
        frames.GroupSend(req=0, group_id=group_id, client_msg_id=message_id, ciphertext=ciphertext),
    )
    server_ts = reply.server_ts if isinstance(reply, frames.GroupSent) else at
    if isinstance(reply, frames.GroupSent):
        client.notices.extend(_compare_members(group_id, state, reply.members))
    record = HistoryRecord(
        id=message_id,
        sender=me,
        device=client.account.device_id,
        peer=conversation(group_id),
        conversation=conversation(group_id),
        text=text,
        sent_at=at,
        server_ts=server_ts,
        direction="out",
        state="sent",
    )
    if kind == "text":
        with client.profile.transaction():
            client.profile.add_message(record.conversation, message_id, record)
    client.extensions["groups.last_ciphertext"] = ciphertext
    return record


def history(client: Client, group: chain.GroupState, *, limit: int = 1000) -> list[HistoryRecord]:
    """The group's conversation from the local encrypted store, oldest first."""
    return client.profile.history(conversation(group.group_id), HistoryRecord, limit=limit)


def _inbound_name(group_id: bytes, sender: str, device: str) -> str:
    return f"group-in:{group_id.hex()}:{sender}:{device}"


def on_room_key(
    client: Client, payload: Payload, sender: DeviceEntry, deliver: frames.Deliver
) -> Event | None:
    """Store a room key received over Olm, filed under the device that sent it."""
    del sender, deliver
    try:
        key = msgspec.json.decode(payload.body, type=group_keys.RoomKey)
        group_id = bytes.fromhex(key.group_id)
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError):
        raise RejectedMessageError("malformed room key") from None
    if len(group_id) != chain.GROUP_ID_BYTES:
        raise RejectedMessageError("malformed room key")
    name = _inbound_name(group_id, payload.sender, payload.sender_device)
    held = client.profile.get(name, InboundSessions) or InboundSessions(sessions=[])
    if any(s.session_id == key.session_id for s in held.sessions):
        return None  # already held: never reset what was seen of it
    inbound = group_keys.import_room_key(
        key,
        group_id=group_id,
        sender=payload.sender,
        sender_device=payload.sender_device,
        pickle_key=client.profile.pickle_key,
    )
    sessions = [*held.sessions, inbound][-MAX_INBOUND_PER_DEVICE:]
    client.profile.put(name, InboundSessions(sessions=sessions))
    return None


async def on_deliver(client: Client, deliver: frames.Deliver) -> Event | None:
    """Handle a group envelope: a chain notice (sync) or a message (decrypt and check)."""
    seen = f"{deliver.seq}:{hashlib.sha256(deliver.body).hexdigest()[:32]}"
    if client.profile.seen("group-env", seen):
        return None
    try:
        item = frames.decode_item(deliver.body)
    except FrameError:
        event: Event | None = WarningEvent(
            "malformed group envelope", deliver.sender, deliver.sender_device, deliver.server_ts
        )
    else:
        if isinstance(item, frames.GroupChangeItem):
            try:
                client.notices.extend(await _sync_or_reject(client, item.group_id))
                event = None
            except RejectedMessageError as exc:
                event = _warning(item.group_id, exc.reason)
        else:
            event = await _receive_message(client, deliver, item)
    with client.profile.transaction():
        client.profile.mark_seen("group-env", seen)
    return event


async def _sync_or_reject(client: Client, group_id: bytes) -> list[Event]:
    try:
        return await sync(client, group_id)
    except ServerRefusedError as exc:
        if exc.code in TRANSIENT_ERRORS:
            raise  # not acknowledged: delivered again on the next connection
        raise RejectedMessageError(f"the server refused the group's chain: {exc.code}") from None


async def _receive_message(
    client: Client, deliver: frames.Deliver, item: frames.GroupMessageItem
) -> Event | None:
    group_id = item.group_id
    try:
        state = state_of(client, group_id)
        if state is None or deliver.sender not in state.members:
            client.notices.extend(await _sync_or_reject(client, group_id))
            state = state_of(client, group_id)
        if state is None or deliver.sender not in state.members:
            raise RejectedMessageError("group message from someone who is not a member")
        devices, _ = await _member_devices(
            client, group_id, deliver.sender, state.members[deliver.sender]
        )
        sender = next((d for d in devices if d.device_id == deliver.sender_device), None)
        if sender is None:
            raise RejectedMessageError("sender device has no valid certificate")
        return _accept(client, deliver, item, sender)
    except RejectedMessageError as exc:
        return WarningEvent(exc.reason, deliver.sender, deliver.sender_device, deliver.server_ts)


def _accept(
    client: Client, deliver: frames.Deliver, item: frames.GroupMessageItem, sender: DeviceEntry
) -> Event | None:
    name = _inbound_name(item.group_id, deliver.sender, deliver.sender_device)
    held = client.profile.get(name, InboundSessions)
    if held is None or not held.sessions:
        raise RejectedMessageError("no room key from that device for this group")
    position, advanced, plaintext = _decrypt_any(held, deliver, item, sender, client)
    replay_key = plaintext.sender + "\0" + plaintext.message_id.hex()
    if client.profile.seen("group-msg", replay_key):
        raise RejectedMessageError("replayed group message")
    record = HistoryRecord(
        id=plaintext.message_id,
        sender=plaintext.sender,
        device=plaintext.sender_device,
        peer=conversation(item.group_id),
        conversation=conversation(item.group_id),
        text=plaintext.body,
        sent_at=plaintext.sent_at,
        server_ts=deliver.server_ts,
        direction="out" if plaintext.sender == client.account.username else "in",
        state="received",
    )
    sessions = list(held.sessions)
    sessions[position] = advanced
    with client.profile.transaction():
        client.profile.put(name, InboundSessions(sessions=sessions))
        client.profile.mark_seen("group-msg", replay_key)
        if plaintext.kind == "file.offer":
            from bastion.client import files  # noqa: PLC0415 - files build on groups

            # None for our own offer seen on another of our devices.
            return files.record_offer(
                client,
                sender=plaintext.sender,
                device=plaintext.sender_device,
                message_id=plaintext.message_id,
                body=plaintext.body,
                at=deliver.server_ts,
            )
        client.profile.add_message(record.conversation, record.id, record)
    contact = client.contact(plaintext.sender)
    return MessageEvent(record=record, verified=contact is not None and contact.trust == "verified")


def _decrypt_any(
    held: InboundSessions,
    deliver: frames.Deliver,
    item: frames.GroupMessageItem,
    sender: DeviceEntry,
    client: Client,
) -> tuple[int, group_keys.InboundSession, group_keys.GroupPlaintext]:
    undecryptable = "group message could not be decrypted"
    error = RejectedMessageError(undecryptable)
    for position, inbound in enumerate(held.sessions):
        try:
            advanced, plaintext = group_keys.decrypt(
                inbound,
                item.ciphertext,
                group_id=item.group_id,
                sender=deliver.sender,
                sender_device=deliver.sender_device,
                sender_ed25519=sender.ed25519,
                pickle_key=client.profile.pickle_key,
            )
        except RejectedMessageError as exc:
            if exc.reason != undecryptable:
                error = exc
            continue
        return position, advanced, plaintext
    raise error


def install(client: Client) -> None:
    """Register the group handlers on ``client``."""
    client.payload_handlers[group_keys.ROOM_KEY_KIND] = lambda p, s, d: on_room_key(client, p, s, d)

    async def deliver(frame: frames.Deliver) -> Event | None:
        return await on_deliver(client, frame)

    client.deliver_handlers[frames.GROUP_KIND] = deliver
