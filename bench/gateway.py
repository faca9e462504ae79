"""Gateway benchmark: what going through ``bastion gateway`` adds to a message's trip.

Starts ``python -m bastion server run`` on 127.0.0.1 (a fresh SQLite data
folder), registers alice and bob with the client library and makes them
contacts, then measures, one message at a time, the time from a send until the
receiver has the message:

1. ``library``: alice's :class:`~bastion.client.Client` sends with ``send_text``;
   bob's client, connected and receiving in the same process, yields it (both
   receive and send delivery receipts, as the gateway does);
2. ``gateway``: the same two profiles, each served by its own ``bastion gateway``
   process; alice's front end calls ``send`` on her gateway's Unix socket, bob's
   front end is subscribed to his gateway's events on its socket.

Both ends are in this process, so one clock times the whole trip: encrypting,
the server storing and pushing, decrypting, storing in the profile, and (for
the gateway) two JSON-RPC hops over Unix sockets. Then ``throughput``: ``--senders``
front ends send to bob through alice's gateway as fast as it answers, for
``--seconds``; what bob's subscription receives per second is what one gateway
sustains (and it includes bob's gateway receiving the same stream).

Bounded: at most 5,000 messages a phase, and the run stops after ``--timeout``
seconds. Nothing here asserts a number; record the output in docs/benchmarks.md.

    python bench/gateway.py                  # 300 messages a mode, 10 s of throughput
    python bench/gateway.py --messages 50 --seconds 2 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from _load import process_cpu_s
from _report import BenchmarkError
from _servers import ServerUnderTest
from bastion.client import Client, MessageEvent, contacts, receipts
from bastion.gateway.link import GatewayLink

PASSPHRASE = "benchmark passphrase, not a secret"
MAX_MESSAGES = 5000


def percentile_ms(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index] * 1000


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "count": len(samples),
        "p50_ms": round(percentile_ms(samples, 0.50), 3),
        "p99_ms": round(percentile_ms(samples, 0.99), 3),
        "mean_ms": round(statistics.fmean(samples) * 1000, 3),
    }


async def make_pair(server: ServerUnderTest, root: Path) -> tuple[Path, Path]:
    """alice and bob registered on ``server``, accepted contacts; their profiles closed."""
    paths = (root / "alice", root / "bob")
    made = []
    for name, path in zip(("alice", "bob"), paths, strict=True):
        made.append(
            await Client.register(
                path,
                PASSPHRASE,
                username=name,
                server_url=server.url,
                fingerprint=server.fingerprint,
            )
        )
    alice, bob = made
    for client in made:
        await client.connect(receive=False)
    await contacts.request(alice, "bob", notify=False)
    await contacts.act(bob, "alice", "accept")
    for client in made:
        await client.close()
    return paths


async def library_round_trips(paths: tuple[Path, Path], count: int) -> list[float]:
    alice = Client.open(paths[0], PASSPHRASE)
    bob = Client.open(paths[1], PASSPHRASE)
    arrived: dict[str, asyncio.Event] = {}
    try:
        # Both receive and send delivery receipts, as a gateway (and any front end) does.
        for client in (alice, bob):
            receipts.enable(client)
            await client.connect(receive=True)

        async def receive() -> None:
            async for event in bob.receive():
                if isinstance(event, MessageEvent) and event.record.text in arrived:
                    arrived[event.record.text].set()

        async def drain_alice() -> None:
            async for _event in alice.receive():
                pass  # bob's receipts: marks her messages delivered

        receiver = asyncio.create_task(receive())
        alice_receiver = asyncio.create_task(drain_alice())
        samples = []
        for i in range(count):
            text = f"library {i}"
            arrived[text] = asyncio.Event()
            started = time.perf_counter()
            await alice.send_text("bob", text)
            await asyncio.wait_for(arrived[text].wait(), 30)
            samples.append(time.perf_counter() - started)
        for task in (receiver, alice_receiver):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return samples
    finally:
        await alice.close()
        await bob.close()


class Gateway:
    """``bastion gateway`` for one profile, in a child process."""

    def __init__(self, profile: Path, cpu: int | None) -> None:
        self.profile = profile
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        env.update({"BASTION_PASSPHRASE": PASSPHRASE, "PYTHONUNBUFFERED": "1"})
        command = [sys.executable, "-m", "bastion", "gateway", "--json", "--no-notify"]
        with (self.profile.parent / f"{self.profile.name}-gateway.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [*command, "--profile", str(self.profile)],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        if self.proc.stdout is None:
            raise BenchmarkError("the gateway's output is not readable")
        deadline = time.monotonic() + 30
        out = b""
        while b"\n" not in out:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise BenchmarkError(f"the gateway did not start: {out!r}")
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                out += os.read(self.proc.stdout.fileno(), 4096)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.asynccontextmanager
async def gateways(paths: tuple[Path, Path]) -> AsyncIterator[tuple[Gateway, Gateway]]:
    started = (Gateway(paths[0], None), Gateway(paths[1], None))
    try:
        for gateway in started:
            await asyncio.to_thread(gateway.start)
        for gateway in started:
            async with await GatewayLink.open(gateway.profile) as link:
                deadline = time.monotonic() + 30
                while (await link.call("status"))["connection"] != "connected":
                    if time.monotonic() > deadline:
                        raise BenchmarkError("a gateway did not connect")
                    await asyncio.sleep(0.05)
        yield started
    finally:
        for gateway in started:
            gateway.stop()


class Inbox:
    """Bob's front end: subscribed to his gateway, signalling each text that arrives."""

    def __init__(self, link: GatewayLink) -> None:
        self.link = link
        self.waiting: dict[str, asyncio.Event] = {}
        self.count = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for event in self.link.events():
            if event.get("type") == "message" and "state" not in event:
                self.count += 1
                waiter = self.waiting.get(event["text"])
                if waiter is not None:
                    waiter.set()


