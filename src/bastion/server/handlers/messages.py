"""Messages on the relay: ``send`` (the fast path) and ``ack``.

A message between accepted contacts takes one store call, which checks the
pair and the recipient's queue in the storing transaction, and no task: the
handler runs inline and the store's answer comes back in a done callback.
Everything else (a request's note, group co-members, a refusal) then follows
the full contact rules in a task (:func:`relay_checked`).

A device's message rate is checked in this node's memory
(``Services.message_rates``) and moves with the device between nodes
(:meth:`Bus.hand_over_rate`, :meth:`Bus.take_rate`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from bastion.errors import BastionError
from bastion.protocol import frames
from bastion.protocol.codes import ErrorCode
from bastion.server.handlers import contacts
from bastion.server.handlers._context import (
    INTERNAL_MESSAGE,
    REFUSED_MESSAGE,
    Route,
    Services,
)
from bastion.server.handlers._request import Request
from bastion.server.storage.interfaces import (
    Copy,
    DeviceMismatchError,
    NotContactsError,
    QueueFullError,
    StoredMessage,
    UnknownRecipientError,
)

log = logging.getLogger("bastion.server")


def send(request: Request, services: Services, frame: frames.Send) -> None:
    """Store a message and answer ``sent``, without a task in the common case."""
    started = time.perf_counter()
    device = request.signed_in()
    sender, sender_device = device
    if frame.to == sender:
        request.refuse(frame.req, ErrorCode.BAD_RECIPIENT, "you cannot message yourself")
        services.metrics.observe("relay", started)
        return
    if not services.message_rates.allow(device, time.monotonic()):
        services.limit_log.hit("messages_per_device", f"{sender}/{sender_device}")
        request.refuse(frame.req, ErrorCode.RATE_LIMITED, "sending too fast; slow down")
        services.metrics.observe("relay", started)
        return
    # A room key travels on its group's path: its kind tells the recipient that
    # only a room key may be inside (docs/protocol.md §8.7).
    path = 0 if frame.group_id is None else frames.ROOM_KEY_PATH
    copies = [Copy(c.user, c.device_id, path + c.kind, c.body) for c in frame.ciphertexts]
    stored = _store(services, frame, sender, sender_device, copies, contacts_only=True)
    request.hold()
    stored.add_done_callback(
        functools.partial(_stored, request, services, frame, device, copies, started)
    )


def _stored(  # noqa: PLR0917 - a positional partial: no kwargs dict per message
    request: Request,
    services: Services,
    frame: frames.Send,
    device: tuple[str, str],
    copies: list[Copy],
    started: float,
    stored: asyncio.Future[StoredMessage],
) -> None:
    """The store answered a message of :func:`send` (a positional partial: no kwargs dict)."""
    request.release()
    if stored.cancelled():
        return
    exc = stored.exception()
    if exc is None:
        _relayed(request, services, frame, stored.result())
    elif isinstance(exc, NotContactsError):
        # Timed apart, as ``relay_checked``.
        request.spawn(frame.req, relay_checked(request, services, frame, device, copies))
        return
    elif not _refuse_message(request, services, frame, exc):
        if isinstance(exc, BastionError):
            log.warning("request.failed", extra={"error": type(exc).__name__})
            request.refuse(frame.req, ErrorCode.REFUSED, REFUSED_MESSAGE)
        else:
            log.error("request.crashed", exc_info=exc)
            request.refuse(frame.req, ErrorCode.INTERNAL, INTERNAL_MESSAGE)
    services.metrics.observe("relay", started)


async def relay_checked(
    request: Request,
    services: Services,
    frame: frames.Send,
    device: tuple[str, str],
    copies: list[Copy],
) -> None:
    """A message that is not between accepted contacts: the full contact rules decide."""
    sender, sender_device = device
    if not await contacts.check_may_send(
        services, sender, frame.to, frame.client_msg_id, group_id=frame.group_id
    ):
        request.reply(frames.Sent(req=frame.req, server_ts=services.clock.now_ms()))  # dropped
        return
    try:
        stored = await _store(services, frame, sender, sender_device, copies, contacts_only=False)
    except (UnknownRecipientError, QueueFullError, DeviceMismatchError) as exc:
        _refuse_message(request, services, frame, exc)
        return
    _relayed(request, services, frame, stored)


def _refuse_message(
    request: Request, services: Services, frame: frames.Send, exc: BaseException
) -> bool:
    """Answer a refusal of the store; False if ``exc`` is not one."""
    if isinstance(exc, UnknownRecipientError):
        request.refuse(frame.req, ErrorCode.UNKNOWN_USER, f"there is no user named {frame.to}")
    elif isinstance(exc, QueueFullError):
        services.limit_log.hit("offline_queue", frame.to)
        request.refuse(
            frame.req, ErrorCode.QUEUE_FULL, f"{frame.to} has too many undelivered messages"
        )
    elif isinstance(exc, DeviceMismatchError):
        detail = "missing " + ",".join(exc.missing) + "; extra " + ",".join(exc.extra)
        request.refuse(frame.req, ErrorCode.DEVICE_MISMATCH, detail)
    else:
        return False
    return True


def _relayed(
    request: Request, services: Services, frame: frames.Send, stored: StoredMessage
) -> None:
    request.reply(frames.Sent(req=frame.req, server_ts=stored.server_ts))
    services.metrics.count_messages()
    for envelope in stored.envelopes:
        services.bus.publish(envelope.user, envelope.device_id, envelope)


def _store(
    services: Services,
    frame: frames.Send,
    sender: str,
    sender_device: str,
    copies: list[Copy],
    *,
    contacts_only: bool,
) -> asyncio.Future[StoredMessage]:
    return services.storage.relay.submit_message(
        sender=sender,
        sender_device=sender_device,
        client_msg_id=frame.client_msg_id,
        recipient=frame.to,
        server_ts=services.clock.now_ms(),
        copies=copies,
        queue_max=services.limits.offline_queue_max,
        contacts_only=contacts_only,
    )


def ack(request: Request, services: Services, frame: frames.Ack) -> None:
    """Acknowledgements of delivered envelopes go to the connection's delivery window."""
    request.ack(frame.seqs)


# --- the message rate moves with its device -------------------------------------------------


async def take_message_rate(services: Services, username: str, device_id: str) -> None:
    """Carry over the bucket the device left on the node it last used, if any."""
    limits = services.limits
    tokens = await services.bus.take_rate(
        username, device_id, limits.messages_per_second, limits.messages_burst
    )
    if tokens is not None:
        services.message_rates.lower((username, device_id), tokens, time.monotonic())


async def hand_over_message_rate(services: Services, username: str, device_id: str) -> None:
    """Leave the device's bucket for the node it signs in on next (a full one needs nothing)."""
    limits = services.limits
    tokens = services.message_rates.tokens((username, device_id), time.monotonic())
    if tokens < limits.messages_burst:
        await services.bus.hand_over_rate(
            username, device_id, tokens, limits.messages_per_second, limits.messages_burst
        )


ROUTES = (
    Route(frames.Send, send, inline=True),
    Route(frames.Ack, ack, inline=True),
)
