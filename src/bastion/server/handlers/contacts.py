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

from bastion.errors import StorageError
from bastion.protocol import frames
from bastion.protocol.codes import ErrorCode
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
from bastion.server.handlers._context import Route, Services
from bastion.server.handlers._request import Request
from bastion.server.handlers._services import ContactService

log = logging.getLogger("bastion.server.handlers.contacts")

TOPIC = "contacts"


def listen(services: Services) -> None:
    """Hear of users whose node died (a cluster's bus tells one node each).

    Called once, before the node accepts connections, so that no one's
    departure goes unannounced.
    """
    services.bus.on_presence_lost(lambda users: _lost(services, users))


def _lost(services: Services, users: list[str]) -> None:
    """Users whose every node died: their contacts are told they went offline."""
    contacts = services.contacts

    async def announce() -> None:
        for user in users:
            try:
                if await services.bus.online([user]):
                    continue  # connected again meanwhile
                if not await contacts.store.invisible(user):
                    await _announce(services, contacts, user, False)
            except StorageError as exc:
                log.warning("presence.lost_failed", extra={"error": type(exc).__name__})

    task = asyncio.get_running_loop().create_task(announce())
    contacts.tasks.add(task)
    task.add_done_callback(contacts.tasks.discard)


# --- messages -------------------------------------------------------------------------------


async def check_may_send(
    services: Services, sender: str, to: str, message_id: bytes, *, group_id: bytes | None = None
) -> bool:
    """Whether a message from ``sender`` to ``to`` is stored (True) or dropped silently (False).

    Raises :class:`ContactError` (``not_a_contact``, ``unknown_user``) when it is
    refused: a stranger, a pending request past its one note, a removed or
    blocked sender all get the same ``not_a_contact``. With ``group_id`` (a room
    key for that group) the group's rule decides for two who are not contacts.
    """
    contacts = services.contacts
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
        if group_id is not None and services.send_exceptions:
            # Never reaches someone who blocked the sender (dropped, silently).
            blocked = state_of(pair.theirs) == BLOCKED
            return await services.send_exceptions[0](
                services, sender, to, group_id, blocked_by_recipient=blocked
            )
        if await services.storage.relay.get_account(to) is None:
            raise ContactError(ErrorCode.UNKNOWN_USER, f"there is no user named {to}")
        raise ContactError(
            ErrorCode.NOT_A_CONTACT,
            f"{to} has not accepted you as a contact; send a contact request first",
        )
    return verdict is Delivery.ALLOW


# --- presence -------------------------------------------------------------------------------


async def _push(services: Services, user: str, frame: frames.Frame) -> None:
    """Publish ``frame`` to every device of ``user`` on the contacts topic."""
    for device in await services.storage.relay.list_devices(user):
        services.bus.publish(user, device.device_id, Push(TOPIC, frame))


async def _visible_online(services: Services, contacts: ContactService, user: str) -> bool:
    return bool(await services.bus.online([user])) and not await contacts.store.invisible(user)


async def _announce(services: Services, contacts: ContactService, user: str, online: bool) -> None:
    frame = frames.PresenceChanged(user=user, online=online, at=services.clock.now_ms())
    for contact in await contacts.store.accepted(user):
        await _push(services, contact, frame)


async def device_online(request: Request, services: Services) -> None:
    """A receiving connection signed in: its user may have just come online."""
    user, _ = request.signed_in()
    contacts = services.contacts
    if request.closed:
        return  # already gone again
    connected = contacts.online.setdefault(user, set())
    first = not connected
    connected.add(request)
    if first and await services.bus.presence_up(user) and not await contacts.store.invisible(user):
        await _announce(services, contacts, user, True)


async def device_offline(request: Request, services: Services) -> None:
    """A receiving connection closed: its user may have just gone offline."""
    user, _ = request.signed_in()
    contacts = services.contacts
    connected = contacts.online.get(user)
    if connected is None or request not in connected:
        return
    connected.discard(request)
    if not connected:
        del contacts.online[user]
        if await services.bus.presence_down(user) and not await contacts.store.invisible(user):
            await _announce(services, contacts, user, False)


# --- requests from clients ------------------------------------------------------------------


