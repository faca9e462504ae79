"""One client's WebSocket connection: picows callbacks, outbox, back-pressure, the guard.

Each connection holds a sans-I/O :class:`~bastion.protocol.auth.ServerSession` and
implements :class:`~bastion.server.handlers._context.Request`, which is all a
handler sees of it. The sender of a message is always the connection's
authenticated device, never a field of a frame. Delivery is cursor-based: a
device receives its queue in order, live envelopes are pushed as they are
stored, and at most ``delivery_window`` envelopes are unacknowledged at a time
(the rest wait in the store, not in memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
)

from bastion.errors import AuthenticationError, BastionError, ProtocolError
from bastion.protocol import frames
from bastion.protocol.auth import ServerSession
from bastion.protocol.codes import ErrorCode
from bastion.ratelimit import address_key
from bastion.server.cluster.local import Bus, BusEvent, KeysLow, Kick, Push, RateHandover
from bastion.server.config import Limits, ServerConfig
from bastion.server.core.delivery import DeliveryWindow, Step
from bastion.server.handlers import contacts, messages
from bastion.server.handlers._context import INTERNAL_MESSAGE, REFUSED_MESSAGE, Router, Services
from bastion.server.storage.interfaces import QueuedEnvelope, Store

log = logging.getLogger("bastion.server")

_OUTBOX_FLUSH_BYTES = 256 * 1024  # frames queued past this leave at once, not at iteration end
_WS_LEN_16 = 126  # payload lengths from here on take a 16-bit length field
_WS_LEN_64 = 1 << 16  # and from here on a 64-bit one

# Each connection's read buffer starts this small and doubles when a frame needs more.
# Most connections are idle and most frames are under 1 KiB: at picows's default of
# 16 KiB, an idle TLS connection cost 52 KiB of memory; at 2 KiB it costs 38 KiB
# (docs/benchmarks.md).
READ_BUFFER_INIT_BYTES = 2048

# The kernel's send buffer of a connection (Linux doubles it for its bookkeeping). Past
# it, frames wait in the transport, whose high-water mark (64 KiB) tells the connection
# that the client does not read (pause_writing): it is cut off after slow_reader_grace_s.
# With the kernel's autotuning (up to 4 MiB) a client that never read held a megabyte
# there unnoticed until the heartbeat cut it.
KERNEL_SEND_BUFFER_BYTES = 128 * 1024


class Node(Protocol):
    """What a connection uses of the listener that accepted it (``net/listener.RelayServer``)."""

    config: ServerConfig
    limits: Limits
    services: Services
    router: Router
    store: Store
    bus: Bus
    connections: set[ClientConnection]
    all_closed: asyncio.Event

    def admit(self, address: str) -> bool: ...
    def release(self, address: str) -> None: ...


class ClientConnection(WSListener):
    """One client's WebSocket connection; holds the sans-I/O session state."""

    def __init__(self, server: Node) -> None:
        super().__init__()
        self.server = server
        self.services = server.services
        self._routes = server.router.routes  # the dict itself: one lookup per frame
        self.limits = server.limits
        self.session = ServerSession(
            server_name=server.config.server_name,
            challenge_ttl=self.limits.challenge_ttl_s,
            max_attempts=self.limits.signin_attempts_per_connection,
        )
        self.transport: WSTransport | None = None
        self.address = "unknown"
        self.limit_key = "unknown"  # what per-address limits count the address as
        self.forwarded_address: str | None = None  # the client's, as a trusted balancer says
        self.bad_frames = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._stores_in_flight = 0  # messages relayed without a task (see hold)
        self._closed = False
        self._admitted = False
        self._paused_reading = False
        self._signin_timer: asyncio.TimerHandle | None = None
        self._slow_timer: asyncio.TimerHandle | None = None
        # delivery state
        self._window = DeliveryWindow(self.limits.delivery_window)
        self._receiving = False
        self._acks_to_store: list[int] = []
        self._outbox: list[bytes] = []
        self._outbox_bytes = 0
        self._loop = asyncio.get_running_loop()  # a connection lives in one loop
        # Push topics this connection asked for (features: contacts and presence).
        self.topics: set[str] = set()
        # What handlers hold for this connection and let go of when it closes (uploads).
        self._releases: dict[str, Callable[[], None]] = {}

    # --- picows callbacks -------------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        if self.forwarded_address is not None:
            self.address = self.forwarded_address
        else:
            peer = transport.underlying_transport.get_extra_info("peername")
            self.address = str(peer[0]) if peer else "unknown"
        self.limit_key = address_key(self.address)  # an IPv6 client counts as its /64
        sock = transport.underlying_transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, KERNEL_SEND_BUFFER_BYTES)
        self.server.connections.add(self)
        if not self.server.admit(self.limit_key):
            self.services.limit_log.hit("connections_per_address", self.limit_key)
            self.close(WSCloseCode.TRY_AGAIN_LATER, "too many connections from your address")
            return
        self._admitted = True
        loop = asyncio.get_running_loop()
        self._signin_timer = loop.call_later(
            self.limits.signin_timeout_s,
            self.close,
            WSCloseCode.POLICY_VIOLATION,
            "sign-in timeout",
        )
        self.reply(self.session.challenge(time.monotonic(), secrets.token_bytes(32)))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            self._flush()
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type is not WSMsgType.BINARY or not frame.fin:
            self._bad_frame("only whole binary frames are accepted")
            return
        self.dispatch(frame.get_payload_as_bytes())

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._closed = True
        self.server.connections.discard(self)
        if not self.server.connections:
            self.server.all_closed.set()
        if self._admitted:
            self._admitted = False
            self.server.release(self.limit_key)
        for timer in (self._signin_timer, self._slow_timer):
            if timer is not None:
                timer.cancel()
        if self._receiving and self.session.username and self.session.device_id:
            self.server.bus.unsubscribe(
                self.session.username, self.session.device_id, self._on_bus_event
            )
            self.spawn(None, contacts.device_offline(self, self.services))
        if self.session.username and self.session.device_id:
            self.spawn(
                None,
                messages.hand_over_message_rate(
                    self.services, self.session.username, self.session.device_id
                ),
            )
        for release in self._releases.values():
            release()
        self._releases.clear()
        # Running requests are left to finish (an acknowledgement already read must still be
        # stored); their replies go nowhere because the connection is closed.

    def pause_writing(self) -> None:
        loop = asyncio.get_running_loop()
        if self._slow_timer is None:
            self._slow_timer = loop.call_later(self.limits.slow_reader_grace_s, self._cut_off)

    def resume_writing(self) -> None:
        if self._slow_timer is not None:
            self._slow_timer.cancel()
            self._slow_timer = None

    # --- plumbing -----------------------------------------------------------------------------

    def close(self, code: WSCloseCode, reason: str) -> None:
        """Close the connection with a WebSocket close code."""
        if self._closed or self.transport is None:
            return
        self._flush()
        self._closed = True
        self.transport.send_close(code, reason.encode())
        self.transport.disconnect()
        # A graceful disconnect waits for the buffer to drain; a peer that never
        # reads would keep its socket and buffer forever, so it gets a deadline.
        asyncio.get_running_loop().call_later(self.limits.shutdown_grace_s, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.disconnect(graceful=False)

    def _cut_off(self) -> None:
        """Drop a client that does not read: reset the socket rather than close it.

        A close frame would never be read, and a graceful close leaves the socket in
        FIN-WAIT-1 with everything the kernel buffered for the client; a reset (linger
        0) frees it at once.
        """
        transport = self.transport
        if transport is None or transport.is_disconnected:
            return
        log.info("connection.not_reading")
        self._closed = True
        sock = transport.underlying_transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.disconnect(graceful=False)

    def abort(self) -> None:
        """Drop the connection at once, without waiting for the peer."""
        self._closed = True
        if self.transport is not None:
            self.transport.disconnect(graceful=False)

    def reply(self, frame: frames.Frame) -> None:
        """Send a frame to this client (nothing once closed); see :class:`Request`."""
        # Frames queue up until the end of this loop iteration, then leave in one
        # write: one TLS record and one system call however many were sent.
        if self._closed or self.transport is None:
            return
        data = frames.encode(frame)
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox.append(data)
        self._outbox_bytes += len(data)
        if self._outbox_bytes >= _OUTBOX_FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        out, self._outbox, self._outbox_bytes = self._outbox, [], 0
        transport = self.transport
        if (
            not out
            or transport is None
            or transport.is_close_frame_sent
            or transport.is_disconnected
        ):
            return
        if len(out) == 1:
            transport.send(WSMsgType.BINARY, out[0])
        else:
            transport.underlying_transport.write(b"".join(map(_binary_frame, out)))
        buffered = transport.underlying_transport.get_write_buffer_size()
        if buffered > self.limits.max_write_buffer_bytes:
            log.warning("connection.slow_reader", extra={"buffered": buffered})
            self._cut_off()

    # --- the Request interface of handlers (bastion.server.handlers._context) ------------------

    @property
    def closed(self) -> bool:
        """True once the connection is closing or gone."""
        return self._closed

    def signed_in(self) -> tuple[str, str]:
        """The signed-in (username, device id); raises ProtocolError before sign-in."""
        return self.session.require_signed_in()

    def refuse(self, req: int | None, code: ErrorCode, message: str) -> None:
        """Answer a request with an error frame (the message cut to the wire limit)."""
        self.services.metrics.count_error(code)
        self.reply(frames.Error(req=req, code=code, message=message[:256]))

    def watch(self, topic: str) -> None:
        """Send this connection the bus's pushes on ``topic``."""
        self.topics.add(topic)

    def on_close(self, key: str, release: Callable[[], None]) -> None:
        """Call ``release`` when the connection closes."""
        self._releases[key] = release

    def hold(self) -> None:
        """Count a store call answered in a callback (a message: no task) as in flight."""
        self._stores_in_flight += 1
        self._hold_back_if_busy()

    def release(self) -> None:
        """The store call counted by :meth:`hold` answered."""
        self._stores_in_flight -= 1
        self._resume_if_idle()

    def spawn(self, req: int | None, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task counted against the requests in flight; errors answer ``req``."""
        task = self._loop.create_task(self._guard(req, work))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        self._hold_back_if_busy()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._resume_if_idle()

    def _hold_back_if_busy(self) -> None:
        """Stop reading while ``requests_in_flight`` requests (tasks and stores) are open."""
        busy = len(self._tasks) + self._stores_in_flight
        if busy >= self.limits.requests_in_flight and self.transport is not None:
            self.transport.underlying_transport.pause_reading()
            self._paused_reading = True

    def _resume_if_idle(self) -> None:
        busy = len(self._tasks) + self._stores_in_flight
        if self._paused_reading and busy < self.limits.requests_in_flight // 2:
            self._paused_reading = False
            if self.transport is not None and not self._closed:
                self.transport.underlying_transport.resume_reading()

    async def _guard(self, req: int | None, work: Awaitable[None]) -> None:
        started = time.perf_counter()
        try:
            await work
            self.services.metrics.observe(getattr(work, "__name__", "request").lstrip("_"), started)
        except AuthenticationError as exc:
            log.info("signin.failed", extra={"reason": str(exc)})
            self.refuse(req, ErrorCode.AUTH_FAILED, "sign-in failed")
            self.rechallenge()
        except ProtocolError as exc:
            # A deliberate refusal: its code and text are the protocol's.
            self.refuse(req, exc.code, str(exc))
        except BastionError as exc:
            # Our state, not the peer's fault: its text may be the database's own
            # (schema and constraint names), so the peer gets a fixed message and
            # the log the error's type.
            log.warning("request.failed", extra={"error": type(exc).__name__})
            self.refuse(req, ErrorCode.REFUSED, REFUSED_MESSAGE)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request.crashed")
            self.refuse(req, ErrorCode.INTERNAL, INTERNAL_MESSAGE)

    def rechallenge(self) -> None:
        """A new challenge after a failed attempt, or the close after the last one."""
        if self.session.attempts >= self.limits.signin_attempts_per_connection:
            self.close(WSCloseCode.POLICY_VIOLATION, "too many sign-in attempts")
        else:
            self.reply(self.session.challenge(time.monotonic(), secrets.token_bytes(32)))

    # --- dispatch -----------------------------------------------------------------------------

    def _bad_frame(self, reason: str) -> None:
        self.bad_frames += 1
        self.refuse(None, ErrorCode.BAD_FRAME, reason)
        if self.bad_frames >= self.limits.bad_frames_before_close:
            self.close(WSCloseCode.POLICY_VIOLATION, "too many malformed frames")

    def dispatch(self, data: bytes) -> None:
        """Decode one binary frame from the client and hand it to its route."""
        try:
            frame = frames.decode_client_frame(data, max_bytes=self.limits.max_frame_bytes)
        except ProtocolError as exc:
            self._bad_frame(str(exc))
            return
        route = self._routes.get(type(frame))
        if route is not None and (route.before_signin or self.session.username is not None):
            if route.inline:  # the message fast path: no task
                route.handler(self, self.services, frame)
            else:
                self.spawn(getattr(frame, "req", None), route.handler(self, self.services, frame))
        elif self.session.username is None:
            self.refuse(getattr(frame, "req", None), ErrorCode.NOT_SIGNED_IN, "sign in first")
        else:
            self.refuse(
                getattr(frame, "req", None), ErrorCode.BAD_FRAME, "this server does not handle that"
            )

    # --- sign-in ------------------------------------------------------------------------------

    async def bind(self, req: int, username: str, device_id: str, *, receive: bool) -> None:
        """Bind the connection to a device, answer ``signed_in`` and start delivery."""
        if self._closed:
            return
        if self._signin_timer is not None:
            self._signin_timer.cancel()
            self._signin_timer = None
        # Before any message of this connection is read as signed in.
        await messages.take_message_rate(self.services, username, device_id)
        if self._closed:
            self.spawn(None, messages.hand_over_message_rate(self.services, username, device_id))
            return
        self.session.authenticated(username, device_id)
        count = await self.server.store.count_one_time_keys(username, device_id)
        self.reply(
            frames.SignedIn(req=req, username=username, device_id=device_id, one_time_keys=count)
        )
        if receive:
            self._receiving = True
            self.server.bus.subscribe(username, device_id, self._on_bus_event)
            self.spawn(None, contacts.device_online(self, self.services))
            self._start_catch_up()

    # --- delivery -----------------------------------------------------------------------------

    def _on_bus_event(self, event: BusEvent) -> None:
        if isinstance(event, Kick):
            self.close(WSCloseCode.POLICY_VIOLATION, event.reason)
        elif isinstance(event, Push):
            if event.topic in self.topics:
                self.reply(event.frame)
        elif isinstance(event, KeysLow):
            self.reply(frames.KeysLow(one_time_keys=event.count))
        elif isinstance(event, RateHandover):
            if self._closed:
                return  # this connection's own bucket is being handed over
            username, device_id = self.session.require_signed_in()
            self.spawn(None, messages.take_message_rate(self.services, username, device_id))
        elif not self._closed:
            step = self._window.notice(event.seq)
            if step is Step.PUSH:
                self._push(event)
            elif step is Step.READ:
                self.spawn(None, self._catch_up())

    def rewind(self, after_seq: int) -> None:
        """Re-read this device's queue from the store after ``after_seq``.

        Envelopes still unacknowledged on this connection are not sent again; one
        acknowledged but not yet deleted may be (the client drops it by message id).
        """
        if not self._receiving or self._closed:
            return
        if self._window.rewind(after_seq):
            self.spawn(None, self._catch_up())

    def _push(self, envelope: QueuedEnvelope) -> None:
        """Send an envelope that the delivery window counted as sent."""
        self.reply(
            frames.Deliver(
                seq=envelope.seq,
                sender=envelope.sender,
                sender_device=envelope.sender_device,
                server_ts=envelope.server_ts,
                kind=envelope.kind,
                body=envelope.body,
            )
        )

    def _start_catch_up(self) -> None:
        if self._window.start_reading():
            self.spawn(None, self._catch_up())

    async def _catch_up(self) -> None:
        """The page reader: one at a time, started when the window says so."""
        username, device_id = self.session.require_signed_in()
        window = self._window
        try:
            while not self._closed:
                read = window.next_read()
                if read is None:
                    return
                rows = await self.server.store.fetch_queue(
                    username, device_id, read.after, read.limit
                )
                page = window.page_read(read, rows)
                for row in page.push:
                    self._push(row)
                if page.synced:
                    self.reply(frames.Synced())
                if not page.more:
                    return
        finally:
            window.reading_stopped()

    def ack(self, seqs: list[int]) -> None:
        """Acknowledgements of delivered envelopes (the ``ack`` frame)."""
        username, device_id = self.session.require_signed_in()
        if not self._receiving:
            self.refuse(None, ErrorCode.NOT_RECEIVING, "this connection receives nothing")
            return
        start_reading = self._window.ack(seqs)
        # Acknowledgements that arrive in one read are deleted in one store call.
        if not self._acks_to_store:
            self._loop.call_soon(self._flush_acks, username, device_id)
        self._acks_to_store.extend(seqs)
        if start_reading:
            self.spawn(None, self._catch_up())

    def _flush_acks(self, username: str, device_id: str) -> None:
        seqs, self._acks_to_store = self._acks_to_store, []
        if seqs:
            self.spawn(None, self._store_ack(username, device_id, seqs))

    async def _store_ack(self, username: str, device_id: str, seqs: list[int]) -> None:
        await self.server.store.ack(username, device_id, seqs)


def _binary_frame(payload: bytes) -> bytes:
    """One final, unmasked binary WebSocket frame (RFC 6455 section 5.2), as a server sends it."""
    size = len(payload)
    if size < _WS_LEN_16:
        return bytes((0x82, size)) + payload
    if size < _WS_LEN_64:
        return struct.pack("!BBH", 0x82, 126, size) + payload
    return struct.pack("!BBQ", 0x82, 127, size) + payload
