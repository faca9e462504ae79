"""The front end's side of the Unix socket: call methods of a running gateway, receive its events.

The command line uses it when a gateway runs for the profile, so a command
needs no passphrase and opens no second connection to the server::

    async with await GatewayLink.open(profile_dir) as link:
        sent = await link.call("send", to="bob", text="hi")
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from bastion.errors import BastionError, KeyChangedError, ServerRefusedError
from bastion.gateway import paths
from bastion.gateway.rpc import APP_ERROR, MAX_REQUEST_BYTES

LINK_LIMIT = 64 << 20  # an answer may be long: a whole history


class GatewayError(BastionError):
    """The gateway answered with an error; ``code`` is its machine-readable reason."""

    def __init__(self, code: str, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data or {}


class GatewayLink:
    """One connection to a gateway's Unix socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, profile_dir: Path) -> Self:
        """Connect to the profile's gateway; raises OSError when none answers."""
        reader, writer = await asyncio.open_unix_connection(
            str(paths.socket_path(profile_dir)), limit=LINK_LIMIT
        )
        return cls(reader, writer)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def call(self, method: str, **params: Any) -> Any:
        """Call ``method`` and return its result; raises GatewayError (or its Bastion kin)."""
        if self._task.done():
            raise GatewayError("gateway_gone", "the gateway closed the connection")
        req_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[req_id] = future
        line = json.dumps({"jsonrpc": "2.0", "id": req_id, "method": method, "params": params})
        if len(line) > MAX_REQUEST_BYTES:
            raise ValueError("the request is too long for the gateway")
        try:
            self._writer.write(line.encode() + b"\n")
            await self._writer.drain()
        except ConnectionError:
            self._waiting.pop(req_id, None)
            raise GatewayError("gateway_gone", "the gateway closed the connection") from None
        answer = await future
        if "error" in answer:
            raise error_of(answer["error"])
        return answer.get("result")

    async def events(self) -> Any:
        """Yield the live events (after ``subscribe``) until the gateway closes the link."""
        while True:
            event = await self._events.get()
            if event is None:
                return
            yield event

    async def _read(self) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                message = json.loads(line)
                if "id" in message and message["id"] in self._waiting:
                    future = self._waiting.pop(message["id"])
                    if not future.done():
                        future.set_result(message)
                elif message.get("method") == "event":
                    self._events.put_nowait(message.get("params", {}))
        except (ConnectionError, ValueError):
            pass
        finally:
            lost = GatewayError("gateway_gone", "the gateway closed the connection")
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(lost)
            self._waiting.clear()
            self._events.put_nowait(None)


def error_of(error: dict[str, Any]) -> BastionError:
    """The exception for a JSON-RPC error object: a refusal keeps its code."""
    message = str(error.get("message", "the gateway refused"))
    data = error.get("data") if isinstance(error.get("data"), dict) else {}
    assert_dict: dict[str, Any] = data or {}
    code = str(assert_dict.get("code", "error"))
    if error.get("code") == APP_ERROR and code == "key_changed":
        return KeyChangedError(str(assert_dict.get("user", "")))
    if error.get("code") == APP_ERROR and code in {"disconnected", "timeout", "unreachable"}:
        return ServerRefusedError(code, message)
    return GatewayError(code, message, assert_dict)
