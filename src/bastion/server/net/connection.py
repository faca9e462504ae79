"""The relay: authenticated WebSocket connections over TLS, and routing between them.

Each connection holds a sans-I/O :class:`~bastion.protocol.auth.ServerSession`.
The sender of a message is always the connection's authenticated device, never
a field of a frame. Delivery is cursor-based: a device receives its queue in
order, live envelopes are pushed as they are stored, and at most
``delivery_window`` envelopes are unacknowledged at a time (the rest wait in
the store, not in memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
)

from bastion.crypto.device import verify_published_key
from bastion.errors import AuthenticationError, BastionError, ProtocolError
from bastion.protocol import frames
from bastion.protocol.auth import ServerSession
from bastion.ratelimit import BackoffRules, RateLimiter, address_key
from bastion.server import features as _features  # noqa: F401 - registers feature handlers
from bastion.server import handlers
from bastion.server.admin.policy import Policy
from bastion.server.admin.watch import AdminChannel
from bastion.server.audit.log import AuditLog
from bastion.server.cluster.local import Bus, BusEvent, KeysLow, Kick, Push, RateHandover
from bastion.server.config import ServerConfig
from bastion.server.handlers import contacts, device_lists, devices
from bastion.server.metrics import RelayMetrics
from bastion.server.net.tls import server_context
from bastion.server.storage.interfaces import (
    AccountRecord,
    Copy,
    DeviceMismatchError,
    KeyRecord,
    NotContactsError,
    QueuedEnvelope,
    QueueFullError,
    Store,
    StoredMessage,
    UnknownRecipientError,
    UsernameTakenError,
)

if TYPE_CHECKING:
    from bastion.server.net.proxy import ProxiedListener

log = logging.getLogger("bastion.server")

_FETCH_PAGE = 256
_OUTBOX_FLUSH_BYTES = 256 * 1024  # frames queued past this leave at once, not at iteration end
_WS_LEN_16 = 126  # payload lengths from here on take a 16-bit length field
_WS_LEN_64 = 1 << 16  # and from here on a 64-bit one


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


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


class RelayServer:
    """The relay: accepts connections, authenticates devices, stores and routes ciphertext."""

    connection_class: type[ClientConnection]

    def __init__(self, config: ServerConfig, store: Store, bus: Bus) -> None:
        self.config = config
        self.limits = config.limits
        self.store = store
        self.bus = bus
        self.connections: set[ClientConnection] = set()
        self._proxied: ProxiedListener | None = None
        limits = self.limits
        self.connection_class = ClientConnection
        self.keys_low_notified: set[tuple[str, str]] = set()
        self.all_closed = asyncio.Event()
        # State that features built on the relay keep per server (their stores, caches).
        self.extensions: dict[str, object] = {}
        self.signin_backoff = BackoffRules(
            base_delay=limits.signin_backoff_base_s,
            max_delay=limits.signin_backoff_max_s,
            free_failures=limits.signin_free_failures,
        )
        self.messages_by_device: RateLimiter[tuple[str, str]] = RateLimiter(
            limits.messages_per_second, limits.messages_burst
        )
        self.connections_by_address: dict[str, int] = {}
        # One audit record per limit and key per minute: a flood must not flood the log.
        self._limit_audits: RateLimiter[tuple[str, str]] = RateLimiter(1 / 60.0, 1)
        self.audit: AuditLog | None = None
        self.admin: AdminChannel | None = None
        self.metrics: RelayMetrics | None = None

    async def start(self) -> int:
        """Listen; returns the bound port."""
        # The contact service hears of users whose node died (a cluster's bus tells one
        # node each), so it must listen before anyone has signed in here.
        await contacts.service(self)
        # The accept loop is ours (not the transport library's): when the process runs out
        # of descriptors it backs off and logs once instead of spinning (bastion.server.net.proxy).
        from bastion.server.net.proxy import ProxiedListener  # noqa: PLC0415 - imports aiofastnet

        self._proxied = ProxiedListener(
            self._listener_for,
            self.config.proxy_protocol_from,
            server_context(self.config.data_dir),
            self.limits,
            read_buffer_bytes=READ_BUFFER_INIT_BYTES,
        )
        return await self._proxied.start(self.config.host, self.config.port)

    def _listener_for(self, address: str) -> ClientConnection:
        """A connection from ``address``: the peer's, or the client's as a balancer told us."""
        conn = self.connection_class(self)
        conn.forwarded_address = address
        return conn

    async def stop(self) -> None:
        """Stop accepting, close every connection, then let the store finish."""
        if self._proxied is not None:
            await self._proxied.close()
        for conn in list(self.connections):
            conn.close(WSCloseCode.GOING_AWAY, "server shutting down")
        # Clients get a moment to answer the close; one that does not is cut off,
        # so a stuck peer can never hold the shutdown (and the store) hostage.
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_closed.wait(), self.limits.shutdown_grace_s)
        for conn in list(self.connections):
            conn.abort()
        await self.store.close()

    def resync(self) -> None:
        """Re-read every receiving connection's queue from the store (after a bus outage)."""
        for conn in list(self.connections):
            conn.rewind(0)

    async def allow_claim(self, requester: str, target: str) -> bool:
        """Token buckets on key claims per requester and per (requester, target) pair.

        The pair limit is what stops one account from draining another's
        one-time keys to force fallback-key sessions (Prekey Pogo). Both are
        counted across every node of a cluster (:meth:`Bus.take`).
        """
        limits = self.limits
        if requester != target and not await self.bus.take(
            "key_claims_per_target",
            f"{requester}/{target}",
            limits.key_claims_per_target_per_hour / 3600.0,
            limits.key_claims_per_target_burst,
        ):
            return False
        return await self.bus.take(
            "key_claims", requester, limits.key_claims_per_minute / 60.0, limits.key_claims_burst
        )

    async def allow_registration(self, address: str) -> bool:
        """The per-address registration bucket, counted across every node."""
        limits = self.limits
        return await self.bus.take(
            "registrations_per_address",
            address,
            limits.registrations_per_address_per_hour / 3600.0,
            limits.registrations_per_address_burst,
        )

    # Sign-in back-off, counted across every node (Bus.record_failure): by address, and
    # by (address, account) so that failures from elsewhere never lock the owner out.

    async def signin_wait(self, address: str, username: str) -> float:
        """Seconds a sign-in from this address for this account must wait (0: go ahead)."""
        return max(
            await self.bus.failure_wait("signin_by_address", address),
            await self.bus.failure_wait("signin_by_account", f"{address}/{username}"),
        )

    async def signin_failed(self, address: str, username: str) -> None:
        """Count a failed sign-in against the address and the account."""
        await self.bus.record_failure("signin_by_address", address, self.signin_backoff)
        await self.bus.record_failure(
            "signin_by_account", f"{address}/{username}", self.signin_backoff
        )

    async def signin_succeeded(self, address: str, username: str) -> None:
        """Forget the account's failures from this address; the address's count only decays."""
        await self.bus.clear_failures("signin_by_account", f"{address}/{username}")

    # A device's message rate is checked in this node's memory (messages_by_device) and
    # moves with the device between nodes (Bus.hand_over_rate, Bus.take_rate).

    async def take_message_rate(self, username: str, device_id: str) -> None:
        """Carry over the bucket the device left on the node it last used, if any."""
        limits = self.limits
        tokens = await self.bus.take_rate(
            username, device_id, limits.messages_per_second, limits.messages_burst
        )
        if tokens is not None:
            self.messages_by_device.lower((username, device_id), tokens, time.monotonic())

    async def hand_over_message_rate(self, username: str, device_id: str) -> None:
        """Leave the device's bucket for the node it signs in on next (a full one needs nothing)."""
        limits = self.limits
        tokens = self.messages_by_device.tokens((username, device_id), time.monotonic())
        if tokens < limits.messages_burst:
            await self.bus.hand_over_rate(
                username, device_id, tokens, limits.messages_per_second, limits.messages_burst
            )

    @property
    def policy(self) -> Policy:
        """The organisation policy as of the last admin poll (defaults without one)."""
        return self.admin.policy if self.admin is not None else Policy()

    def audit_event(self, event: str, **fields: object) -> None:
        """Append a security event to the audit log, if one is open; failures are logged."""
        if self.audit is None:
            return
        try:
            self.audit.append(event, time.time(), **fields)
        except BastionError as exc:
            log.error("audit.failed", extra={"error": type(exc).__name__})

    def limit_hit(self, limit: str, key: str) -> None:
        """Log a limit that refused a request, and audit it at most once a minute per key."""
        log.info("limit.hit", extra={"limit": limit})
        if self.metrics is not None:
            self.metrics.limit_hits.labels(limit).inc()
        if self._limit_audits.allow((limit, key), time.monotonic()):
            self.audit_event("limit.hit", limit=limit, key=key[:200])

    def admit(self, address: str) -> bool:
        """Count a new connection from ``address``; False if it already has the maximum."""
        count = self.connections_by_address.get(address, 0)
        if count >= self.limits.connections_per_address:
            return False
        self.connections_by_address[address] = count + 1
        return True

    def release(self, address: str) -> None:
        """Forget a connection counted by :meth:`admit`."""
        count = self.connections_by_address.get(address, 0) - 1
        if count > 0:
            self.connections_by_address[address] = count
        else:
            self.connections_by_address.pop(address, None)

    def sign_out_user(self, username: str, reason: str) -> int:
        """Close every connection of ``username`` on this node; returns how many."""
        closing = [c for c in self.connections if c.session.username == username]
        for conn in closing:
            conn.close(WSCloseCode.POLICY_VIOLATION, reason)
        return len(closing)


