"""Contacts with mutual consent, and presence shown only to accepted contacts.

The server holds per pair only what routing and presence need (see
:mod:`bastion.server.core.contact_rules`); request notes, away/busy and status text
travel end to end encrypted as ordinary Olm payloads and are never seen here.

Presence: a user is online while any of their devices holds a *receiving*
connection on any node, unless they chose to be invisible. Each node tracks its
own connections and tells the bus of each user's first and last one; the bus
answers whether that changed the user's presence across all nodes (and names
users whose nodes died). Changes are pushed through the bus to the devices of
accepted contacts whose connections asked for the ``contacts`` topic
(``PresenceWatch``), wherever they are connected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bastion.errors import StorageError
from bastion.protocol import frames
from bastion.server import handlers
from bastion.server.cluster.local import Push
from bastion.server.core.contact_rules import (
    ACCEPTED,
    BLOCKED,
    PENDING_IN,
    ContactError,
    Delivery,
    Pair,
    Transition,
    apply_action,
    delivers_request,
    may_send,
    state_of,
)
from bastion.server.storage.contacts import ContactStore, PgContactStore, SQLiteContactStore
from bastion.server.storage.postgres.relay import PgStore
from bastion.server.storage.sqlite.relay import SQLiteStore

if TYPE_CHECKING:
    from bastion.server.net.connection import ClientConnection, RelayServer

log = logging.getLogger("bastion.server.handlers.contacts")

EXTENSION = "contacts"
TOPIC = "contacts"

# A room key for a group (a Send naming the group) may pass between two of its joined
# members who are not contacts; the group feature registers the rule (server/groups.py).
# It answers stored (True) or dropped (False), or raises ContactError. A plain message
# never passes this way: sharing a group opens no direct conversation.
RoomKeyRule = Callable[..., Awaitable[bool]]
ROOM_KEY_RULES: list[RoomKeyRule] = []


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class ContactService:
    """Per-server state: the store, the request limits, and who is connected here."""

    store: ContactStore
    online: dict[str, set[ClientConnection]] = field(default_factory=dict)  # on this node
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


async def service(server: RelayServer) -> ContactService:
    """The server's contact service, created on first use; raises StorageError for other stores."""
    found = server.extensions.get(EXTENSION)
    if isinstance(found, ContactService):
        return found
    lock = server.extensions.setdefault(EXTENSION + ".opening", asyncio.Lock())
    if not isinstance(lock, asyncio.Lock):
        raise StorageError("the contact service lock is missing")
    async with lock:
        found = server.extensions.get(EXTENSION)
        if isinstance(found, ContactService):
            return found
        store: ContactStore
        if isinstance(server.store, SQLiteStore):
            sqlite_store = SQLiteContactStore(server.store)
            await sqlite_store.open()
            store = sqlite_store
        elif isinstance(server.store, PgStore):
            store = PgContactStore(server.store)
        else:
            raise StorageError("this store keeps no contacts")
        created = ContactService(store)
        server.extensions[EXTENSION] = created
        server.bus.on_presence_lost(lambda users: _lost(server, created, users))
        return created


def _lost(server: RelayServer, contacts: ContactService, users: list[str]) -> None:
    """Users whose every node died: their contacts are told they went offline."""

    async def announce() -> None:
        for user in users:
            try:
                if await server.bus.online([user]):
                    continue  # connected again meanwhile
                if not await contacts.store.invisible(user):
                    await _announce(server, contacts, user, False)
            except StorageError as exc:
                log.warning("presence.lost_failed", extra={"error": type(exc).__name__})

    task = asyncio.get_running_loop().create_task(announce())
    contacts.tasks.add(task)
    task.add_done_callback(contacts.tasks.discard)


# --- messages -------------------------------------------------------------------------------


