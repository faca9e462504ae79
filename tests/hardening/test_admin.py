"""``bastion admin`` against a running and a stopped server: users, invites, policy."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.client import Client
from bastion.errors import ServerRefusedError
from tests.conftest import PASSPHRASE, REPO, Profiles
from tests.hardening.harness import ConfiguredServers, admin

pytestmark = pytest.mark.network

POLL = 0.2


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_disabling_a_connected_user_signs_them_out_and_keeps_them_out(
    tmp_path: Path, servers: ConfiguredServers
) -> None:
    server = servers.start(admin_poll_s=POLL)
    profiles = Profiles(tmp_path, server)
    try:
        bob = await profiles.online("bob")
        bob_sender = await profiles.online("bob", receive=False)
        alice = await profiles.online("alice", receive=False)
        _ok(admin(server.data_dir, "users", "disable", "bob"))
        for client in (bob, bob_sender):
            assert client.conn is not None
            await asyncio.wait_for(client.conn.disconnected.wait(), 3.0)
        assert bob.conn is not None
        assert "disabled" in (bob.conn.close_reason or "")
        with pytest.raises(ServerRefusedError) as caught:
            await profiles.online("bob", receive=False)
        assert caught.value.code == "auth_failed"
        assert alice.conn is not None
        assert not alice.conn.disconnected.is_set()

        users = [
            json.loads(line)
            for line in _ok(admin(server.data_dir, "users", "list", "--json")).splitlines()
        ]
        assert {(u["user"], u["disabled"]) for u in users} == {("alice", False), ("bob", True)}

        _ok(admin(server.data_dir, "users", "enable", "bob"))
        again = await profiles.online("bob", receive=False)
        assert again.conn is not None
    finally:
        await profiles.close()
    audit = _ok(admin(server.data_dir, "audit", "show"))
    assert "admin.action action=user.disabled target=bob" in audit
    assert "admin.action action=user.enabled target=bob" in audit


def test_disabling_an_unknown_user_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    result = admin(tmp_path / "data", "users", "disable", "nobody")
    assert result.returncode != 0
    assert "no user named 'nobody'" in result.stderr


def _register_cli(
    server_url: str, fingerprint: str, profile: Path, name: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "bastion", "register", name, "--server", server_url),
            *("--fingerprint", fingerprint, "--profile", str(profile), *extra),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "BASTION_PASSPHRASE": PASSPHRASE},
        check=False,
    )


async def test_invite_only_and_closed_registration(
    tmp_path: Path, servers: ConfiguredServers
) -> None:
    server = servers.start(admin_poll_s=POLL)
    profiles = Profiles(tmp_path, server)
    try:
        await profiles.register("early")
        _ok(admin(server.data_dir, "policy", "set", "registration=invite"))
        await asyncio.sleep(POLL * 4)
        with pytest.raises(ServerRefusedError) as caught:
            await profiles.register("uninvited")
        assert caught.value.code == "invite_required"

        code = _ok(admin(server.data_dir, "invites", "create", "--uses", "1", "--expires", "1h"))
        code = code.strip()
        joined = await asyncio.to_thread(
            _register_cli,
            server.url,
            server.fingerprint,
            tmp_path / "p1",
            "invited",
            "--invite",
            code,
        )
        assert joined.returncode == 0, joined.stderr
        reused = await asyncio.to_thread(
            _register_cli,
            server.url,
            server.fingerprint,
            tmp_path / "p2",
            "second",
            "--invite",
            code,
        )
        assert reused.returncode != 0
        assert "invite code is unknown, used up or expired" in reused.stderr

        fresh = _ok(admin(server.data_dir, "invites", "create", "--json")).strip()
        _ok(admin(server.data_dir, "policy", "set", "registration=closed"))
        await asyncio.sleep(POLL * 4)
        closed = await asyncio.to_thread(
            _register_cli,
            server.url,
            server.fingerprint,
            tmp_path / "p3",
            "latecomer",
            "--invite",
            json.loads(fresh)["code"],
        )
        assert closed.returncode != 0
        assert "does not accept new accounts" in closed.stderr
        # Existing accounts are unaffected.
        assert (await profiles.online("early", receive=False)).conn is not None
    finally:
        await profiles.close()
    users = _ok(admin(server.data_dir, "users", "list"))
    assert "invited" in users
    assert "second" not in users
    assert "latecomer" not in users
    audit = _ok(admin(server.data_dir, "audit", "show"))
    assert "policy.changed by=admin setting=registration value=invite" in audit
    assert "reason=bad_invite" in audit


async def test_failed_registrations_under_the_open_policy_add_no_uses_to_an_invite(
    tmp_path: Path, servers: ConfiguredServers
) -> None:
    server = servers.start(admin_poll_s=POLL)
    profiles = Profiles(tmp_path, server)
    try:
        await profiles.register("taken")
        code = _ok(admin(server.data_dir, "invites", "create", "--uses", "1")).strip()
        # Under the open policy no use is taken, so a failed registration gives none back.
        for attempt in range(3):
            with pytest.raises(ServerRefusedError) as caught:
                await Client.register(
                    tmp_path / f"retry{attempt}",
                    PASSPHRASE,
                    username="taken",
                    server_url=server.url,
                    fingerprint=server.fingerprint,
                    invite=code,
                )
            assert caught.value.code == "username_taken"
        _ok(admin(server.data_dir, "policy", "set", "registration=invite"))
        await asyncio.sleep(POLL * 4)
        joined = await Client.register(
            tmp_path / "first",
            PASSPHRASE,
            username="first",
            server_url=server.url,
            fingerprint=server.fingerprint,
            invite=code,
        )
        await joined.close()
        with pytest.raises(ServerRefusedError) as caught:
            await Client.register(
                tmp_path / "second",
                PASSPHRASE,
                username="second",
                server_url=server.url,
                fingerprint=server.fingerprint,
                invite=code,
            )
        assert caught.value.code == "bad_invite"
    finally:
        await profiles.close()


def test_policy_show_and_set_on_a_stopped_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shown = json.loads(_ok(admin(data, "policy", "show", "--json")))
    assert shown == {
        "type": "policy",
        "version": 1,
        "registration": "open",
        "file_transfer": True,
        "max_file_mb": 100,
    }
    _ok(admin(data, "policy", "set", "file_transfer=off"))
    _ok(admin(data, "policy", "set", "max_file_mb=25"))
    # Every change raises the version that clients check against rollback.
    assert _ok(admin(data, "policy", "show")).splitlines() == [
        "version=3",
        "registration=open",
        "file_transfer=off",
        "max_file_mb=25",
    ]
    for bad in ("registration=maybe", "file_transfer=yes", "max_file_mb=0", "federation=on", "x"):
        result = admin(data, "policy", "set", bad)
        assert result.returncode != 0, bad
        assert result.stderr.startswith("error: ")
    # With no server holding the audit log, the command audits its own changes.
    audit = _ok(admin(data, "audit", "show"))
    assert "setting=file_transfer value=off" in audit
    assert "setting=max_file_mb value=25" in audit
    assert _ok(admin(data, "audit", "verify")).startswith("audit log intact")
