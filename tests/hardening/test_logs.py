"""Structured logs: one JSON object per line; identifiers only in DEBUG records."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from bastion.server.logs import JsonFormatter
from tests.conftest import Profiles, ServerProcess
from tests.hardening.harness import greeting_time


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


def test_an_exception_given_as_its_class_still_makes_one_json_line() -> None:
    # What the TLS layer hands the loop's default handler for an aborted handshake: the
    # class where the exception belongs, so the "traceback" is a descriptor. The standard
    # formatter raised on it and printed a 40-line traceback of its own to the log.
    bogus_traceback = ConnectionResetError.__traceback__
    record = logging.LogRecord(
        "asyncio",
        logging.ERROR,
        __file__,
        1,
        "SSL handshake failed",
        None,
        (type, ConnectionResetError, bogus_traceback),  # type: ignore[arg-type]
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["event"] == "SSL handshake failed"
    assert out["exception"] == "ConnectionResetError"


def test_a_record_whose_message_cannot_be_built_is_still_one_json_line() -> None:
    record = logging.LogRecord("bastion.server", logging.INFO, __file__, 1, "%d", ("x",), None)
    out = json.loads(JsonFormatter().format(record))
    assert out["event"] == "log.unformattable"
    assert out["level"] == "INFO"


@pytest.mark.network
async def test_bare_tcp_connects_leave_at_most_one_json_line_each(server: ServerProcess) -> None:
    before = len(server.log_text().splitlines())
    for _ in range(200):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.close()
        await writer.wait_closed()
    lines: list[str] = []
    for _ in range(30):  # until the server has handled every close (at most 3 s)
        await asyncio.sleep(0.1)
        latest = server.log_text().splitlines()[before:]
        if lines and latest == lines:
            break
        lines = latest
    assert len(lines) <= 200
    for line in lines:
        out = json.loads(line)
        assert isinstance(out, dict)
        assert out["level"] == "DEBUG"  # a health check or scan is nothing to warn about
    assert await greeting_time(server) < 5.0  # and it still serves