async def check_may_send(
    server: RelayServer, sender: str, to: str, message_id: bytes, *, group_id: bytes | None = None
) -> bool:
    """Whether a message from ``sender`` to ``to`` is stored (True) or dropped silently (False).

    Raises :class:`ContactError` (``not_a_contact``, ``unknown_user``) when it is
    refused: a stranger, a pending request past its one note, a removed or
    blocked sender all get the same ``not_a_contact``. With ``group_id`` (a room
    key for that group) the group's rule decides for two who are not contacts.
    """
    contacts = await service(server)
    pair = await contacts.store.pair(sender, to)
    verdict, transition = may_send(pair, message_id)
    if verdict is Delivery.ALLOW and transition.mine == pair.mine:
        return True  # accepted contacts (or a retried note): nothing to record
    if verdict is not Delivery.REFUSE:
        # A request's one note: its id is recorded in the transaction that checks it.
        verdicts: list[Delivery] = []

        def rule(current: Pair) -> Transition:
            found, change = may_send(current, message_id)
            verdicts.append(found)
            return change

        await contacts.store.update(sender, to, rule)
        verdict = verdicts[-1]
    if verdict is Delivery.REFUSE:
        if group_id is not None and ROOM_KEY_RULES:
            # Never reaches someone who blocked the sender (dropped, silently).
            blocked = state_of(pair.theirs) == BLOCKED
            return await ROOM_KEY_RULES[0](
                server, sender, to, group_id, blocked_by_recipient=blocked
            )
        if await server.store.get_account(to) is None:
            raise ContactError("unknown_user", f"there is no user named {to}")
        raise ContactError(
            "not_a_contact", f"{to} has not accepted you as a contact; send a contact request first"
        )
    return verdict is Delivery.ALLOW


# --- presence -------------------------------------------------------------------------------


async def _push(server: RelayServer, user: str, frame: frames.Frame) -> None:
    """Publish ``frame`` to every device of ``user`` on the contacts topic."""
    for device in await server.store.list_devices(user):
        server.bus.publish(user, device.device_id, Push(TOPIC, frame))


async def _visible_online(server: RelayServer, contacts: ContactService, user: str) -> bool:
    return bool(await server.bus.online([user])) and not await contacts.store.invisible(user)


async def _announce(server: RelayServer, contacts: ContactService, user: str, online: bool) -> None:
    frame = frames.PresenceChanged(user=user, online=online, at=_now_ms())
    for contact in await contacts.store.accepted(user):
        await _push(server, contact, frame)


async def device_online(conn: ClientConnection) -> None:
    """A receiving connection signed in: its user may have just come online."""
    user, _ = conn.session.require_signed_in()
    contacts = await service(conn.server)
    if conn not in conn.server.connections:
        return  # already gone again
    connected = contacts.online.setdefault(user, set())
    first = not connected
    connected.add(conn)
    if (
        first
        and await conn.server.bus.presence_up(user)
        and not await contacts.store.invisible(user)
    ):
        await _announce(conn.server, contacts, user, True)


async def device_offline(conn: ClientConnection) -> None:
    """A receiving connection closed: its user may have just gone offline."""
    user, _ = conn.session.require_signed_in()
    contacts = await service(conn.server)
    connected = contacts.online.get(user)
    if connected is None or conn not in connected:
        return
    connected.discard(conn)
    if not connected:
        del contacts.online[user]
        if await conn.server.bus.presence_down(user) and not await contacts.store.invisible(user):
            await _announce(conn.server, contacts, user, False)


# --- requests from clients ------------------------------------------------------------------


async def _check_request_limits(
    conn: ClientConnection, contacts: ContactService, me: str, peer: str
) -> None:
    pair = await contacts.store.pair(me, peer)
    if state_of(pair.mine) in (ACCEPTED, PENDING_IN, BLOCKED):
        return  # not a new request
    limits = conn.server.limits
    bus = conn.server.bus
    if not await bus.take(
        "contact_requests_per_sender",
        me,
        limits.contact_requests_per_sender_per_day / 86_400.0,
        limits.contact_requests_per_sender_burst,
    ):
        conn.server.limit_hit("contact_requests_per_sender", me)
        raise ContactError("rate_limited", "you sent too many contact requests; try again tomorrow")
    if delivers_request(pair) and not await bus.take(
        "contact_requests_per_recipient",
        peer,
        limits.contact_requests_per_recipient_per_hour / 3600.0,
        limits.contact_requests_per_recipient_burst,
    ):
        conn.server.limit_hit("contact_requests_per_recipient", peer)
        raise ContactError(
            "rate_limited", f"{peer} is receiving too many contact requests; try again later"
        )


