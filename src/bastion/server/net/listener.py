"""The relay's listener: accepts connections, counts them per address, stops them all.

Each accepted connection is a :class:`~bastion.server.net.connection.ClientConnection`
holding the node's :class:`~bastion.server.handlers._context.Services` and
:class:`~bastion.server.handlers._context.Router`, both built once by
:mod:`bastion.server.app`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from picows import WSCloseCode

from bastion.server.config import ServerConfig
from bastion.server.handlers._context import Router, Services
from bastion.server.net.connection import READ_BUFFER_INIT_BYTES, ClientConnection
from bastion.server.net.tls import server_context

if TYPE_CHECKING:
    from bastion.server.net.proxy import ProxiedListener

ConnectionFactory = Callable[["RelayServer"], ClientConnection]


class RelayServer:
    """The relay: accepts connections, authenticates devices, stores and routes ciphertext.

    ``connection`` makes the connection of each accepted socket
    (:class:`ClientConnection` unless a test harness wraps it).
    """

    def __init__(
        self,
        config: ServerConfig,
        services: Services,
        router: Router,
        *,
        connection: ConnectionFactory = ClientConnection,
    ) -> None:
        self.config = config
        self.limits = config.limits
        self.services = services
        self.router = router
        self.store = services.storage.relay
        self.bus = services.bus
        self.connections: set[ClientConnection] = set()
        self.connections_by_address: dict[str, int] = {}
        self.all_closed = asyncio.Event()
        self._connection = connection
        self._proxied: ProxiedListener | None = None

    async def start(self) -> int:
        """Listen; returns the bound port."""
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
        conn = self._connection(self)
        conn.forwarded_address = address
        return conn

    async def stop(self) -> None:
        """Stop accepting and close every connection (the caller closes the storage after)."""
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

    def resync(self) -> None:
        """Re-read every receiving connection's queue from the store (after a bus outage)."""
        for conn in list(self.connections):
            conn.rewind(0)

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
