"""The servers a benchmark run measures: one SQLite node, or two PostgreSQL+Redis nodes.

Every process listens on 127.0.0.1 only and is stopped at the end; the cluster
gets its own ``redis-server`` on a free port and its own PostgreSQL schema,
dropped afterwards, so nothing shared is touched.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from _report import BenchmarkError, BenchmarkSkipped

# Limits raised so that the benchmark measures the relay, not its abuse limits: one address
# opens thousands of connections and registers thousands of accounts, and a sender in the
# closed loop sends far more than a person would.
BENCH_CONFIG = """\
[limits]
connections_per_address = 100000
registrations_per_address_per_hour = 10000000
registrations_per_address_burst = 100000
messages_per_second = 10000000
messages_burst = 1000000
"""
CONFIG_FILE = "bastion.toml"
SHARED_FILES = ("server.crt", "server.key", "server-name")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(command: list[str], cpu: int | None) -> list[str]:
    """``command`` prefixed with ``taskset -c CPU`` when pinning is possible."""
    if cpu is None or shutil.which("taskset") is None:
        return command
    return ["taskset", "-c", str(cpu), *command]


def _stop(proc: subprocess.Popen[bytes] | None, *, wait_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``wait_s``."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class ServerUnderTest:
    """``python -m bastion server run`` in a child process with its own data folder.

    ``command`` may name another entry point taking ``--data DIR --port N``
    (an instrumented or tuned server, for experiments); ``extra_args`` are
    appended (``--db``, ``--bus``). ``copy_from`` names a node whose
    certificate and server name this one shares, as nodes behind one balancer must.
    """

    def __init__(
        self,
        root: Path,
        *,
        cpu: int | None,
        command: list[str] | None = None,
        extra_args: list[str] | None = None,
        copy_from: ServerUnderTest | None = None,
    ) -> None:
        self.command = command or [sys.executable, "-m", "bastion", "server", "run"]
        self.extra_args = extra_args or []
        self.data_dir = root / "server"
        self.log_path = root / "server.log"
        self.port = free_port()
        self.url = f"wss://127.0.0.1:{self.port}"
        self.cpu = cpu
        self.fingerprint = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.data_dir.mkdir(mode=0o700, parents=True)
        (self.data_dir / CONFIG_FILE).write_text(BENCH_CONFIG)
        if copy_from is not None:
            for name in SHARED_FILES:
                shutil.copy2(copy_from.data_dir / name, self.data_dir / name)

    def start(self, *, wait_s: float = 30.0) -> None:
        """Start and wait until it prints its certificate fingerprint."""
        args = [
            *self.command,
            "--data",
            str(self.data_dir),
            "--port",
            str(self.port),
            *self.extra_args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                pinned(args, self.cpu), stdout=subprocess.PIPE, stderr=log, env=env
            )
        if self.proc.stdout is None:
            raise BenchmarkError("the server's output is not readable")
        deadline = time.monotonic() + wait_s
        out = b""
        while b"\ncertificate SHA256:" not in out or not out.endswith(b"\n"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise BenchmarkError(f"the server did not start: {out!r}\n{self.log_text()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                out += os.read(self.proc.stdout.fileno(), 4096)
        line = next(x for x in out.decode().splitlines() if x.startswith("certificate "))
        self.fingerprint = line.split(" ", 1)[1]

    @property
    def pid(self) -> int:
        """The server's process id (taskset execs the server, so it is the same)."""
        if self.proc is None:
            raise BenchmarkError("the server is not running")
        return self.proc.pid

    def log_text(self) -> str:
        """What the server wrote to standard error."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 15 seconds."""
        _stop(self.proc)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


class RedisUnderTest:
    """A private ``redis-server`` on a free port of 127.0.0.1, without persistence."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_s: float = 10.0) -> None:
        """Start and wait until it accepts connections."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchmarkSkipped("redis-server is not installed")
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BenchmarkError("redis-server did not start")

    @property
    def pid(self) -> int:
        """The process id."""
        if self.proc is None:
            raise BenchmarkError("redis is not running")
        return self.proc.pid

    def stop(self) -> None:
        """Stop it."""
        _stop(self.proc, wait_s=5.0)


def new_schema() -> str:
    """A PostgreSQL schema name no other run uses."""
    return f"bastion_bench_{secrets.token_hex(6)}"


def postgres_reachable(url: str) -> str | None:
    """None if PostgreSQL answers at ``url``, else why not."""
    import asyncpg  # only the cluster run needs it

    async def probe() -> None:
        conn = await asyncpg.connect(url, timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"PostgreSQL is not reachable at {url}: {type(exc).__name__}"
    return None


def drop_schema(url: str, schema: str) -> None:
    """Remove the benchmark's schema and everything in it."""
    import asyncpg  # only the cluster run needs it

    if not schema.startswith("bastion_bench_") or not schema.replace("_", "").isalnum():
        raise BenchmarkError(f"refusing to drop schema {schema!r}")

    async def drop() -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


def postgres_pids() -> list[int]:
    """Process ids of every ``postgres`` process on the machine (for CPU accounting)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == "postgres":
                    pids.append(int(entry))
        except OSError:
            continue
    return pids
