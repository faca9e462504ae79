"""A connection kept up for as long as the caller listens: sign in, receive, and sign in again.

:func:`stay_connected` connects with ``receive``, yields what arrives, and when
the connection drops or the server cannot be reached it waits as
:class:`~bastion.client.reconnect.Backoff` says and signs in again. Nothing is
lost and nothing is shown twice across a reconnect, by the same rules as any
sign-in:

- the server keeps each envelope until this device acknowledges it, and the
  client acknowledges only after the message is stored, so what was not
  acknowledged is delivered again on the next sign-in;
- an envelope delivered again (acknowledged, but the acknowledgement was lost)
  is recognised by its queue position and ciphertext and dropped silently,
  and a message id seen before is refused as a replay;
- messages kept in the outbox (sent, but the server's answer never came) go out
  again under their own id as the connection opens, and the server stores them once;
  then the texts queued while offline go out, in order (:mod:`bastion.client.outbox`).

Only failures that a later attempt may heal are retried: the network, the
server going away, a timeout, rate limiting, a server error
(:data:`RETRIED_CODES`), and once signed in any refusal of a request made while
a delivery was handled (the delivery was not acknowledged and comes again).
Everything else ends the loop with its error, at once: a certificate, server
name or policy key that is not the pinned one, a refused sign-in, a revoked
device, an unknown account, a protocol version we do not speak, a profile that
cannot be read. Never retrying into a server we do not trust is the point
(fail closed).

When the server closes the connection on purpose for this device (another
connection of the same device signed in to receive, the device was revoked),
the loop ends with ServerRefusedError :data:`SENT_AWAY` and the server's
reason: signing in again would cut off the other connection, which would do
the same, for ever. The caller decides (``bastion chat`` tries again later).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from bastion.client import outbox
from bastion.client._util import TRANSIENT_ERRORS
from bastion.client.client import Client
from bastion.client.events import ConnectionStateEvent, Event
from bastion.client.reconnect import Backoff
from bastion.errors import ServerRefusedError

RETRIED_CODES = TRANSIENT_ERRORS
"""Refusals worth another attempt; any other code ends :func:`stay_connected`."""

LOST = "the connection to the server was lost"
SENT_AWAY = "sent_away"
"""The code of the error that ends the loop when the server closed the connection on purpose."""


def _retried(exc: Exception) -> str | None:
    """Why the attempt failed, if another one may succeed; None if retrying cannot help."""
    if isinstance(exc, ServerRefusedError):
        return exc.message if exc.code in RETRIED_CODES else None
    if isinstance(exc, OSError | TimeoutError):
        return "the network failed"  # the OS's text may hold addresses: not repeated
    return None


async def stay_connected(
    client: Client,
    *,
    backoff: Backoff | None = None,
    sleep: Callable[[float], Awaitable[object]] | None = None,
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[Event | ConnectionStateEvent]:
    """Keep ``client`` connected and receiving; yield its events and each change of state.

    A :class:`ConnectionStateEvent` ``connected`` comes after every sign-in
    (with the kept messages the server confirmed or refused as it opened), one
    ``reconnecting`` before every pause. ``backoff`` says how long to pause
    (default: :class:`Backoff` with its defaults); ``sleep`` and ``clock`` are
    injectable for tests (default: :func:`asyncio.sleep`, :func:`time.monotonic`).

    Runs until the caller stops iterating (the connection is then left as it
    is: :meth:`Client.disconnect` or :meth:`Client.close` ends it) or an error
    that retrying cannot heal is raised: UntrustedServerError,
    AuthenticationError, ProfileError, or ServerRefusedError with a code
    outside :data:`RETRIED_CODES` at sign-in, or :data:`SENT_AWAY` (see the module).
    """
    policy = backoff if backoff is not None else Backoff()
    pause = sleep if sleep is not None else asyncio.sleep
    now = clock if clock is not None else time.monotonic
    while True:
        await client.disconnect()
        try:
            await client.connect(receive=True)
        except Exception as exc:
            reason = _retried(exc)
            if reason is None:
                await client.disconnect()
                raise
            delay = policy.next_delay()
            yield ConnectionStateEvent(
                "reconnecting", reason=reason, retry_in_s=delay, attempt=policy.attempt
            )
            await pause(delay)
            continue
        policy.connected(now())
        # Kept messages went out as the connection opened; queued ones go out now, after them.
        queued_sent, queued_failed = await outbox.send_queued(client)
        yield ConnectionStateEvent(
            "connected",
            sent=(*client.flushed, *queued_sent),
            failed=(*client.failed, *queued_failed),
        )
        try:
            async for event in client.receive():
                yield event
        except ServerRefusedError as exc:
            reason = exc.message  # refused while a delivery was handled: it comes again
        except Exception as exc:
            retried = _retried(exc)
            if retried is None:
                await client.disconnect()
                raise
            reason = retried
        else:
            reason = client.close_reason or LOST
            if client.conn is not None and client.conn.sent_away:
                policy.disconnected(now())
                await client.disconnect()
                raise ServerRefusedError(SENT_AWAY, reason)
        policy.disconnected(now())
        delay = policy.next_delay()
        yield ConnectionStateEvent(
            "reconnecting", reason=reason, retry_in_s=delay, attempt=policy.attempt
        )
        await pause(delay)
