"""Structured logs: one JSON object per line; identifiers only in DEBUG records."""

from __future__ import annotations

import json
import logging

from bastion.server.logs import JsonFormatter
from tests.conftest import Profiles


def _format(level: int, **extra: object) -> dict[str, object]:
    record = logging.LogRecord("bastion.server", level, __file__, 1, "signin.failed", None, None)
    record.__dict__.update(extra)
    out: dict[str, object] = json.loads(JsonFormatter().format(record))
    return out


def test_info_records_keep_counts_and_drop_identifiers() -> None:
    out = _format(logging.INFO, user="alice", address="10.0.0.7", reason="bad_signature", count=3)
    assert out["event"] == "signin.failed"
    assert out["level"] == "INFO"
    assert out["reason"] == "bad_signature"
    assert out["count"] == 3
    assert "user" not in out
    assert "address" not in out
    assert "alice" not in json.dumps(out)


def test_debug_records_keep_identifiers() -> None:
    out = _format(logging.DEBUG, user="alice", device="abcdefghijklmnop")
    assert out["user"] == "alice"
    assert out["device"] == "abcdefghijklmnop"


async def test_every_line_a_real_server_writes_is_a_json_object(profiles: Profiles) -> None:
    alice = await profiles.online("alice", receive=False)
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    await alice.send_text("bob", "a secret about the merger")
    lines = profiles.server.log_text().splitlines()
    assert lines
    events = [json.loads(line)["event"] for line in lines]
    assert "account.registered" in events
    assert "merger" not in profiles.server.log_text()
