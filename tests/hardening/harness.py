"""A server process started with a ``bastion.toml`` of chosen limits, and small probes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from bastion.client.transport import ServerConnection
from tests.conftest import REPO, ServerProcess, free_port


class ConfiguredServers:
    """Start servers whose data folder holds a ``bastion.toml`` written first."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[ServerProcess] = []

    def start(self, name: str = "server", /, **limits: float) -> ServerProcess:
        data_dir = self.root / name
        data_dir.mkdir(mode=0o700, parents=True)
        lines = ["[limits]", *(f"{key} = {value}" for key, value in limits.items())]
        (data_dir / "bastion.toml").write_text("\n".join(lines) + "\n")
        server = ServerProcess(data_dir, free_port())
        server.start()
        self.started.append(server)
        return server


def admin(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``bastion admin --data DIR ARGS...`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "bastion", "admin", "--data", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


async def greeting_time(server: ServerProcess) -> float:
    """Seconds a fresh client needs to connect, finish TLS and get the challenge."""
    started = time.monotonic()
    conn = await ServerConnection.open(server.url, pin=server.fingerprint, wait_s=5)
    elapsed = time.monotonic() - started
    await conn.aclose()
    return elapsed


async def wait_closed(reader: asyncio.StreamReader, limit_s: float) -> float:
    """Read until the server closes the stream; returns how long it took (fails past limit)."""
    started = time.monotonic()
    async with asyncio.timeout(limit_s):
        while await reader.read(65536):
            pass
    return time.monotonic() - started
