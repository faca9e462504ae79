"""Relay benchmark: how many messages one server core relays, with TLS and durable storage.

Starts a real ``bastion server run`` on 127.0.0.1 with a fresh data folder,
pinned to one CPU, and the load generator (``_load.py``) in its own process
pinned to another. Registers ``--pairs`` sender and receiver accounts through
the real protocol, then measures two modes:

- closed loop: each sender keeps ``--window`` messages in flight end to end;
- open loop: ``--rate`` messages per second in total, latency counted from each
  message's scheduled send time (no coordinated omission).

Then it measures the client's per-message crypto on one core, stops the server
and prints one table (or JSON with ``--json``). Nothing here asserts a number.

    python bench/relay.py --pairs 50 --seconds 10 --window 16 --rate 2000
"""

from __future__ import annotations

import argparse
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from _report import BenchmarkError, LoadConfig, LoadReport, table

LOAD_SCRIPT = Path(__file__).resolve().with_name("_load.py")
MODES = ("closed", "open")


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


class ServerUnderTest:
    """``python -m bastion server run`` in a child process with its own data folder.

    ``command`` may name another entry point taking ``--data DIR --port N``
    (an instrumented or tuned server, for experiments).
    """

    def __init__(self, root: Path, *, cpu: int | None, command: list[str] | None = None) -> None:
        self.command = command or [sys.executable, "-m", "bastion", "server", "run"]
        self.data_dir = root / "server"
        self.log_path = root / "server.log"
        self.port = free_port()
        self.url = f"wss://127.0.0.1:{self.port}"
        self.cpu = cpu
        self.fingerprint = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_s: float = 30.0) -> None:
        """Start and wait until it prints its certificate fingerprint."""
        args = [*self.command, "--data", str(self.data_dir), "--port", str(self.port)]
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
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def run_load(config: LoadConfig, *, cpu: int | None, timeout_s: float) -> LoadReport:
    """Run the load generator in its own (pinned) process; returns its report."""
    command = [sys.executable, str(LOAD_SCRIPT), msgspec.json.encode(config).decode()]
    try:
        done = subprocess.run(
            pinned(command, cpu), stdout=subprocess.PIPE, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchmarkError(
            f"the load generator did not finish within {timeout_s:.0f} s"
        ) from None
    if done.returncode != 0:
        raise BenchmarkError(f"the load generator failed with exit status {done.returncode}")
    return msgspec.json.decode(done.stdout, type=LoadReport)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; bounds keep every run short and finite."""
    parser = argparse.ArgumentParser(description="Measure the relay server on one core.")
    parser.add_argument("--pairs", type=int, default=50, help="sender/receiver pairs (50)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per mode")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--window", type=int, default=16, help="closed loop: in flight per sender")
    parser.add_argument("--rate", type=float, default=2000.0, help="open loop: total msgs/s")
    parser.add_argument(
        "--modes", default="closed,open", help="comma-separated: closed, open (both)"
    )
    parser.add_argument(
        "--batch-acks",
        action="store_true",
        help="acknowledge all deliveries of one read in one frame (the client acks one by one)",
    )
    parser.add_argument(
        "--crypto-seconds", type=float, default=2.0, help="client crypto figure (0: skip)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--server-script",
        type=Path,
        help="run this Python script as the server instead (it takes --data DIR --port N)",
    )
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        parser.error("--modes takes closed, open or closed,open")
    args.modes = modes
    if not 1 <= args.pairs <= 2000:
        parser.error("--pairs must be between 1 and 2000")
    if not 0.5 <= args.seconds <= 600 or not 0 <= args.warmup <= 60:
        parser.error("--seconds must be 0.5..600 and --warmup 0..60")
    if not 1 <= args.window <= 256:
        parser.error("--window must be between 1 and 256")
    if not 1 <= args.rate <= 200_000:
        parser.error("--rate must be between 1 and 200000")
    if not 0 <= args.crypto_seconds <= 60:
        parser.error("--crypto-seconds must be between 0 and 60")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one table (or JSON)."""
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, load_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        command = None if args.server_script is None else [sys.executable, str(args.server_script)]
        server = ServerUnderTest(Path(tmp), cpu=server_cpu, command=command)
        server.start()
        print(f"server pid {server.pid} at {server.url}", file=sys.stderr, flush=True)
        config = LoadConfig(
            url=server.url,
            fingerprint=server.fingerprint,
            server_pid=server.pid,
            server_cpu=server_cpu,
            pairs=args.pairs,
            seconds=args.seconds,
            warmup=args.warmup,
            window=args.window,
            rate=args.rate,
            modes=args.modes,
            batch_acks=args.batch_acks,
            crypto_seconds=args.crypto_seconds,
        )
        per_mode = 2 * (args.warmup + args.seconds) + 5 + config.drain_s + 1
        timeout_s = 60 + 2 * args.pairs + len(args.modes) * per_mode + args.crypto_seconds + 30
        try:
            report = run_load(config, cpu=load_cpu, timeout_s=timeout_s)
        finally:
            server.stop()
        if report.modes and sum(m.errors for m in report.modes):
            print(server.log_text()[-4000:], file=sys.stderr)
    if args.json:
        print(msgspec.json.encode(report).decode())
        return 0
    print(
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs,"
        f" load average {load_before:.2f} before the run;"
        f" {args.pairs} pairs, {args.seconds:g} s per mode after {args.warmup:g} s warm-up"
        f"{', acks batched' if args.batch_acks else ''}"
    )
    print(
        table(
            report,
            server_cpu="unpinned" if server_cpu is None else str(server_cpu),
            load_cpu="unpinned" if load_cpu is None else str(load_cpu),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
