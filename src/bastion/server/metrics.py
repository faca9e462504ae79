"""Prometheus metrics of the relay, served on a separate port bound to 127.0.0.1.

The public listener never answers ``/metrics``; an operator scrapes the local
port (or forwards it). Metrics hold counts and timings only: no user, device,
address or content appears in a label.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from bastion.protocol.codes import ErrorCode

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class RelayMetrics:
    """The relay's counters, gauges and histograms, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Gauge(
            "bastion_connections", "Open client connections", registry=self.registry
        )
        self.queue_depth = Gauge(
            "bastion_queue_depth", "Envelopes waiting in device queues", registry=self.registry
        )
        self.messages = Counter(
            "bastion_messages_relayed", "Messages stored for delivery", registry=self.registry
        )
        self.limit_hits = Counter(
            "bastion_limit_hits", "Requests refused by a limit", ["limit"], registry=self.registry
        )
        self.errors = Counter(
            "bastion_errors", "Error frames sent to clients", ["code"], registry=self.registry
        )
        self.tls_handshake_failures = Counter(
            "bastion_tls_handshake_failures",
            "TLS handshakes a peer broke off or botched (scans, health checks)",
            registry=self.registry,
        )
        self.latency = Histogram(
            "bastion_request_seconds",
            "Time to handle a request",
            ["request"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )

    def watch(self, connections: Callable[[], int], queue_depth: Callable[[], int]) -> None:
        """Read the two gauges from callbacks at scrape time."""
        self.connections.set_function(lambda: float(connections()))
        self.queue_depth.set_function(lambda: float(queue_depth()))

    def observe(self, request: str, started: float) -> None:
        """A request that began at ``started`` (``time.perf_counter()``) is done."""
        self.latency.labels(request).observe(time.perf_counter() - started)

    def count_messages(self) -> None:
        """A message was stored for delivery."""
        self.messages.inc()

    def count_error(self, code: ErrorCode) -> None:
        """An error frame was sent."""
        self.errors.labels(code).inc()

    def count_limit_hit(self, limit: str) -> None:
        """A limit refused a request."""
        self.limit_hits.labels(limit).inc()

    def count_tls_failure(self) -> None:
        """A TLS handshake failed."""
        self.tls_handshake_failures.inc()

    def serve(self, port: int) -> None:
        """Serve ``/metrics`` on 127.0.0.1:``port`` from a background thread."""
        start_http_server(port, addr="127.0.0.1", registry=self.registry)
