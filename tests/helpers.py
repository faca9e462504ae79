"""Small helpers shared by the integration tests."""

from __future__ import annotations

import asyncio

from bastion.client import Client, Event, MessageEvent, WarningEvent
from tests.conftest import free_port


async def drain(client: Client) -> list[Event]:
    """Everything queued for the client when it signed in (it must have connected with receive)."""
    return [event async for event in client.receive(until_synced=True)]


async def next_events(client: Client, count: int, *, wait_s: float = 10.0) -> list[Event]:
    """The next ``count`` events of a live connection."""
    events: list[Event] = []

    async def collect() -> None:
        async for event in client.receive():
            events.append(event)
            if len(events) >= count:
                return

    await asyncio.wait_for(collect(), wait_s)
    return events


def texts(events: list[Event]) -> list[str]:
    """The texts of the message events, in order."""
    return [e.record.text for e in events if isinstance(e, MessageEvent)]


def warnings(events: list[Event]) -> list[WarningEvent]:
    """The warning events."""
    return [e for e in events if isinstance(e, WarningEvent)]


class TcpForwarder:
    """A load balancer in miniature: each connection goes to the first backend that answers."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.port = free_port()
        self.url = f"wss://127.0.0.1:{self.port}"
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def greeting(self) -> bytes:
        """Bytes sent to the backend before the client's (a PROXY header, say); none here."""
        return b""

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for port in self.backends:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                continue
        else:
            writer.close()
            return
        if greeting := self.greeting():
            up_writer.write(greeting)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()
