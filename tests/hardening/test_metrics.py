"""``/metrics`` on the local admin port: counts and timings, and nothing that names anyone."""

from __future__ import annotations

import asyncio
import sys
import urllib.request
from pathlib import Path

import pytest

from bastion.errors import ServerRefusedError
from tests.conftest import Profiles, ServerProcess, free_port
from tests.helpers import drain, next_events

pytestmark = pytest.mark.network


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


async def test_metrics_count_connections_messages_limits_and_errors(tmp_path: Path) -> None:
    metrics_port = free_port()
    data = tmp_path / "server"
    data.mkdir()
    (data / "bastion.toml").write_text("[limits]\nmessages_burst = 2\nmessages_per_second = 0.1\n")
    command = [
        sys.executable,
        "-m",
        "bastion",
        "server",
        "run",
        "--metrics-port",
        str(metrics_port),
    ]
    server = ServerProcess(data, free_port(), script=command)
    server.start()
    profiles = Profiles(tmp_path, server)
    try:
        alice = await profiles.online("alice", receive=False)
        bob = await profiles.online("bob")
        await profiles.befriend("alice", "bob")
        await drain(bob)
        for text in ("one", "two"):
            await alice.send_text("bob", text)
        await next_events(bob, 2)
        with pytest.raises(ServerRefusedError):
            await alice.send_text("bob", "three")
        text = await asyncio.to_thread(_scrape, metrics_port)
        assert _value(text, "bastion_connections") == 2
        assert _value(text, "bastion_messages_relayed_total") == 2
        assert 'bastion_limit_hits_total{limit="messages_per_device"} 1.0' in text
        assert 'bastion_errors_total{code="rate_limited"} 1.0' in text
        assert 'bastion_request_seconds_count{request="relay"} 3.0' in text
        assert "bastion_queue_depth" in text
        for name in ("alice", "bob", "127.0.0.1", alice.account.device_id):
            assert name not in text
    finally:
        await profiles.close()
        server.kill()
