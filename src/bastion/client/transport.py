"""The client's connection to a server: WebSocket over TLS with a pinned certificate.

Trust in the server is its certificate's SHA-256 fingerprint, pinned on first
use (or given by the user). The fingerprint is checked as soon as the TLS
handshake completes and before any frame is sent; a mismatch closes the
connection and raises :class:`~bastion.errors.UntrustedServerError`.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bastion.errors import BastionError, FrameError, ServerRefusedError, UntrustedServerError
from bastion.protocol import frames
from bastion.tlsprofile import fingerprint, pinning_client_context

log = logging.getLogger("bastion.client")

Incoming = frames.ServerFrame


@dataclass
class _Closed:
    reason: str


class _Listener(WSListener):
    def __init__(self, conn: ServerConnection) -> None:
        super().__init__()
        self.conn = conn

    def on_ws_connected(self, transport: WSTransport) -> None:
        ssl_object = transport.underlying_transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der is None:
            self.conn.fail(UntrustedServerError("the server did not present a certificate"))
            transport.disconnect(graceful=False)
            return
        seen = fingerprint(der)
        self.conn.fingerprint = seen
        pin = self.conn.pin
        if pin is not None and not hmac.compare_digest(seen.lower(), pin.lower()):
            if self.conn.pin_given:
                # Nothing was pinned yet: the user typed or pasted a fingerprint that is wrong.
                self.conn.fail(
                    UntrustedServerError(
                        f"the server's certificate is {seen}, not the fingerprint you gave "
                        f"({pin}); check it with the server's operator (bastion server "
                        "fingerprint --data DIR prints it on the server) and try again"
                    )
                )
                transport.disconnect(graceful=False)
                return
            self.conn.fail(
                UntrustedServerError(
                    f"the server's certificate changed: expected {pin}, got {seen}. "
                    "Someone may be intercepting the connection. If the operator really "
                    "replaced the certificate, confirm the new fingerprint with them by "
                    "another channel before trusting it (register takes it as --fingerprint)."
                )
            )
            transport.disconnect(graceful=False)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            self.conn.close_reason = frame.get_close_reason() or "closed by the server"
            self.conn.sent_away = frame.get_close_code() == WSCloseCode.POLICY_VIOLATION
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        if frame.msg_type is not WSMsgType.BINARY:
            return
        try:
            decoded = frames.decode_server_frame(frame.get_payload_as_bytes())
        except FrameError as exc:
            log.warning("frame.rejected", extra={"reason": str(exc)})
            return
        self.conn.on_frame(decoded)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.conn.on_disconnected()


class ServerConnection:
    """One open connection; requests are matched to replies by request id."""

    def __init__(self, pin: str | None) -> None:
        self.pin = pin
        self.pin_given = False  # the user gave ``pin`` for a new profile (see ``open``)
        self.fingerprint: str | None = None
        self.close_reason: str | None = None
        # The server closed this connection on purpose, for this device (another connection
        # of it signed in, it was revoked, it misbehaved), not because it is going away.
        self.sent_away = False
        self.incoming: asyncio.Queue[Incoming | _Closed] = asyncio.Queue()
        self._transport: WSTransport | None = None
        self._pending: dict[int, asyncio.Future[frames.ServerFrame]] = {}
        # Link pushes someone waits for, by slot: they go to the linking flow, not to
        # ``incoming``, so a receive loop running meanwhile (the gateway's) takes none.
        self._link_waiters: dict[bytes, asyncio.Future[frames.LinkPush]] = {}
        self._ids = itertools.count(1)
        self._challenge: asyncio.Future[frames.Challenge] = (
            asyncio.get_running_loop().create_future()
        )
        self._failure: BastionError | None = None
        self.disconnected = asyncio.Event()

    @classmethod
    async def open(
        cls, url: str, *, pin: str | None, pin_given: bool = False, wait_s: float = 10.0
    ) -> ServerConnection:
        """Connect to ``wss://HOST:PORT`` and wait for the server's challenge.

        ``pin_given`` says the fingerprint was given by the user for a new profile
        (not pinned earlier), which changes what a mismatch means.
        """
        if not url.startswith("wss://"):
            raise UntrustedServerError("the server address must start with wss://")
        conn = cls(pin)
        conn.pin_given = pin_given
        factory: Callable[[], _Listener] = lambda: _Listener(conn)  # noqa: E731
        try:
            transport, _ = await asyncio.wait_for(
                ws_connect(
                    factory,
                    url,
                    ssl_context=pinning_client_context(),
                    max_frame_size=frames.MAX_FRAME_BYTES,
                    enable_auto_ping=True,
                    auto_ping_idle_timeout=30,
                    auto_ping_reply_timeout=15,
                    logger_name="client",
                ),
                wait_s,
            )
        except (OSError, TimeoutError):
            raise ServerRefusedError(
                "unreachable", f"cannot reach {url}: is the server running?"
            ) from None
        except Exception as exc:  # picows raises its own handshake errors
            if conn._failure is not None:
                raise conn._failure from None
            raise ServerRefusedError("unreachable", f"cannot connect to {url}: {exc}") from None
        conn._transport = transport
        if conn._failure is not None:
            raise conn._failure
        try:
            await asyncio.wait_for(asyncio.shield(conn._challenge), wait_s)
        except TimeoutError:
            conn.close()
            raise ServerRefusedError("timeout", "the server did not greet us in time") from None
        if conn._failure is not None:
            raise conn._failure
        return conn

    # --- callbacks from the listener --------------------------------------------------------

    def fail(self, error: BastionError) -> None:
        self._failure = error
        self._wake_all(error)

    def on_frame(self, frame: frames.ServerFrame) -> None:
        if isinstance(frame, frames.Challenge):
            if self._challenge.done():
                loop = asyncio.get_running_loop()
                self._challenge = loop.create_future()
            self._challenge.set_result(frame)
        elif isinstance(frame, frames.LinkPush) and frame.slot in self._link_waiters:
            waiter = self._link_waiters.pop(frame.slot)
            if not waiter.done():
                waiter.set_result(frame)
        elif not hasattr(frame, "req"):
            # Frames without a request id are pushes: deliveries, notices, link messages.
            self.incoming.put_nowait(frame)
        else:
            req = frame.req
            future = self._pending.pop(req, None) if req is not None else None
            if future is not None and not future.done():
                future.set_result(frame)
            elif isinstance(frame, frames.Error):
                log.warning("server.error", extra={"code": frame.code})

    def on_disconnected(self) -> None:
        reason = self.close_reason or "the connection to the server was lost"
        self._wake_all(ServerRefusedError("disconnected", reason))
        self.incoming.put_nowait(_Closed(reason))
        self.disconnected.set()

    def _wake_all(self, error: BastionError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        for waiter in self._link_waiters.values():
            if not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # retrieved: its flow may have stopped waiting
        self._link_waiters.clear()
        if not self._challenge.done():
            self._challenge.set_exception(error)
            self._challenge.exception()  # retrieved: nobody may be waiting for it

    # --- use ----------------------------------------------------------------------------------

    @property
    def challenge(self) -> frames.Challenge:
        """The newest challenge the server issued (raises if none or failed)."""
        return self._challenge.result()

    def link_push(self, slot: bytes) -> asyncio.Future[frames.LinkPush]:
        """The next link push for ``slot``, routed here instead of to ``incoming``.

        Ask before the slot can be answered; the future fails if the connection drops.
        """
        if self._failure is not None:
            raise self._failure
        if self.disconnected.is_set():
            raise ServerRefusedError("disconnected", "not connected to the server")
        waiter: asyncio.Future[frames.LinkPush] = asyncio.get_running_loop().create_future()
        self._link_waiters[slot] = waiter
        return waiter

    def next_req(self) -> int:
        """A fresh request id."""
        return next(self._ids)

    async def request(
        self, frame: frames.Frame, req: int, *, wait_s: float = 30.0
    ) -> frames.ServerFrame:
        """Send a request frame and wait for its reply; an error reply raises ServerRefusedError.

        A frame the protocol's strict schema refuses (the server would answer it
        with an error that names no request) raises ValueError at once, unsent.
        """
        if self._failure is not None:
            raise self._failure
        if self._transport is None or self.disconnected.is_set():
            raise ServerRefusedError("disconnected", "not connected to the server")
        data = frames.encode(frame)
        try:
            frames.decode_client_frame(data)
        except FrameError as exc:
            raise ValueError(f"not sent, the server would refuse it: {exc}") from None
        future: asyncio.Future[frames.ServerFrame] = asyncio.get_running_loop().create_future()
        self._pending[req] = future
        self._transport.send(WSMsgType.BINARY, data)
        try:
            reply = await asyncio.wait_for(future, wait_s)
        except TimeoutError:
            self._pending.pop(req, None)
            raise ServerRefusedError("timeout", "the server did not answer in time") from None
        if isinstance(reply, frames.Error):
            raise ServerRefusedError(reply.code, reply.message)
        return reply

    def send(self, frame: frames.Frame) -> None:
        """Send a frame that has no reply (an acknowledgement)."""
        if self._transport is not None and not self.disconnected.is_set():
            self._transport.send(WSMsgType.BINARY, frames.encode(frame))

    def send_raw(self, data: bytes) -> None:
        """Send already-encoded bytes (tests use this to act as a misbehaving client)."""
        if self._transport is not None:
            self._transport.send(WSMsgType.BINARY, data)

    def close(self) -> None:
        """Close gracefully."""
        if self._transport is not None and not self.disconnected.is_set():
            self._transport.send_close(WSCloseCode.OK)
            self._transport.disconnect()

    async def aclose(self) -> None:
        """Close and wait until the connection is down."""
        self.close()
        if self._transport is not None:
            try:
                await asyncio.wait_for(self.disconnected.wait(), 5)
            except TimeoutError:
                self._transport.disconnect(graceful=False)
