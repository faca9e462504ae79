"""Shared fixtures: a real server process on 127.0.0.1 and real client profiles."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from bastion.client import Client, contacts
from bastion.errors import ProfileError
from tests.malicious_server import RECORD_ENV, SCRIPT, TAMPER_ENV

PASSPHRASE = "correct horse battery staple"
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``bastion server run`` in a child process, with its data folder and logs."""

    def __init__(self, data_dir: Path, port: int, *, script: list[str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = port
        self.url = f"wss://127.0.0.1:{port}"
        self.fingerprint = ""
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.script = script
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout = b""

    def start(self, *, wait_s: float = 20.0) -> None:
        """Start the process and wait until it prints that it listens."""
        command = self.script or [sys.executable, "-m", "bastion", "server", "run"]
        args = [*command, "--data", str(self.data_dir), "--port", str(self.port)]
        env = {**os.environ, "BASTION_LOG_LEVEL": "DEBUG", "PYTHONUNBUFFERED": "1"}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, env=env, cwd=REPO)
        log.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + wait_s
        out = b""
        while b"certificate SHA256:" not in out:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"server did not start: {out!r}\n{self.log_text()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                out += chunk
        self.stdout = out
        line = next(x for x in out.decode().splitlines() if x.startswith("certificate "))
        self.fingerprint = line.split(" ", 1)[1]

    def log_text(self) -> str:
        """Everything the server wrote to standard error."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        finally:
            self._drain()

    def kill(self) -> None:
        """SIGKILL: no chance to flush or close anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._drain()

    def _drain(self) -> None:
        if self.proc is not None and self.proc.stdout is not None and not self.proc.stdout.closed:
            self.stdout += self.proc.stdout.read() or b""
            self.proc.stdout.close()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers on demand; every one is stopped at the end of the test."""
    started: list[ServerProcess] = []

    def start(name: str = "server", *, script: list[str] | None = None) -> ServerProcess:
        server = ServerProcess(tmp_path / name, free_port(), script=script)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """One running server with a fresh data folder."""
    return server_factory()


class Profiles:
    """Registers users on a server, each with a real profile folder."""

    def __init__(self, root: Path, server: ServerProcess) -> None:
        self.root = root
        self.server = server
        self.clients: list[Client] = []

    def path(self, username: str) -> Path:
        return self.root / "profiles" / username

    async def register(self, username: str) -> Client:
        client = await Client.register(
            self.path(username),
            PASSPHRASE,
            username=username,
            server_url=self.server.url,
            fingerprint=self.server.fingerprint,
        )
        self.clients.append(client)
        return client

    async def online(self, username: str, *, receive: bool = True) -> Client:
        """Register ``username`` (if needed) and connect."""
        path = self.path(username)
        if (path / "profile.json").exists():
            client = Client.open(path, PASSPHRASE)
            self.clients.append(client)
        else:
            client = await self.register(username)
        await client.connect(receive=receive)
        return client

    async def befriend(self, a: str, b: str) -> None:
        """Make ``a`` and ``b`` accepted contacts (strangers cannot message each other).

        Uses each user's latest open client (registering the user if needed); a
        client that is not connected is connected for this and disconnected after.
        """
        first, first_temporary = await self._usable(a)
        second, second_temporary = await self._usable(b)
        try:
            await contacts.request(first, b, notify=False)
            await contacts.act(second, a, "accept")
        finally:
            for client, temporary in ((first, first_temporary), (second, second_temporary)):
                if temporary and client.conn is not None:
                    await client.conn.aclose()
                    client.conn = None

    async def _usable(self, username: str) -> tuple[Client, bool]:
        """The user's latest open client, and whether it was connected just now."""
        for client in reversed(self.clients):
            if client.account.username != username:
                continue
            try:
                client.profile.get("account", bytes)
            except sqlite3.ProgrammingError:
                continue  # closed
            except ProfileError:
                pass
            if client.conn is not None:
                return client, False
            await client.connect(receive=False)
            return client, True
        client = await self.online(username, receive=False)
        return client, True

    async def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()


@pytest.fixture
async def profiles(tmp_path: Path, server: ServerProcess) -> AsyncIterator[Profiles]:
    """Clients for the default server."""
    p = Profiles(tmp_path, server)
    yield p
    await p.close()


@pytest.fixture
async def recorded(
    tmp_path: Path,
    server_factory: Callable[..., ServerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[ServerProcess, Profiles]]:
    """A server recording every frame (honest otherwise), and clients for it."""
    monkeypatch.setenv(TAMPER_ENV, "record")
    monkeypatch.setenv(RECORD_ENV, str(tmp_path / "frames.txt"))
    server = server_factory("server", script=SCRIPT)
    profiles = Profiles(tmp_path, server)
    yield server, profiles
    await profiles.close()