@handlers.handles(frames.ContactAction)
async def contact_action(conn: ClientConnection, frame: frames.ContactAction) -> None:
    """Apply a contact action, answer with the new state, and tell whoever must be told."""
    me, _ = conn.session.require_signed_in()
    peer = frame.user
    if peer == me:
        raise ContactError("bad_recipient", "you cannot be your own contact")
    server = conn.server
    contacts = await service(server)
    if await server.store.get_account(peer) is None:
        raise ContactError("unknown_user", f"there is no user named {peer}")
    if frame.action == "request":
        await _check_request_limits(conn, contacts, me, peer)
    now = _now_ms()
    limits = server.limits

    def rule(pair: Pair) -> Transition:
        return apply_action(
            frame.action,
            pair,
            peer=peer,
            now=now,
            pending_max=limits.contact_requests_pending_max,
            contacts_max=limits.contacts_max,
        )

    outcome = await contacts.store.update(
        me, peer, rule, counts=frame.action in ("request", "block")
    )
    if outcome.error is not None:
        raise outcome.error
    conn.send_frame(frames.ContactResult(req=frame.req, user=peer, state=outcome.result))  # type: ignore[arg-type]
    # Every device of the caller's account, this one's other connections included (a watching
    # front end of the same device learns of a change made by a command line).
    mine = frames.ContactChanged(user=peer, state=outcome.result, at=now)  # type: ignore[arg-type]
    await _push(server, me, mine)
    if outcome.tell_peer is not None:
        told = frames.ContactChanged(user=me, state=outcome.tell_peer, at=now)  # type: ignore[arg-type]
        await _push(server, peer, told)
    if outcome.accepted_now:
        if await _visible_online(server, contacts, me):
            await _push(server, peer, frames.PresenceChanged(user=me, online=True, at=now))
        if await _visible_online(server, contacts, peer):
            await _push(server, me, frames.PresenceChanged(user=peer, online=True, at=now))


async def _contact_list(conn: ClientConnection, req: int) -> frames.ContactListResult:
    me, _ = conn.session.require_signed_in()
    contacts = await service(conn.server)
    rows = (await contacts.store.contacts(me))[: frames.MAX_CONTACTS]
    online_now = await conn.server.bus.online([peer for peer, row in rows if row.state == ACCEPTED])
    entries = []
    for peer, row in rows:
        online = peer in online_now and not await contacts.store.invisible(peer)
        entries.append(frames.ContactEntry(user=peer, state=row.state, online=online))  # type: ignore[arg-type]
    return frames.ContactListResult(req=req, contacts=entries)


@handlers.handles(frames.ContactList)
async def contact_list(conn: ClientConnection, frame: frames.ContactList) -> None:
    """Answer with the caller's contacts and, for accepted ones, whether they are online."""
    conn.send_frame(await _contact_list(conn, frame.req))


@handlers.handles(frames.PresenceWatch)
async def presence_watch(conn: ClientConnection, frame: frames.PresenceWatch) -> None:
    """Start pushing contact and presence changes to this connection; answer with a snapshot."""
    conn.topics.add(TOPIC)
    conn.send_frame(await _contact_list(conn, frame.req))


@handlers.handles(frames.PresenceVisibility)
async def presence_visibility(conn: ClientConnection, frame: frames.PresenceVisibility) -> None:
    """Become invisible (offline to everyone) or visible again; contacts see the change."""
    me, _ = conn.session.require_signed_in()
    contacts = await service(conn.server)
    before = await contacts.store.invisible(me)
    if before != frame.invisible:
        await contacts.store.set_invisible(me, frame.invisible)
        if await conn.server.bus.online([me]):
            await _announce(conn.server, contacts, me, not frame.invisible)
    conn.send_frame(frames.Ok(req=frame.req))
