"""What the relay benchmark's parts hand each other, and the table it prints.

The load generator runs in its own process; it receives a :class:`LoadConfig`
and answers with a :class:`LoadReport`, both as JSON.
"""

from __future__ import annotations

import msgspec

from bastion.errors import BastionError


class BenchmarkError(BastionError):
    """The benchmark could not run to the end (server did not start, generator failed)."""


class BenchmarkSkipped(BenchmarkError):
    """A deployment cannot run on this machine (no PostgreSQL or no redis-server)."""


class LoadConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How the load generator is to load one running server."""

    sender_url: str
    receiver_url: str
    # A cluster of more than two nodes: sender i connects to node i mod N, its receiver to
    # the next node, so every message crosses the bus and every node sends and receives.
    node_urls: list[str] = []
    fingerprint: str
    server_pids: list[int]
    server_cpu: int | None
    redis_pid: int | None = None  # cluster runs: CPU of Redis and PostgreSQL is reported apart
    pairs: int
    open_pairs: int
    idle: int = 0
    seconds: float
    warmup: float
    window: int
    rate: float
    modes: list[str]
    batch_acks: bool = False
    crypto_seconds: float = 2.0
    drain_s: float = 15.0


class ModeResult(msgspec.Struct, kw_only=True):
    """One measured window of one mode."""

    mode: str
    load: str
    seconds: float
    sent: int
    delivered: int
    delivered_per_s: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    missing: int
    errors: int
    server_cpu_us_per_msg: float
    server_cpu_util: float
    server_rss_mb: float
    load_cpu_util: float
    others_on_server_core: float
    backend_cpu_us_per_msg: float | None = None
    error_codes: dict[str, int] = {}


class IdleResult(msgspec.Struct, kw_only=True):
    """Signed-in, receiving connections held open doing nothing, and what they cost."""

    connections: int
    seconds: float
    rss_before_mb: float
    rss_after_mb: float
    kib_per_connection: float
    connections_per_gib: float
    errors: int


class CryptoResult(msgspec.Struct, kw_only=True):
    """The client-side crypto round trip on one core."""

    text_chars: int
    ciphertext_bytes: int
    round_trips_per_s: float


class LoadReport(msgspec.Struct, kw_only=True):
    """Everything the load generator measured."""

    accounts: int
    register_s: float
    body_bytes: int
    modes: list[ModeResult]
    crypto: CryptoResult | None
    server_peak_rss_mb: float
    idle: IdleResult | None = None


def per_cpu_second(mode: ModeResult) -> float:
    """Messages relayed per CPU-second of every server process (nodes + PostgreSQL + Redis)."""
    cost_us = mode.server_cpu_us_per_msg + (mode.backend_cpu_us_per_msg or 0.0)
    return 1e6 / cost_us if cost_us > 0 else 0.0


def table(report: LoadReport, *, title: str, server_cpu: str, load_cpu: str) -> str:
    """The table the benchmark prints for one deployment."""
    header = (
        f"{'mode':<7} {'load':<26} {'msgs/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p999 ms':>8}"
        f" {'srv us/msg':>10} {'db+bus us':>9} {'srv cpu':>7} {'srv RSS':>8} {'gen cpu':>7}"
        f" {'others':>6} {'missing':>7} {'msgs/cpu-s':>10}"
    )
    lines = [title, header, "-" * len(header)]
    for m in report.modes:
        backend = "-" if m.backend_cpu_us_per_msg is None else f"{m.backend_cpu_us_per_msg:.1f}"
        lines.append(
            f"{m.mode:<7} {m.load:<26} {m.delivered_per_s:>8.0f} {m.p50_ms:>8.2f} {m.p99_ms:>8.2f}"
            f" {m.p999_ms:>8.2f} {m.server_cpu_us_per_msg:>10.1f} {backend:>9}"
            f" {m.server_cpu_util:>6.0%} {m.server_rss_mb:>5.0f} MB {m.load_cpu_util:>6.0%}"
            f" {m.others_on_server_core:>5.0%} {m.missing + m.errors:>7}"
            f" {per_cpu_second(m):>10,.0f}"
        )
    lines.append("-" * len(header))
    lines.append(
        "srv: all server nodes together; db+bus: PostgreSQL and Redis CPU per message;"
        " others: CPU used on the server's core by other processes (noise);"
        " msgs/cpu-s: messages relayed per CPU-second of nodes, PostgreSQL and Redis together"
    )
    for m in report.modes:
        if m.error_codes:
            lines.append(f"{m.mode}: errors by code {m.error_codes}")
    if report.idle is not None:
        i = report.idle
        lines.append(
            f"idle: {i.connections} signed-in TLS connections held by one node; RSS"
            f" {i.rss_before_mb:.0f} -> {i.rss_after_mb:.0f} MB = {i.kib_per_connection:.1f} KiB"
            f" per connection = {i.connections_per_gib:,.0f} connections per GiB"
            f" (opened in {i.seconds:.1f} s, {i.errors} errors)"
        )
    lines.append(
        f"{report.accounts} accounts in all; the pairs registered and befriended in"
        f" {report.register_s:.1f} s;"
        f" ciphertext {report.body_bytes} bytes; server peak RSS"
        f" {report.server_peak_rss_mb:.0f} MB; server on CPU {server_cpu}, load on CPU {load_cpu}"
    )
    if report.crypto is not None:
        c = report.crypto
        lines.append(
            f"client crypto (seal+encrypt+decrypt+open_signed, {c.text_chars}-char text):"
            f" {c.round_trips_per_s:.0f} messages/s on one core"
        )
    return "\n".join(lines)
