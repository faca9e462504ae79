"""A real server's audit log: what it records, that it holds no content, and that
``bastion admin audit verify`` catches an edited, deleted, reordered or truncated record."""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from bastion.errors import ServerRefusedError
from tests.conftest import Profiles, ServerProcess
from tests.hardening.harness import ConfiguredServers, admin
from tests.helpers import drain

pytestmark = pytest.mark.network

SECRET_TEXT = "the launch code is 0000"


@pytest.fixture
async def stopped_server(tmp_path: Path, servers: ConfiguredServers) -> ServerProcess:
    """A server that saw two registrations, sign-ins and a message, then stopped."""
    server = servers.start()
    profiles = Profiles(tmp_path, server)
    try:
        alice = await profiles.online("alice", receive=False)
        bob = await profiles.online("bob")
        await profiles.befriend("alice", "bob")
        await alice.send_text("bob", SECRET_TEXT)
        await drain(bob)
        await bob.close()
    finally:
        await profiles.close()
    assert server.stop() == 0
    return server


def _lines(server: ServerProcess) -> list[bytes]:
    return (server.data_dir / "audit" / "audit.log").read_bytes().splitlines(keepends=True)


def _tampered(
    tmp_path: Path, server: ServerProcess, change: Callable[[list[bytes]], list[bytes]]
) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(server.data_dir, copy)
    log = copy / "audit" / "audit.log"
    log.write_bytes(b"".join(change(log.read_bytes().splitlines(keepends=True))))
    return copy


def test_the_log_records_security_events_and_no_content(stopped_server: ServerProcess) -> None:
    shown = admin(stopped_server.data_dir, "audit", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    records = [json.loads(line) for line in shown.stdout.splitlines()]
    events = [r["event"] for r in records]
    assert events[0] == "server.started"
    assert events.count("account.registered") == 2
    assert "signin.ok" in events
    assert events[-2:] == ["server.stopped", "audit.checkpoint"]
    registered = [r["fields"] for r in records if r["event"] == "account.registered"]
    assert {f["user"] for f in registered} == {"alice", "bob"}
    raw = b"".join(_lines(stopped_server))
    assert SECRET_TEXT.encode() not in raw
    assert b"launch" not in raw
    key = stopped_server.data_dir / "audit.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes() not in raw
    verified = admin(stopped_server.data_dir, "audit", "verify")
    assert verified.returncode == 0
    assert verified.stdout.startswith("audit log intact")


def _edit(lines: list[bytes]) -> list[bytes]:
    lines[2] = lines[2].replace(b'"alice"', b'"mallo"').replace(b'"bob"', b'"eve"')
    return lines


def _delete(lines: list[bytes]) -> list[bytes]:
    return lines[:2] + lines[3:]


def _reorder(lines: list[bytes]) -> list[bytes]:
    return [lines[0], lines[2], lines[1], *lines[3:]]


def _truncate(lines: list[bytes]) -> list[bytes]:
    return lines[:-2]


@pytest.mark.parametrize(
    ("change", "names"),
    [
        (_edit, "line 3: seq 3 does not match its hash"),
        (_delete, "line 3: seq 4 where 3 was expected"),
        (_reorder, "line 2: seq 3 where 2 was expected"),
        (_truncate, "records were cut from the end"),
    ],
)
def test_verify_names_the_first_bad_record(
    tmp_path: Path,
    stopped_server: ServerProcess,
    change: Callable[[list[bytes]], list[bytes]],
    names: str,
) -> None:
    before = _lines(stopped_server)
    copy = _tampered(tmp_path, stopped_server, change)
    assert (copy / "audit" / "audit.log").read_bytes() != b"".join(before)
    result = admin(copy, "audit", "verify")
    assert result.returncode == 1
    assert "audit log damaged" in result.stderr
    assert names in result.stderr
    as_json = json.loads(admin(copy, "audit", "verify", "--json").stdout)
    assert as_json["ok"] is False


async def test_failed_sign_in_is_audited(tmp_path: Path, servers: ConfiguredServers) -> None:
    server = servers.start(admin_poll_s=0.2)
    profiles = Profiles(tmp_path, server)
    try:
        await profiles.register("alice")
        assert admin(server.data_dir, "users", "disable", "alice").returncode == 0
        await asyncio.sleep(0.8)
        with pytest.raises(ServerRefusedError):
            await profiles.online("alice", receive=False)
    finally:
        await profiles.close()
    shown = admin(server.data_dir, "audit", "show")
    assert "signin.failed" in shown.stdout
    assert "user=alice" in shown.stdout
