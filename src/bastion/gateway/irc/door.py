"""The IRC door: a TCP listener on the loopback, at most :data:`MAX_CLIENTS` IRC clients.

IRC has no encryption here, so the door listens on a loopback address only
(:func:`check_host`): the password (the gateway's token) and every message
stay on this machine. The socket is bound when the door is built, so the
address (with the port the system picked for port 0) is known before the
gateway says it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket

from bastion.errors import ConfigError
from bastion.gateway.context import GatewayContext
from bastion.gateway.irc import protocol
from bastion.gateway.irc.session import IrcSession

log = logging.getLogger(__name__)
MAX_CLIENTS = 8


def check_host(host: str) -> str:
    """The address to bind for ``host``; raises ConfigError unless it is a loopback address."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ConfigError(
            f"the IRC door listens on a loopback address only (127.0.0.1 or ::1), not {host!r}: "
            "IRC is not encrypted, and the password and messages must not leave this machine"
        )
    return str(address)


class IrcDoor:
    """Serves IRC clients for the gateway's account on a loopback TCP port."""

    def __init__(
        self,
        ctx: GatewayContext,
        token: str,
        host: str,
        port: int,
        *,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.ctx = ctx
        self.token = token
        self.host = check_host(host)
        self.max_clients = max_clients
        if not 0 <= port <= 65535:
            raise ConfigError(f"the IRC port is a number from 0 to 65535, not {port}")
        self.sessions: set[IrcSession] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((self.host, port))
            self._sock.listen(16)
            self._sock.setblocking(False)
        except OSError as exc:
            self._sock.close()
            raise ConfigError(
                f"the IRC door cannot listen on port {port}: {exc.strerror}"
            ) from None
        self.port = int(self._sock.getsockname()[1])

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"irc://{host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, sock=self._sock, limit=protocol.MAX_CLIENT_LINE_BYTES
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        else:
            self._sock.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    def echo(self, origin: IrcSession, target: str, text: str) -> None:
        """Show a message our user sent from one IRC client on the others, as theirs."""
        for session in list(self.sessions):
            if session is not origin and session.registered:
                session.show_own(target, text)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if len(self.sessions) >= self.max_clients:
                log.warning("refused an IRC client: %d are connected", len(self.sessions))
                writer.write(
                    protocol.line(
                        None, "ERROR", f"Closing link: at most {self.max_clients} IRC clients"
                    )
                )
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                return
            session = IrcSession(self, reader, writer)
            self.sessions.add(session)
            try:
                await session.run()
            finally:
                self.sessions.discard(session)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError, OSError):
                await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)
