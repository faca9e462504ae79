"""The Unix socket door: JSON-RPC 2.0, one JSON object per line, for the owning OS user only.

The socket lives in the profile folder (0700) and is made 0600 before it
accepts anyone; on Linux the peer's user id is checked as well (SO_PEERCRED),
so a socket handed to another user by a mistaken ``chmod`` still refuses them.
Requests on one connection are answered in order; after ``subscribe``, live
events are written between answers as ``event`` notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from pathlib import Path

from bastion.gateway import rpc
from bastion.gateway.hub import EventHub, Subscription

log = logging.getLogger(__name__)


class UnixSession:
    """One front end on the socket: its writer and, once subscribed, its event pump."""

    def __init__(self, hub: EventHub, writer: asyncio.StreamWriter) -> None:
        self._hub = hub
        self._writer = writer
        self._sub: Subscription | None = None
        self._pump: asyncio.Task[None] | None = None

    @property
    def subscribed(self) -> bool:
        return self._sub is not None

    def subscribe(self, on: bool) -> None:
        if on and self._sub is None:
            self._sub = self._hub.subscribe()
            self._pump = asyncio.create_task(self._forward(self._sub))
        elif not on and self._sub is not None:
            self._sub.close()
            self._sub = None

    async def _forward(self, sub: Subscription) -> None:
        async for event in sub:
            self._writer.write(rpc.notification("event", event).encode() + b"\n")
            await self._writer.drain()
        if sub.overflowed:
            self._writer.close()

    async def close(self) -> None:
        self.subscribe(False)
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await self._pump


def peer_uid(sock: socket.socket | None) -> int | None:
    """The user id of the process at the other end (Linux), or None where it cannot be read."""
    peercred = getattr(socket, "SO_PEERCRED", None)
    if sock is None or peercred is None:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, peercred, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


class UnixDoor:
    """Serves the dispatcher on ``path``."""

    def __init__(self, dispatcher: rpc.Dispatcher, hub: EventHub, path: Path) -> None:
        self._dispatcher = dispatcher
        self._hub = hub
        self.path = path
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return str(self.path)

    async def start(self) -> None:
        if self.path.is_socket() or self.path.exists():
            self.path.unlink()  # left by a gateway that was killed: the lock says none runs
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=rpc.MAX_REQUEST_BYTES + 1
            )
        finally:
            os.umask(old)
        self.path.chmod(0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._sessions):
            task.cancel()
        for task in list(self._sessions):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._sessions.add(task)
        session = UnixSession(self._hub, writer)
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            if uid is not None and uid != os.getuid():
                log.warning("refused a gateway connection from another user")
                return
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    return
                except asyncio.LimitOverrunError:
                    answer = rpc.too_long()
                    writer.write(answer.encode() + b"\n")
                    await writer.drain()
                    return
                if not line.strip():
                    continue
                answer_text = await self._dispatcher.handle(line, session)
                if answer_text is not None:
                    writer.write(answer_text.encode() + b"\n")
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            await session.close()
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
            if task is not None:
                self._sessions.discard(task)
