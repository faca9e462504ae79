"""Group frames on the relay: store and forward each group's signed chain, fan out messages.

The relay applies every posted change to the chain it stores (the same rules
every member's client applies), so its member list is the chain's. It checks, as
a courtesy, that members enter with the account keys it holds; members' clients
remain the authority and never take a member list from the server. A group
message is one Megolm ciphertext, queued once per member device.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bastion.errors import ProtocolError, StorageError
from bastion.groups.chain import (
    AddMember,
    CreateGroup,
    GroupState,
    Leave,
    RemoveMember,
    apply_change,
    decode_change,
    verify_chain,
)
from bastion.protocol import frames
from bastion.ratelimit import RateLimiter
from bastion.server import contacts, handlers
from bastion.server.group_store import (
    GroupConflictError,
    GroupStore,
    PgGroupStore,
    SQLiteGroupStore,
)
from bastion.server.pg_store import PgStore
from bastion.server.sqlite_store import SQLiteStore

if TYPE_CHECKING:
    from bastion.server.relay import ClientConnection, RelayServer

EXTENSION = "groups"
CHAIN_PAGE = 128
CHAIN_PAGE_BYTES = 160 * 1024


@dataclass
class GroupService:
    """Per-server state of the group feature: its store and the creation rate limit."""

    store: GroupStore
    creations: RateLimiter[str]


_opening = asyncio.Lock()


async def service(server: RelayServer) -> GroupService:
    """The server's group service, created on first use; raises StorageError for other stores."""
    found = server.extensions.get(EXTENSION)
    if isinstance(found, GroupService):
        return found
    async with _opening:
        found = server.extensions.get(EXTENSION)
        if isinstance(found, GroupService):
            return found
        store: SQLiteGroupStore | PgGroupStore
        if isinstance(server.store, SQLiteStore):
            store = SQLiteGroupStore(server.store)
        elif isinstance(server.store, PgStore):
            store = PgGroupStore(server.store)
        else:
            raise StorageError("this store keeps no groups")
        await store.open()
        limits = server.limits
        created = GroupService(
            store,
            RateLimiter(limits.group_creations_per_hour / 3600.0, limits.group_creations_burst),
        )
        server.extensions[EXTENSION] = created
        return created


async def load_state(store: GroupStore, group_id: bytes, *, max_members: int) -> GroupState | None:
    """Replay the stored chain (None if the group does not exist)."""
    raw: list[bytes] = []
    while True:
        page = await store.changes(group_id, len(raw) - 1, CHAIN_PAGE)
        raw += page
        if len(page) < CHAIN_PAGE:
            break
    if not raw:
        return None
    return verify_chain((decode_change(r) for r in raw), max_members=max_members)


@handlers.handles(frames.GroupPost)
async def post_change(conn: ClientConnection, frame: frames.GroupPost) -> None:
    """Check a change against the stored chain, append it, and notify every member device."""
    user, device = conn.session.require_signed_in()
    groups = await service(conn.server)
    limits = conn.server.limits
    change = decode_change(frame.change)
    if change.author != user:
        conn.refuse(frame.req, "group_change_rejected", "a change must be signed by its poster")
        return
    state = None
    if isinstance(change.args, CreateGroup):
        if not groups.creations.allow(user, time.monotonic()):
            conn.server.limit_hit("group_creations", user)
            conn.refuse(frame.req, "rate_limited", "too many new groups; try again later")
            return
    else:
        state = await load_state(
            groups.store, change.group_id, max_members=limits.group_max_members
        )
        if state is None:
            conn.refuse(frame.req, "unknown_group", "there is no such group")
            return
    after = apply_change(state, change, max_members=limits.group_max_members)
    entering = []
    if isinstance(change.args, CreateGroup):
        entering = [(m.user, m.key) for m in change.args.members]
        entering.append((change.author, change.args.creator_key))
    elif isinstance(change.args, AddMember):
        entering = [(change.args.user, change.args.key)]
    for name, key in entering:
        account = await conn.server.store.get_account(name)
        if account is None or account.identity_key != key:
            conn.refuse(frame.req, "unknown_user", f"{name} has no account with that key"[:200])
            return
    members = sorted(after.members)
    notify = sorted(set(members) | (set(state.members) if state is not None else set()))
    item = frames.GroupChangeItem(group_id=change.group_id, seq=change.seq)
    try:
        envelopes = await groups.store.append_change(
            group_id=change.group_id,
            seq=change.seq,
            change=frame.change,
            members=members,
            notify=notify,
            sender=user,
            sender_device=device,
            server_ts=_now_ms(),
            item=frames.encode_item(item),
        )
    except GroupConflictError as exc:
        conn.refuse(frame.req, "group_conflict", str(exc))
        return
    conn.send_frame(frames.GroupPosted(req=frame.req, seq=change.seq, members=members))
    for envelope in envelopes:
        conn.server.bus.publish(envelope.user, envelope.device_id, envelope)