class ClientConnection(WSListener):
    """One client's WebSocket connection; holds the sans-I/O session state."""

    def __init__(self, server: RelayServer) -> None:
        super().__init__()
        self.server = server
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
        self._stores_in_flight = 0  # messages relayed without a task (see _relay)
        self._closed = False
        self._admitted = False
        self._paused_reading = False
        self._signin_timer: asyncio.TimerHandle | None = None
        self._slow_timer: asyncio.TimerHandle | None = None
        # delivery state
        self._cursor = 0
        self._unacked: set[int] = set()
        self._catching_up = False
        self._dirty = False
        self._synced = False
        self._receiving = False
        self._acks_to_store: list[int] = []
        self._outbox: list[bytes] = []
        self._outbox_bytes = 0
        self._loop = asyncio.get_running_loop()  # a connection lives in one loop
        # Push topics this connection asked for (features: contacts and presence).
        self.topics: set[str] = set()
        # What features hold for this connection and let go of when it closes (uploads).
        self.on_disconnect: dict[str, Callable[[], None]] = {}

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
            self.server.limit_hit("connections_per_address", self.limit_key)
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
        self._send(self.session.challenge(time.monotonic(), secrets.token_bytes(32)))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            self._flush()
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type is not WSMsgType.BINARY or not frame.fin:
            self._bad_frame("only whole binary frames are accepted")
            return
        self._dispatch(frame.get_payload_as_bytes())

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
            self._spawn(None, contacts.device_offline(self))
        if self.session.username and self.session.device_id:
            self._spawn(
                None,
                self.server.hand_over_message_rate(self.session.username, self.session.device_id),
            )
        for release in self.on_disconnect.values():
            release()
        self.on_disconnect.clear()
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

    def _send(self, frame: frames.Frame) -> None:
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

    @property
    def disconnected(self) -> bool:
        """True once the connection is gone (``on_disconnect`` has run or never will)."""
        return self.transport is not None and self.transport.is_disconnected

    def send_frame(self, frame: frames.Frame) -> None:
        """Send a frame to this client (no-op once closed)."""
        self._send(frame)

    def refuse(self, req: int | None, code: str, message: str) -> None:
        """Answer a request with an error frame."""
        self._refuse(req, frames_error(code, message))

    async def signed_in(self, req: int, username: str, device_id: str, receive: bool) -> None:
        """Bind the connection to a device and start delivery."""
        await self._signed_in(req, username, device_id, receive)

    def _refuse(self, req: int | None, error: frames.Error) -> None:
        if self.server.metrics is not None:
            self.server.metrics.errors.labels(error.code).inc()
        self._send(frames.Error(req=req, code=error.code, message=error.message))

    def _spawn(self, req: int | None, work: Coroutine[Any, Any, None]) -> None:
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
            if self.server.metrics is not None:
                request = getattr(work, "__name__", "request").lstrip("_")
                self.server.metrics.latency.labels(request).observe(time.perf_counter() - started)
        except AuthenticationError as exc:
            log.info("signin.failed", extra={"reason": str(exc)})
            self._refuse(req, frames_error("auth_failed", "sign-in failed"))
            self._rechallenge()
        except ProtocolError as exc:
            self._refuse(req, frames_error(exc.code, str(exc)))
        except BastionError as exc:
            # Our state, not the peer's fault: its text may be the database's own
            # (schema and constraint names), so the peer gets a fixed message and
            # the log the error's type.
            log.warning("request.failed", extra={"error": type(exc).__name__})
            self._refuse(req, REFUSED)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request.crashed")
            self._refuse(req, frames_error("internal", "the server failed to handle the request"))

    def _rechallenge(self) -> None:
        if self.session.attempts >= self.limits.signin_attempts_per_connection:
            self.close(WSCloseCode.POLICY_VIOLATION, "too many sign-in attempts")
        else:
            self._send(self.session.challenge(time.monotonic(), secrets.token_bytes(32)))

    # --- dispatch -----------------------------------------------------------------------------

    def _bad_frame(self, reason: str) -> None:
        self.bad_frames += 1
        self._refuse(None, frames_error("bad_frame", reason))
        if self.bad_frames >= self.limits.bad_frames_before_close:
            self.close(WSCloseCode.POLICY_VIOLATION, "too many malformed frames")

    def _dispatch(self, data: bytes) -> None:
        try:
            frame = frames.decode_client_frame(data, max_bytes=self.limits.max_frame_bytes)
        except ProtocolError as exc:
            self._bad_frame(str(exc))
            return
        # The frames of every message first; neither has a handler before sign-in.
        if type(frame) is frames.Send and self.session.username is not None:
            self._relay(frame)
            return
        if type(frame) is frames.Ack and self.session.username is not None:
            self._ack(frame.seqs)
            return
        if isinstance(frame, frames.Register):
            self._spawn(frame.req, self._register(frame))
            return
        if isinstance(frame, frames.SignIn):
            self._spawn(frame.req, self._signin(frame))
            return
        if isinstance(frame, frames.AddDevice):
            self._spawn(frame.req, devices.add_device(self, frame))
            return
        if isinstance(frame, frames.LinkJoin):
            self._spawn(frame.req, devices.link_join(self, frame))
            return
        early = handlers.BEFORE_SIGNIN.get(type(frame))
        if early is not None:
            self._spawn(getattr(frame, "req", None), early(self, frame))
            return
        if self.session.username is None:
            req = None if isinstance(frame, frames.Ack) else frame.req
            self._refuse(req, frames_error("not_signed_in", "sign in first"))
            return
        if isinstance(frame, frames.Send):
            self._relay(frame)
        elif isinstance(frame, frames.Ack):
            self._ack(frame.seqs)
        elif isinstance(frame, frames.QueryKeys):
            self._spawn(frame.req, self._query_keys(frame))
        elif isinstance(frame, frames.ClaimKeys):
            self._spawn(frame.req, self._claim_keys(frame))
        elif isinstance(frame, frames.LinkOpen):
            self._spawn(frame.req, devices.link_open(self, frame))
        elif isinstance(frame, frames.LinkAnswer):
            self._spawn(frame.req, devices.link_answer(self, frame))
        elif isinstance(frame, frames.RevokeDevice):
            self._spawn(frame.req, devices.revoke_device(self, frame))
        elif isinstance(frame, frames.UploadKeys):
            self._spawn(frame.req, self._upload_keys(frame))
        else:
            handler = handlers.SIGNED_IN.get(type(frame))
            req = getattr(frame, "req", None)
            if handler is None:
                self._refuse(req, frames_error("bad_frame", "this server does not handle that"))
            else:
                self._spawn(req, handler(self, frame))

    # --- sign-in and registration -------------------------------------------------------------

    async def _may_register(self, frame: frames.Register) -> bool:
        """Registration policy and the per-address limit; refuses and returns False if not."""
        mode = self.server.policy.registration
        if mode == "closed":
            code, message = "registration_closed", "this server does not accept new accounts"
        elif mode == "invite" and frame.invite is None:
            code, message = "invite_required", "this server accepts new accounts by invite only"
        elif not await self.server.allow_registration(self.limit_key):
            self.server.limit_hit("registrations_per_address", self.limit_key)
            code, message = "rate_limited", "too many registrations from your address; try later"
        else:
            return True
        if code != "rate_limited":
            self.server.audit_event(
                "registration.refused", reason=code, user=frame.username, address=self.address
            )
        self._refuse(frame.req, frames_error(code, message))
        return False

    async def _take_invite(self, frame: frames.Register) -> tuple[bool, str | None]:
        """Under an invite-only policy, take one use of the frame's invite code.

        Returns whether the registration may go on, and the code whose use was taken:
        None when no use was (no invite needed; a code sent anyway is left alone), so a
        failed registration gives back only a use it took.
        """
        if self.server.policy.registration != "invite":
            return True, None
        admin = self.server.admin
        if frame.invite is not None and admin is not None and await admin.use_invite(frame.invite):
            return True, frame.invite
        self.server.audit_event(
            "registration.refused", reason="bad_invite", user=frame.username, address=self.address
        )
        self._refuse(
            frame.req, frames_error("bad_invite", "the invite code is unknown, used up or expired")
        )
        self._rechallenge()
        return False, None

    async def _register(self, frame: frames.Register) -> None:
        if not await self._may_register(frame):
            return
        nonce = self.session.take_nonce(time.monotonic())
        device = frame.device
        record = devices.verify_new_device(
            server_name=self.session.server_name,
            nonce=nonce,
            username=frame.username,
            identity_key=frame.identity_key,
            device=device,
            signature=frame.signature,
            one_time_keys=frame.one_time_keys,
            fallback_key=frame.fallback_key,
        )
        may_register, invite_taken = await self._take_invite(frame)
        if not may_register:
            return
        now = _now_ms()
        try:
            await self.server.store.create_account(
                AccountRecord(frame.username, frame.identity_key, now),
                record,
                [KeyRecord(k.key, k.signature) for k in frame.one_time_keys],
                KeyRecord(frame.fallback_key.key, frame.fallback_key.signature),
            )
        except UsernameTakenError:
            if invite_taken is not None and self.server.admin is not None:
                await self.server.admin.return_invite(invite_taken)
            self._refuse(frame.req, frames_error("username_taken", "that username is taken"))
            self._send(self.session.challenge(time.monotonic(), secrets.token_bytes(32)))
            return
        log.info("account.registered")
        self.server.audit_event(
            "account.registered",
            user=frame.username,
            device=device.device_id,
            address=self.address,
            invited=invite_taken is not None,
        )
        await self._signed_in(frame.req, frame.username, device.device_id, frame.receive)

    async def _signin(self, frame: frames.SignIn) -> None:
        wait = await self.server.signin_wait(self.limit_key, frame.username)
        if wait > 0:
            self.server.limit_hit("signin_backoff", f"{self.limit_key} {frame.username}")
            self._refuse(
                frame.req,
                frames_error(
                    "rate_limited", f"too many failed sign-ins; try again in {wait:.0f} s"
                ),
            )
            self.session.attempts += 1  # waiting it out still spends this connection's tries
            self._rechallenge()
            return
        nonce = self.session.take_nonce(time.monotonic())
        device = await self.server.store.get_device(frame.username, frame.device_id)
        account = await self.server.store.get_account(frame.username)
        try:
            if device is None or account is None or account.disabled:
                raise AuthenticationError("unknown device or disabled account")
            self.session.verify_answer(
                nonce=nonce,
                username=frame.username,
                device_id=frame.device_id,
                device_ed25519=device.ed25519,
                signature=frame.signature,
            )
        except AuthenticationError as exc:
            await self.server.signin_failed(self.limit_key, frame.username)
            self.server.audit_event(
                "signin.failed", user=frame.username, address=self.address, reason=str(exc)[:200]
            )
            raise
        await self.server.signin_succeeded(self.limit_key, frame.username)
        log.info("signin.ok")
        self.server.audit_event(
            "signin.ok", user=frame.username, device=frame.device_id, address=self.address
        )
        await self._signed_in(frame.req, frame.username, frame.device_id, frame.receive)

    async def _signed_in(self, req: int, username: str, device_id: str, receive: bool) -> None:
        if self._closed:
            return
        if self._signin_timer is not None:
            self._signin_timer.cancel()
            self._signin_timer = None
        # Before any message of this connection is read as signed in.
        await self.server.take_message_rate(username, device_id)
        if self._closed:
            self._spawn(None, self.server.hand_over_message_rate(username, device_id))
            return
        self.session.authenticated(username, device_id)
        count = await self.server.store.count_one_time_keys(username, device_id)
        self._send(
            frames.SignedIn(req=req, username=username, device_id=device_id, one_time_keys=count)
        )
        if receive:
            self._receiving = True
            self.server.bus.subscribe(username, device_id, self._on_bus_event)
            self._spawn(None, contacts.device_online(self))
            self._start_catch_up()

    # --- keys ---------------------------------------------------------------------------------

    async def _query_keys(self, frame: frames.QueryKeys) -> None:
        account = await self.server.store.get_account(frame.user)
        if account is None:
            self._refuse(
                frame.req, frames_error("unknown_user", f"there is no user named {frame.user}")
            )
            return
        devices = await self.server.store.list_devices(frame.user)
        device_list = await device_lists.latest_frame(self.server, frame.user, account.identity_key)
        self._send(
            frames.KeysResult(
                req=frame.req,
                user=frame.user,
                identity_key=account.identity_key,
                devices=[
                    frames.DeviceKeys(
                        device_id=d.device_id,
                        ed25519=d.ed25519,
                        curve25519=d.curve25519,
                        created_at=d.created_at,
                        certificate=d.certificate,
                    )
                    for d in devices
                ],
                device_list=device_list,
            )
        )

    async def _claim_keys(self, frame: frames.ClaimKeys) -> None:
        requester, _ = self.session.require_signed_in()
        if not await self.server.allow_claim(requester, frame.user):
            log.info("limit.hit", extra={"limit": "key_claims"})
            self._refuse(
                frame.req, frames_error("rate_limited", "too many key claims; wait a minute")
            )
            return
        claimed = await self.server.store.claim_keys(frame.user)
        self._send(
            frames.ClaimResult(
                req=frame.req,
                user=frame.user,
                keys=[
                    frames.ClaimedKey(
                        device_id=k.device_id, key=k.key, signature=k.signature, fallback=k.fallback
                    )
                    for k in claimed
                ],
            )
        )
        for k in claimed:
            device = (frame.user, k.device_id)
            if device in self.server.keys_low_notified:
                continue  # told once; the next notice waits until the device uploads
            count = await self.server.store.count_one_time_keys(frame.user, k.device_id)
            if count < self.limits.one_time_keys_low:
                self.server.keys_low_notified.add(device)
                self.server.bus.publish(frame.user, k.device_id, KeysLow(count))

    async def _upload_keys(self, frame: frames.UploadKeys) -> None:
        username, device_id = self.session.require_signed_in()
        device = await self.server.store.get_device(username, device_id)
        if device is None:
            raise AuthenticationError("device no longer exists")
        for key in frame.one_time_keys:
            verify_published_key(device.ed25519, device_id, key.key, key.signature, fallback=False)
        if frame.fallback_key is not None:
            fb = frame.fallback_key
            verify_published_key(device.ed25519, device_id, fb.key, fb.signature, fallback=True)
        current = await self.server.store.count_one_time_keys(username, device_id)
        if current + len(frame.one_time_keys) > self.limits.one_time_keys_max:
            self._refuse(frame.req, frames_error("too_many_keys", "one-time key stock is full"))
            return
        self.server.keys_low_notified.discard((username, device_id))
        await self.server.store.add_one_time_keys(
            username,
            device_id,
            [KeyRecord(k.key, k.signature) for k in frame.one_time_keys],
            None
            if frame.fallback_key is None
            else KeyRecord(frame.fallback_key.key, frame.fallback_key.signature),
        )
        self._send(frames.Ok(req=frame.req))

    # --- messages -----------------------------------------------------------------------------

    def _relay(self, frame: frames.Send) -> None:
        """Store a message and answer ``sent``, without a task in the common case.

        A message between accepted contacts takes one store call, which checks the
        pair and the recipient's queue in the storing transaction. Everything else
        (a request's note, group co-members, a refusal) then follows the full
        contact rules in a task (:meth:`_relay_checked`).
        """
        started = time.perf_counter()
        device = self.session.require_signed_in()
        sender, sender_device = device
        if frame.to == sender:
            self._refuse(frame.req, frames_error("bad_recipient", "you cannot message yourself"))
            self._observe_relay(started)
            return
        if not self.server.messages_by_device.allow(device, time.monotonic()):
            self.server.limit_hit("messages_per_device", f"{sender}/{sender_device}")
            self._refuse(frame.req, frames_error("rate_limited", "sending too fast; slow down"))
            self._observe_relay(started)
            return
        # A room key travels on its group's path: its kind tells the recipient that
        # only a room key may be inside (docs/protocol.md §8.7).
        path = 0 if frame.group_id is None else frames.ROOM_KEY_PATH
        copies = [Copy(c.user, c.device_id, path + c.kind, c.body) for c in frame.ciphertexts]
        stored = self._store(frame, sender, sender_device, copies, contacts_only=True)
        self._stores_in_flight += 1
        self._hold_back_if_busy()
        stored.add_done_callback(
            functools.partial(self._relay_stored, frame, device, copies, started)
        )

    def _relay_stored(
        self,
        frame: frames.Send,
        device: tuple[str, str],
        copies: list[Copy],
        started: float,
        stored: asyncio.Future[StoredMessage],
    ) -> None:
        """The store answered a message of :meth:`_relay` (a positional partial: no kwargs dict)."""
        self._stores_in_flight -= 1
        self._resume_if_idle()
        if stored.cancelled():
            return
        exc = stored.exception()
        if exc is None:
            self._relayed(frame, stored.result())
        elif isinstance(exc, NotContactsError):
            # Timed apart, as ``relay_checked``.
            sender, sender_device = device
            self._spawn(frame.req, self._relay_checked(frame, sender, sender_device, copies))
            return
        elif not self._refuse_message(frame, exc):
            if isinstance(exc, BastionError):
                log.warning("request.failed", extra={"error": type(exc).__name__})
                self._refuse(frame.req, REFUSED)
            else:
                log.error("request.crashed", exc_info=exc)
                self._refuse(
                    frame.req, frames_error("internal", "the server failed to handle the request")
                )
        self._observe_relay(started)

    async def _relay_checked(
        self, frame: frames.Send, sender: str, sender_device: str, copies: list[Copy]
    ) -> None:
        if not await contacts.check_may_send(
            self.server, sender, frame.to, frame.client_msg_id, group_id=frame.group_id
        ):
            self._send(frames.Sent(req=frame.req, server_ts=_now_ms()))  # dropped: blocked
            return
        try:
            stored = await self._store(frame, sender, sender_device, copies, contacts_only=False)
        except (UnknownRecipientError, QueueFullError, DeviceMismatchError) as exc:
            self._refuse_message(frame, exc)
            return
        self._relayed(frame, stored)

    def _refuse_message(self, frame: frames.Send, exc: BaseException) -> bool:
        """Answer a refusal of the store; False if ``exc`` is not one."""
        if isinstance(exc, UnknownRecipientError):
            self._refuse(
                frame.req, frames_error("unknown_user", f"there is no user named {frame.to}")
            )
        elif isinstance(exc, QueueFullError):
            self.server.limit_hit("offline_queue", frame.to)
            self._refuse(
                frame.req,
                frames_error("queue_full", f"{frame.to} has too many undelivered messages"),
            )
        elif isinstance(exc, DeviceMismatchError):
            detail = "missing " + ",".join(exc.missing) + "; extra " + ",".join(exc.extra)
            self._refuse(frame.req, frames_error("device_mismatch", detail[:256]))
        else:
            return False
        return True

    def _observe_relay(self, started: float) -> None:
        if self.server.metrics is not None:
            self.server.metrics.latency.labels("relay").observe(time.perf_counter() - started)

    def _relayed(self, frame: frames.Send, stored: StoredMessage) -> None:
        self._send(frames.Sent(req=frame.req, server_ts=stored.server_ts))
        if self.server.metrics is not None:
            self.server.metrics.messages.inc()
        for envelope in stored.envelopes:
            self.server.bus.publish(envelope.user, envelope.device_id, envelope)

    def _store(
        self,
        frame: frames.Send,
        sender: str,
        sender_device: str,
        copies: list[Copy],
        *,
        contacts_only: bool,
    ) -> asyncio.Future[StoredMessage]:
        return self.server.store.submit_message(
            sender=sender,
            sender_device=sender_device,
            client_msg_id=frame.client_msg_id,
            recipient=frame.to,
            server_ts=_now_ms(),
            copies=copies,
            queue_max=self.limits.offline_queue_max,
            contacts_only=contacts_only,
        )

    # --- delivery -----------------------------------------------------------------------------

    def _on_bus_event(self, event: BusEvent) -> None:
        if isinstance(event, Kick):
            self.close(WSCloseCode.POLICY_VIOLATION, event.reason)
        elif isinstance(event, Push):
            if event.topic in self.topics:
                self._send(event.frame)
        elif isinstance(event, KeysLow):
            self._send(frames.KeysLow(one_time_keys=event.count))
        elif isinstance(event, RateHandover):
            if self._closed:
                return  # this connection's own bucket is being handed over
            username, device_id = self.session.require_signed_in()
            self._spawn(None, self.server.take_message_rate(username, device_id))
        elif event.seq <= self._cursor and event.seq not in self._unacked:
            # Overtaken by a later envelope (stored through another node or another
            # database connection): re-read from just before it rather than skip it.
            self.rewind(event.seq - 1)
        elif self._catching_up or len(self._unacked) >= self.limits.delivery_window:
            self._dirty = True
        elif event.seq > self._cursor:
            self._push(event)

    def rewind(self, after_seq: int) -> None:
        """Re-read this device's queue from the store after ``after_seq``.

        Envelopes still unacknowledged on this connection are not sent again; one
        acknowledged but not yet deleted may be (the client drops it by message id).
        """
        if not self._receiving or self._closed:
            return
        self._cursor = min(self._cursor, after_seq)
        self._dirty = True
        self._start_catch_up()

    def _push(self, envelope: QueuedEnvelope) -> None:
        self._cursor = max(self._cursor, envelope.seq)
        self._unacked.add(envelope.seq)
        self._send(
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
        if not self._catching_up:
            self._catching_up = True
            self._spawn(None, self._catch_up())

    async def _catch_up(self) -> None:
        username, device_id = self.session.require_signed_in()
        try:
            while not self._closed:
                room = self.limits.delivery_window - len(self._unacked)
                if room <= 0:
                    self._dirty = True
                    return
                self._dirty = False
                limit = min(_FETCH_PAGE, room)
                rows = await self.server.store.fetch_queue(username, device_id, self._cursor, limit)
                for row in rows:
                    if row.seq in self._unacked:
                        self._cursor = max(self._cursor, row.seq)
                    elif row.seq > self._cursor:
                        self._push(row)
                if len(rows) < limit and not self._dirty:
                    if not self._synced:
                        self._synced = True
                        self._send(frames.Synced())
                    return
        finally:
            self._catching_up = False

    def _ack(self, seqs: list[int]) -> None:
        username, device_id = self.session.require_signed_in()
        if not self._receiving:
            self._refuse(None, frames_error("not_receiving", "this connection receives nothing"))
            return
        self._unacked.difference_update(seqs)
        # Acknowledgements that arrive in one read are deleted in one store call.
        if not self._acks_to_store:
            self._loop.call_soon(self._flush_acks, username, device_id)
        self._acks_to_store.extend(seqs)
        if self._dirty and len(self._unacked) <= self.limits.delivery_window // 2:
            self._start_catch_up()

    def _flush_acks(self, username: str, device_id: str) -> None:
        seqs, self._acks_to_store = self._acks_to_store, []
        if seqs:
            self._spawn(None, self._store_ack(username, device_id, seqs))

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


def frames_error(code: str, message: str) -> frames.Error:
    """An error frame with a message cut to the wire limit."""
    return frames.Error(req=None, code=code, message=message[:256])


# What the peer is told when a request failed on our side (a StateError, say): never the
# error's own text, which may come from the database driver.
REFUSED = frames_error("refused", "the server could not complete the request")
