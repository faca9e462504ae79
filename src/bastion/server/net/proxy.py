"""Client addresses through a TCP load balancer: the PROXY protocol, versions 1 and 2.

A balancer that passes TLS through to the nodes (HAProxy ``send-proxy-v2``,
nginx ``proxy_protocol on``) hides every client behind its own address, and
per-address limits (registrations, sign-in back-off, connections) would count
all clients as one. With ``proxy_protocol_from`` naming the balancers'
networks, a connection from one of them must begin with a PROXY header, read
here before TLS, and the client address it names is the one the relay uses. A
connection from any other address is served as usual: a PROXY header from it
is never believed (it is not TLS, so the handshake fails).

Parsing is done by the ``proxy-protocol`` library; this module only reads the
exact bytes it asks for from the accepted socket, so not one byte of the TLS
handshake that follows is consumed.

The same listener, with no balancer named, serves every connection of a node
that is not behind one: the accept loop is ours in both cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Sequence

import aiofastnet
from picows import WSAutoPingStrategy, WSListener, WSUpgradeRequest

# picows's own protocol class: public API offers it only inside ws_create_server, which
# accepts connections itself. Its constructor is pinned with picows (< 2.4, pyproject).
from picows.picows import WSProtocol  # type: ignore[attr-defined]
from proxyprotocol import (
    ProxyProtocolChecksumError,
    ProxyProtocolIncompleteError,
    ProxyProtocolSyntaxError,
)
from proxyprotocol.detect import ProxyProtocolDetect

from bastion.server.config import Limits, Network

log = logging.getLogger("bastion.server")

# After accept() fails the listener waits this long, doubling up to the maximum.
ACCEPT_RETRY_FIRST_S = 0.05
ACCEPT_RETRY_MAX_S = 1.0
MAX_HEADER_BYTES = 536  # the longest v2 header with addresses and a few TLVs; v1 is at most 107
ListenerFor = Callable[[str], WSListener]


class ProxyHeaderError(Exception):
    """A trusted peer's connection did not start with a valid PROXY header."""


def is_trusted(address: str, networks: Sequence[Network]) -> bool:
    """Whether a peer may tell us who the client is (``address`` as the socket gives it)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = await loop.sock_recv(sock, count - len(data))
        if not chunk:
            raise ProxyHeaderError("the connection closed inside the PROXY header")
        data += chunk
    return bytes(data)


async def _recv_line(loop: asyncio.AbstractEventLoop, sock: socket.socket, room: int) -> bytes:
    # Byte by byte: a v1 header is one short line, and nothing past it may be read.
    data = bytearray()
    while not data.endswith(b"\n"):
        if len(data) >= room:
            raise ProxyHeaderError("the PROXY header is too long")
        data += await _recv_exactly(loop, sock, 1)
    return bytes(data)


async def read_client_address(sock: socket.socket) -> str | None:
    """Read a PROXY header from ``sock``; the client address it names.

    None for a balancer's own connection (v2 ``LOCAL``, such as a health
    check) or a source that is not an IP address (v1 ``UNKNOWN``). Raises
    :class:`ProxyHeaderError` for anything that is not a valid header.
    """
    loop = asyncio.get_running_loop()
    parser = ProxyProtocolDetect()
    data = b""
    while True:
        try:
            result = parser.unpack(data)
            break
        except ProxyProtocolIncompleteError as exc:
            want = exc.want_read
        except (ProxyProtocolSyntaxError, ProxyProtocolChecksumError, ValueError):
            raise ProxyHeaderError("not a valid PROXY header") from None
        room = MAX_HEADER_BYTES - len(data)
        if want.want_bytes is not None:
            if want.want_bytes > room:
                raise ProxyHeaderError("the PROXY header is too long")
            data += await _recv_exactly(loop, sock, want.want_bytes)
        else:
            data += await _recv_line(loop, sock, room)
    source = result.source if result.proxied else None
    if isinstance(source, tuple) and isinstance(
        source[0], ipaddress.IPv4Address | ipaddress.IPv6Address
    ):
        return str(source[0])
    return None


class ProxiedListener:
    """The relay's listener: accepts connections, reads trusted peers' PROXY headers, starts TLS.

    With no trusted peers it is a plain listener. The WebSocket layer is picows's
    own protocol over aiofastnet's TLS, as with ``picows.ws_create_server``; only
    the accept step is ours, so that running out of descriptors backs off and is
    logged once instead of spinning the loop (aiofastnet's own accept loop did).
    """

    def __init__(
        self,
        listener_for: ListenerFor,
        trusted: Sequence[Network],
        context: ssl.SSLContext,
        limits: Limits,
        *,
        read_buffer_bytes: int,
    ) -> None:
        self._listener_for = listener_for
        self._trusted = list(trusted)
        self._context = context
        self._limits = limits
        self._read_buffer_bytes = read_buffer_bytes
        self._socket: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port``; returns the bound port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self._acceptor = asyncio.get_running_loop().create_task(self._accept_forever(sock))
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        """Stop accepting and drop connections still before their TLS handshake."""
        tasks = [t for t in (self._acceptor, *self._pending) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._socket is not None:
            self._socket.close()

    async def _accept_forever(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.0
        failures = 0
        while True:
            try:
                sock, peer = await loop.sock_accept(listening)
            except OSError as exc:
                # Out of descriptors (or kernel memory), say: every retry fails until something
                # closes, so wait, doubling up to a second, and say so once per episode. The
                # connection waits in the backlog meanwhile and is served once there is room.
                if failures == 0:
                    log.warning(
                        "accept.failed",
                        extra={"error": errno.errorcode.get(exc.errno or 0, type(exc).__name__)},
                    )
                failures += 1
                delay = min(max(delay * 2, ACCEPT_RETRY_FIRST_S), ACCEPT_RETRY_MAX_S)
                await asyncio.sleep(delay)
                continue
            if failures:
                log.warning("accept.recovered", extra={"failures": failures})
                delay, failures = 0.0, 0
            task = loop.create_task(self._serve(sock, str(peer[0])))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _serve(self, sock: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        address: str | None = peer
        if is_trusted(peer, self._trusted):
            try:
                address = await asyncio.wait_for(
                    read_client_address(sock), self._limits.tls_handshake_timeout_s
                )
            except (ProxyHeaderError, TimeoutError, OSError) as exc:
                # A balancer's health check connects and closes: nothing to report.
                log.debug("proxy.bad_header", extra={"error": type(exc).__name__})
                sock.close()
                return
        client = address if address is not None else peer
        try:
            await aiofastnet.connect_accepted_socket(
                loop,
                lambda: self._protocol(client),
                sock,
                ssl=self._context,
                ssl_handshake_timeout=self._limits.tls_handshake_timeout_s,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.debug("tls.failed", extra={"error": type(exc).__name__})
            sock.close()

    def _protocol(self, client: str) -> WSProtocol:
        limits = self._limits

        def listener(_request: WSUpgradeRequest) -> WSListener:
            return self._listener_for(client)

        return WSProtocol(
            None,  # host and port: server side
            None,  # path: server side
            False,  # not the client side
            listener,
            logging.getLogger("picows.server"),
            True,  # disconnect on an exception in a callback
            limits.websocket_open_timeout_s,
            True,  # auto ping when idle
            limits.heartbeat_idle_s,
            limits.heartbeat_reply_s,
            WSAutoPingStrategy.PING_WHEN_IDLE,
            True,  # answer pings
            limits.max_frame_bytes,
            None,  # no extra response headers
            self._read_buffer_bytes,  # the read buffer's first size; it grows as needed
        )