async def _departure(store: GroupStore, group_id: bytes, user: str) -> int:
    """The seq of the change that ended ``user``'s membership (the last one, if several)."""
    after, found = -1, -1
    while True:
        page = await store.changes(group_id, after, CHAIN_PAGE)
        for raw in page:
            if _removes(raw, user):
                found = decode_change(raw).seq
        if len(page) < CHAIN_PAGE:
            return found
        after = decode_change(page[-1]).seq


def _removes(raw: bytes, user: str) -> bool:
    """Whether a stored change ends ``user``'s membership (removed, or left)."""
    try:
        change = decode_change(raw)
    except ProtocolError:
        return False
    if isinstance(change.args, RemoveMember):
        return change.args.user == user
    return isinstance(change.args, Leave) and change.author == user


@handlers.handles(frames.GroupFetch)
async def fetch_chain(conn: ClientConnection, frame: frames.GroupFetch) -> None:
    """Send a page of a group's chain to a current or former member."""
    user, _ = conn.session.require_signed_in()
    groups = await service(conn.server)
    membership = await groups.store.membership(frame.group_id, user)
    if membership is None:
        conn.refuse(frame.req, "unknown_group", "there is no such group you belong to")
        return
    page = await groups.store.changes(frame.group_id, frame.after_seq, CHAIN_PAGE)
    if not membership:
        # A former member sees the chain up to their own departure, nothing after it.
        last = await _departure(groups.store, frame.group_id, user)
        page = [raw for raw in page if decode_change(raw).seq <= last]
    changes: list[bytes] = []
    size = 0
    for raw in page:
        if changes and size + len(raw) > CHAIN_PAGE_BYTES:
            break
        changes.append(raw)
        size += len(raw)
    more = len(changes) < len(page) or len(page) == CHAIN_PAGE
    members = await groups.store.active_members(frame.group_id) if membership else []
    conn.send_frame(
        frames.GroupChain(
            req=frame.req, group_id=frame.group_id, changes=changes, more=more, members=members
        )
    )


@handlers.handles(frames.GroupSend)
async def send_message(conn: ClientConnection, frame: frames.GroupSend) -> None:
    """Fan one group ciphertext out to every member device, once per client message id."""
    user, device = conn.session.require_signed_in()
    server = conn.server
    groups = await service(server)
    if not server.messages_by_device.allow((user, device), time.monotonic()):
        server.limit_hit("messages_per_device", f"{user}/{device}")
        conn.refuse(frame.req, "rate_limited", "sending too fast; slow down")
        return
    members = await groups.store.active_members(frame.group_id)
    if user not in members:
        conn.refuse(frame.req, "not_a_member", "you are not a member of that group")
        return
    item = frames.GroupMessageItem(group_id=frame.group_id, ciphertext=frame.ciphertext)
    server_ts, envelopes = await groups.store.fan_out(
        members=members,
        sender=user,
        sender_device=device,
        client_msg_id=frame.client_msg_id,
        server_ts=_now_ms(),
        item=frames.encode_item(item),
    )
    conn.send_frame(frames.GroupSent(req=frame.req, server_ts=server_ts, members=members))
    if server.metrics is not None and envelopes:
        server.metrics.messages.inc()
    for envelope in envelopes:
        server.bus.publish(envelope.user, envelope.device_id, envelope)


async def share_a_group(server: RelayServer, sender: str, to: str) -> bool:
    """Members of one group may exchange Olm payloads (room keys) without being contacts."""
    groups = await service(server)
    return await groups.store.share_a_group(sender, to)


contacts.SEND_EXCEPTIONS.append(share_a_group)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