async def _check_request_limits(
    services: Services, contacts: ContactService, me: str, peer: str
) -> None:
    pair = await contacts.store.pair(me, peer)
    if state_of(pair.mine) in (ACCEPTED, PENDING_IN, BLOCKED):
        return  # not a new request
    limits = services.limits
    bus = services.bus
    if not await bus.take(
        "contact_requests_per_sender",
        me,
        limits.contact_requests_per_sender_per_day / 86_400.0,
        limits.contact_requests_per_sender_burst,
    ):
        services.limit_log.hit("contact_requests_per_sender", me)
        raise ContactError(
            ErrorCode.RATE_LIMITED, "you sent too many contact requests; try again tomorrow"
        )
    if delivers_request(pair) and not await bus.take(
        "contact_requests_per_recipient",
        peer,
        limits.contact_requests_per_recipient_per_hour / 3600.0,
        limits.contact_requests_per_recipient_burst,
    ):
        services.limit_log.hit("contact_requests_per_recipient", peer)
        raise ContactError(
            ErrorCode.RATE_LIMITED,
            f"{peer} is receiving too many contact requests; try again later",
        )


async def contact_action(request: Request, services: Services, frame: frames.ContactAction) -> None:
    """Apply a contact action, answer with the new state, and tell whoever must be told."""
    me, _ = request.signed_in()
    peer = frame.user
    if peer == me:
        raise ContactError(ErrorCode.BAD_RECIPIENT, "you cannot be your own contact")
    contacts = services.contacts
    if await services.storage.relay.get_account(peer) is None:
        raise ContactError(ErrorCode.UNKNOWN_USER, f"there is no user named {peer}")
    if frame.action == "request":
        await _check_request_limits(services, contacts, me, peer)
    now = services.clock.now_ms()
    limits = services.limits

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
    request.reply(frames.ContactResult(req=frame.req, user=peer, state=outcome.result))  # type: ignore[arg-type]
    # Every device of the caller's account, this one's other connections included (a watching
    # front end of the same device learns of a change made by a command line).
    mine = frames.ContactChanged(user=peer, state=outcome.result, at=now)  # type: ignore[arg-type]
    await _push(services, me, mine)
    if outcome.tell_peer is not None:
        told = frames.ContactChanged(user=me, state=outcome.tell_peer, at=now)  # type: ignore[arg-type]
        await _push(services, peer, told)
    if outcome.accepted_now:
        if await _visible_online(services, contacts, me):
            await _push(services, peer, frames.PresenceChanged(user=me, online=True, at=now))
        if await _visible_online(services, contacts, peer):
            await _push(services, me, frames.PresenceChanged(user=peer, online=True, at=now))


async def _contact_list(request: Request, services: Services, req: int) -> frames.ContactListResult:
    me, _ = request.signed_in()
    contacts = services.contacts
    rows = (await contacts.store.contacts(me))[: frames.MAX_CONTACTS]
    online_now = await services.bus.online([peer for peer, row in rows if row.state == ACCEPTED])
    entries = []
    for peer, row in rows:
        online = peer in online_now and not await contacts.store.invisible(peer)
        entries.append(frames.ContactEntry(user=peer, state=row.state, online=online))  # type: ignore[arg-type]
    return frames.ContactListResult(req=req, contacts=entries)


async def contact_list(request: Request, services: Services, frame: frames.ContactList) -> None:
    """Answer with the caller's contacts and, for accepted ones, whether they are online."""
    request.reply(await _contact_list(request, services, frame.req))


async def presence_watch(request: Request, services: Services, frame: frames.PresenceWatch) -> None:
    """Start pushing contact and presence changes to this connection; answer with a snapshot."""
    request.watch(TOPIC)
    request.reply(await _contact_list(request, services, frame.req))


async def presence_visibility(
    request: Request, services: Services, frame: frames.PresenceVisibility
) -> None:
    """Become invisible (offline to everyone) or visible again; contacts see the change."""
    me, _ = request.signed_in()
    contacts = services.contacts
    before = await contacts.store.invisible(me)
    if before != frame.invisible:
        await contacts.store.set_invisible(me, frame.invisible)
        if await services.bus.online([me]):
            await _announce(services, contacts, me, not frame.invisible)
    request.reply(frames.Ok(req=frame.req))


ROUTES = (
    Route(frames.ContactAction, contact_action),
    Route(frames.ContactList, contact_list),
    Route(frames.PresenceWatch, presence_watch),
    Route(frames.PresenceVisibility, presence_visibility),
)
