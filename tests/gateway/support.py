"""A real ``bastion gateway`` process for tests, and helpers to reach it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from bastion.gateway.link import GatewayLink
from tests.conftest import PASSPHRASE, REPO, ServerProcess
from tests.test_cli import befriend, register


class GatewayProcess:
    """``bastion gateway --json`` for one profile, in a child process."""

    def __init__(self, profile: Path, *extra: str) -> None:
        self.profile = profile
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}
        self.log_path = profile.parent / f"{profile.name}-gateway.log"

    def start(
        self,
        *,
        wait_s: float = 30.0,
        env: dict[str, str] | None = None,
        passphrase: str | None = PASSPHRASE,
        expect: str = "gateway_ready",
    ) -> dict[str, Any]:
        """Start it and wait for its first line (``expect`` is its type); returns that line."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        environ["PYTHONUNBUFFERED"] = "1"
        if passphrase is not None:
            environ["BASTION_PASSPHRASE"] = passphrase
        environ.update(env or {})
        command = [sys.executable, "-m", "bastion", "gateway", "--json", "--no-notify"]
        args = [*command, "--profile", str(self.profile), *self.extra]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=environ,
            cwd=REPO,
        )
        log.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + wait_s
        out = b""
        while b"\n" not in out:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"gateway did not start: {out!r}\n{self.log_text()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                out += os.read(self.proc.stdout.fileno(), 4096)
        self.ready = json.loads(out.split(b"\n", 1)[0])
        assert self.ready["type"] == expect, self.ready
        return self.ready

    def next_line(self, wait_s: float = 30.0) -> str:
        """The next line the gateway prints (after the first)."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], wait_s)
        assert ready, "the gateway printed nothing more"
        return self.proc.stdout.readline().decode()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=45)  # closing waits up to 5 s per connection
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    async def link(self) -> GatewayLink:
        return await GatewayLink.open(self.profile)


@contextlib.contextmanager
def gateways(*found: GatewayProcess) -> Iterator[tuple[GatewayProcess, ...]]:
    try:
        yield found
    finally:
        for gw in found:
            gw.kill()


def pair(server: ServerProcess, root: Path) -> tuple[Path, Path]:
    """alice and bob registered with the CLI, and accepted contacts."""
    alice = register(server, "alice", root)
    bob = register(server, "bob", root)
    befriend(alice, "alice", bob, "bob")
    return alice, bob


async def until(condition: Callable[[], bool], what: str, *, wait_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class Events:
    """Collects the live events of a subscribed link in a task."""

    def __init__(self, link: GatewayLink) -> None:
        self.link = link
        self.seen: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for event in self.link.events():
            self.seen.append(event)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.seen if e.get("type") == kind]

    def texts_in(self) -> list[str]:
        return [e["text"] for e in self.of("message") if "state" not in e]

    async def wait_for(
        self, test: Callable[[dict[str, Any]], bool], what: str, *, wait_s: float = 30.0
    ) -> dict[str, Any]:
        await until(lambda: any(test(e) for e in self.seen), what, wait_s=wait_s)
        return next(e for e in self.seen if test(e))


@contextlib.asynccontextmanager
async def subscribed(gw: GatewayProcess) -> AsyncIterator[tuple[GatewayLink, Events]]:
    link = await gw.link()
    try:
        await link.call("subscribe")
        events = Events(link)
        yield link, events
        events.task.cancel()
    finally:
        await link.close()
