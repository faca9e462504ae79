"""What the relay benchmark's parts hand each other, and the table it prints.

The load generator runs in its own process; it receives a :class:`LoadConfig`
and answers with a :class:`LoadReport`, both as JSON.
"""

from __future__ import annotations

import msgspec

from bastion.errors import BastionError


class BenchmarkError(BastionError):
    """The benchmark could not run to the end (server did not start, generator failed)."""


class LoadConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How the load generator is to load one running server."""

    url: str
    fingerprint: str
    server_pid: int
    server_cpu: int | None
    pairs: int
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


def table(report: LoadReport, *, server_cpu: str, load_cpu: str) -> str:
    """The one table the benchmark prints."""
    header = (
        f"{'mode':<7} {'load':<18} {'msgs/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p999 ms':>8}"
        f" {'srv us/msg':>10} {'srv cpu':>7} {'srv RSS':>8} {'gen cpu':>7} {'others':>6}"
        f" {'missing':>7}"
    )
    lines = [header, "-" * len(header)]
    for m in report.modes:
        lines.append(
            f"{m.mode:<7} {m.load:<18} {m.delivered_per_s:>8.0f} {m.p50_ms:>8.2f} {m.p99_ms:>8.2f}"
            f" {m.p999_ms:>8.2f} {m.server_cpu_us_per_msg:>10.1f} {m.server_cpu_util:>6.0%}"
            f" {m.server_rss_mb:>5.0f} MB {m.load_cpu_util:>6.0%} {m.others_on_server_core:>5.0%}"
            f" {m.missing + m.errors:>7}"
        )
    lines.append("-" * len(header))
    lines.append("others: CPU used on the server's core by other processes (noise)")
    lines.append(
        f"{report.accounts} accounts registered in {report.register_s:.1f} s;"
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
