"""Relay benchmark: how many messages a server relays on one core, with TLS and durable storage.

Runs each deployment in turn on 127.0.0.1:

- ``sqlite``: one ``bastion server run`` node with its SQLite file;
- ``cluster``: two nodes sharing PostgreSQL (a private schema, dropped after)
  and a private ``redis-server``; senders connect to one node, receivers to
  the other, so every message crosses the bus. ``--nodes N`` (3..8) starts N
  nodes instead: pair i's sender connects to node i mod N and its receiver to
  the next node, so every node sends and receives and every message still
  crosses the bus. All nodes share the server's one core, so more nodes do not
  add capacity here; the ``msgs/cpu-s`` column (messages per CPU-second of
  nodes, PostgreSQL and Redis together) shows what each node count costs.

The server nodes are pinned to one CPU and the load generator (``_load.py``) to
another. The generator registers the sender and receiver accounts through the
real protocol, then measures:

- closed loop: ``--pairs`` senders each keep ``--window`` messages in flight;
- open loop: ``--rate`` messages per second over ``--open-pairs`` pairs, latency
  counted from each message's scheduled send time (no coordinated omission);
- idle: ``--idle`` more signed-in receiving connections held open; the server's
  RSS growth per connection gives idle connections per GiB.

Then the client's per-message crypto on one core. Prints one table per
deployment (or JSON with ``--json``). Nothing here asserts a number.

    python bench/relay.py --deployments sqlite,cluster --pairs 50 --open-pairs 1000 --idle 5000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec

from _report import BenchmarkError, BenchmarkSkipped, LoadConfig, LoadReport, table
from _servers import (
    RedisUnderTest,
    ServerUnderTest,
    drop_schema,
    new_schema,
    pinned,
    postgres_reachable,
)

LOAD_SCRIPT = Path(__file__).resolve().with_name("_load.py")
MODES = ("closed", "open")
DEPLOYMENTS = ("sqlite", "cluster")
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


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


@contextlib.contextmanager
def sqlite_node(root: Path, *, cpu: int | None, command: list[str] | None) -> Iterator[Deployment]:
    """One embedded node: SQLite and the in-process bus."""
    node = ServerUnderTest(root / "node", cpu=cpu, command=command)
    node.start()
    try:
        yield Deployment("sqlite: one node, SQLite", [node], node, node, None)
    finally:
        node.stop()


@contextlib.contextmanager
def cluster_nodes(
    root: Path, *, cpu: int | None, postgres: str, command: list[str] | None, nodes: int = 2
) -> Iterator[Deployment]:
    """``nodes`` nodes on one private PostgreSQL schema and one private Redis (removed after)."""
    why = postgres_reachable(postgres)
    if why is not None:
        raise BenchmarkSkipped(why)
    redis = RedisUnderTest(root / "redis")
    schema = new_schema()
    separator = "&" if "?" in postgres else "?"
    cluster_args = ["--db", f"{postgres}{separator}schema={schema}"]
    started: list[ServerUnderTest] = []
    try:
        redis.start()
        cluster_args += ["--bus", redis.url]
        for n in range(nodes):
            node = ServerUnderTest(
                root / f"node-{n}",
                cpu=cpu,
                command=command,
                extra_args=cluster_args,
                copy_from=started[0] if started else None,
            )
            started.append(node)
            node.start()
        title = f"cluster: {nodes} nodes, PostgreSQL + Redis"
        yield Deployment(title, started, started[0], started[1], redis.pid)
    finally:
        for node in started:
            node.stop()
        redis.stop()
        drop_schema(postgres, schema)


class Deployment:
    """Running server nodes: where senders and receivers connect, and what to measure."""

    def __init__(
        self,
        title: str,
        nodes: list[ServerUnderTest],
        senders: ServerUnderTest,
        receivers: ServerUnderTest,
        redis_pid: int | None,
    ) -> None:
        self.title = title
        self.nodes = nodes
        self.senders = senders
        self.receivers = receivers
        self.redis_pid = redis_pid

    def log_tail(self) -> str:
        """The end of every node's log, for a run that had errors."""
        return "\n".join(node.log_text()[-3000:] for node in self.nodes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; bounds keep every run short and finite."""
    parser = argparse.ArgumentParser(description="Measure the relay server on one core.")
    parser.add_argument(
        "--deployments", default="sqlite,cluster", help="comma-separated: sqlite, cluster (both)"
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=2,
        help="cluster: server nodes (2); pair i's sender on node i mod N, its receiver on the next",
    )
    parser.add_argument("--pairs", type=int, default=50, help="closed loop: pairs (50)")
    parser.add_argument("--open-pairs", type=int, default=1000, help="open loop: pairs (1000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per mode")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--window", type=int, default=16, help="closed loop: in flight per sender")
    parser.add_argument("--rate", type=float, default=2000.0, help="open loop: total msgs/s")
    parser.add_argument(
        "--modes", default="closed,open", help="comma-separated: closed, open (both)"
    )
    parser.add_argument(
        "--idle", type=int, default=5000, help="idle connections to hold (5000; 0: skip)"
    )
    parser.add_argument(
        "--batch-acks",
        action="store_true",
        help="acknowledge all deliveries of one read in one frame (the client acks one by one)",
    )
    parser.add_argument(
        "--crypto-seconds", type=float, default=2.0, help="client crypto figure (0: skip)"
    )
    parser.add_argument(
        "--postgres", default=DEFAULT_POSTGRES, help=f"cluster database ({DEFAULT_POSTGRES})"
    )
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    parser.add_argument(
        "--server-script",
        type=Path,
        help="run this Python script as each server instead; it takes the arguments of"
        " `bastion server run` (--data DIR --port N, and --db URL --bus URL in a cluster)",
    )
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        parser.error("--modes takes closed, open or closed,open")
    args.modes = modes
    deployments = [d for d in args.deployments.split(",") if d]
    if not deployments or any(d not in DEPLOYMENTS for d in deployments):
        parser.error("--deployments takes sqlite, cluster or sqlite,cluster")
    args.deployments = deployments
    if not 1 <= args.pairs <= 2000 or not 1 <= args.open_pairs <= 2000:
        parser.error("--pairs and --open-pairs must be between 1 and 2000")
    if not 2 <= args.nodes <= 8:
        parser.error("--nodes must be between 2 and 8")
    if not 0 <= args.idle <= 10_000:
        parser.error("--idle must be between 0 and 10000")
    if not 0.5 <= args.seconds <= 600 or not 0 <= args.warmup <= 60:
        parser.error("--seconds must be 0.5..600 and --warmup 0..60")
    if not 1 <= args.window <= 256:
        parser.error("--window must be between 1 and 256")
    if not 1 <= args.rate <= 200_000:
        parser.error("--rate must be between 1 and 200000")
    if not 0 <= args.crypto_seconds <= 60:
        parser.error("--crypto-seconds must be between 0 and 60")
    return args


def raise_open_files_limit(needed: int) -> None:
    """Raise this process's (and so its children's) open-file limit towards ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def measure(
    deployment: Deployment,
    args: argparse.Namespace,
    *,
    server_cpu: int | None,
    load_cpu: int | None,
) -> LoadReport:
    """Run the load generator against one deployment."""
    print(
        f"{deployment.title}: server pids {[n.pid for n in deployment.nodes]}",
        file=sys.stderr,
        flush=True,
    )
    config = LoadConfig(
        sender_url=deployment.senders.url,
        receiver_url=deployment.receivers.url,
        node_urls=[n.url for n in deployment.nodes] if len(deployment.nodes) > 2 else [],
        fingerprint=deployment.senders.fingerprint,
        server_pids=[n.pid for n in deployment.nodes],
        server_cpu=server_cpu,
        redis_pid=deployment.redis_pid,
        pairs=args.pairs,
        open_pairs=args.open_pairs if "open" in args.modes else args.pairs,
        idle=args.idle,
        seconds=args.seconds,
        warmup=args.warmup,
        window=args.window,
        rate=args.rate,
        modes=args.modes,
        batch_acks=args.batch_acks,
        crypto_seconds=args.crypto_seconds,
    )
    accounts = 2 * max(config.pairs, config.open_pairs)
    per_mode = 2 * (args.warmup + args.seconds) + 5 + config.drain_s + 1
    timeout_s = (
        120
        + 0.2 * accounts
        + len(args.modes) * per_mode
        + 0.05 * args.idle
        + args.crypto_seconds
        + 60
    )
    report = run_load(config, cpu=load_cpu, timeout_s=timeout_s)
    if sum(m.errors for m in report.modes):
        print(deployment.log_tail(), file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark for each deployment and print its table (or JSON)."""
    args = parse_args(argv)
    raise_open_files_limit(4 * (2 * max(args.pairs, args.open_pairs) + args.idle) + 1024)
    load_before = os.getloadavg()[0]
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, load_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    command = None if args.server_script is None else [sys.executable, str(args.server_script)]
    reports: dict[str, LoadReport] = {}
    skipped: list[str] = []
    titles: dict[str, str] = {}
    for name in args.deployments:
        with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
            root = Path(tmp)
            nodes = (
                sqlite_node(root, cpu=server_cpu, command=command)
                if name == "sqlite"
                else cluster_nodes(
                    root,
                    cpu=server_cpu,
                    postgres=args.postgres,
                    command=command,
                    nodes=args.nodes,
                )
            )
            try:
                with nodes as deployment:
                    titles[name] = deployment.title
                    reports[name] = measure(
                        deployment, args, server_cpu=server_cpu, load_cpu=load_cpu
                    )
            except BenchmarkSkipped as exc:
                skipped.append(name)
                print(f"{name}: skipped: {exc}", file=sys.stderr)
            except BenchmarkError as exc:
                print(f"{name}: not measured: {exc}", file=sys.stderr)
    if args.json:
        print(msgspec.json.encode(reports).decode())
        return 0 if len(reports) + len(skipped) == len(args.deployments) else 1
    print(
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs,"
        f" load average {load_before:.2f} before the run; {args.seconds:g} s per mode after"
        f" {args.warmup:g} s warm-up{', acks batched' if args.batch_acks else ''};"
        f" servers on CPU {'unpinned' if server_cpu is None else server_cpu},"
        f" load generator on CPU {'unpinned' if load_cpu is None else load_cpu}"
    )
    for name, report in reports.items():
        print()
        print(
            table(
                report,
                title=titles[name],
                server_cpu="unpinned" if server_cpu is None else str(server_cpu),
                load_cpu="unpinned" if load_cpu is None else str(load_cpu),
            )
        )
    return 0 if len(reports) + len(skipped) == len(args.deployments) else 1


if __name__ == "__main__":
    sys.exit(main())