async def gateway_round_trips(paths: tuple[Path, Path], count: int) -> list[float]:
    async with (
        await GatewayLink.open(paths[0]) as alice,
        await GatewayLink.open(paths[1]) as bob,
    ):
        await bob.call("subscribe")
        inbox = Inbox(bob)
        samples = []
        for i in range(count):
            text = f"gateway {i}"
            inbox.waiting[text] = asyncio.Event()
            started = time.perf_counter()
            await alice.call("send", to="bob", text=text)
            await asyncio.wait_for(inbox.waiting[text].wait(), 30)
            samples.append(time.perf_counter() - started)
        inbox.task.cancel()
        return samples


async def gateway_throughput(
    paths: tuple[Path, Path], pids: list[int], senders: int, seconds: float
) -> dict[str, float]:
    links = [await GatewayLink.open(paths[0]) for _ in range(senders)]
    bob = await GatewayLink.open(paths[1])
    try:
        await bob.call("subscribe")
        inbox = Inbox(bob)
        stop_at = time.monotonic() + seconds
        sent = 0

        async def sender(link: GatewayLink, n: int) -> None:
            nonlocal sent
            i = 0
            while time.monotonic() < stop_at and sent < MAX_MESSAGES:
                await link.call("send", to="bob", text=f"load {n}.{i}")
                sent += 1
                i += 1

        cpu_before = [process_cpu_s(pid) for pid in pids]
        started = time.monotonic()
        await asyncio.gather(*(sender(link, n) for n, link in enumerate(links)))
        deadline = time.monotonic() + 30
        while inbox.count < sent and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.01)
        elapsed = time.monotonic() - started
        cpu = [process_cpu_s(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
        inbox.task.cancel()
        return {
            "sent": sent,
            "received": inbox.count,
            "seconds": round(elapsed, 3),
            "msgs_per_s": round(inbox.count / elapsed, 1),
            "sender_gateway_cpu_us_per_msg": round(cpu[0] / max(1, inbox.count) * 1e6, 1),
            "receiver_gateway_cpu_us_per_msg": round(cpu[1] / max(1, inbox.count) * 1e6, 1),
        }
    finally:
        for link in [*links, bob]:
            await link.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bastion-gateway-bench-") as tmp:
        root = Path(tmp)
        server = ServerUnderTest(root, cpu=None)
        server.start()
        try:
            paths = await make_pair(server, root)
            library = await library_round_trips(paths, args.messages)
            async with gateways(paths) as (alice_gw, bob_gw):
                through = await gateway_round_trips(paths, args.messages)
                pids = [p.proc.pid for p in (alice_gw, bob_gw) if p.proc is not None]
                load = await gateway_throughput(paths, pids, args.senders, args.seconds)
        finally:
            server.stop()
    lib, gw = summary(library), summary(through)
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "library": lib,
        "gateway": gw,
        "added_p50_ms": round(gw["p50_ms"] - lib["p50_ms"], 3),
        "added_p99_ms": round(gw["p99_ms"] - lib["p99_ms"], 3),
        "throughput": load,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300, help="round trips a mode")
    parser.add_argument("--senders", type=int, default=8, help="front ends in the load phase")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the load phase")
    parser.add_argument("--timeout", type=float, default=600.0, help="stop the whole run after")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not 1 <= args.messages <= MAX_MESSAGES:
        parser.error(f"--messages is 1 to {MAX_MESSAGES}")
    report = asyncio.run(asyncio.wait_for(run(args), args.timeout))
    if args.json:
        print(json.dumps(report))
        return 0
    lib, gw = report["library"], report["gateway"]
    print(f"send → receive, {lib['count']} messages one at a time:")
    print(f"  two library clients: p50 {lib['p50_ms']:.2f} ms  p99 {lib['p99_ms']:.2f} ms")
    print(f"  two gateways:        p50 {gw['p50_ms']:.2f} ms  p99 {gw['p99_ms']:.2f} ms")
    print(f"  added by gateways:   p50 {report['added_p50_ms']:.2f} ms")
    load = report["throughput"]
    print(
        f"one gateway, {args.senders} front ends: {load['msgs_per_s']:.0f} msgs/s "
        f"({load['received']}/{load['sent']} received in {load['seconds']} s; gateway CPU "
        f"{load['sender_gateway_cpu_us_per_msg']:.0f} µs/msg sending, "
        f"{load['receiver_gateway_cpu_us_per_msg']:.0f} µs/msg receiving)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
