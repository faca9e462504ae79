"""The signed organisation policy: pinned on first use, checked on every connection."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bastion.client import policy
from bastion.errors import UntrustedServerError
from tests.conftest import PASSPHRASE, Profiles, ServerProcess
from tests.malicious_server import SCRIPT, TAMPER_ENV

pytestmark = pytest.mark.network


def admin(server: ServerProcess, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "bastion", "admin", "--data", str(server.data_dir), *args],
        check=True,
        capture_output=True,
        timeout=60,
    )


async def wait_for_version(profiles: Profiles, name: str, version: int) -> None:
    """Connect until the server (which polls its admin table) serves ``version``."""
    for _ in range(50):
        client = await profiles.online(name, receive=False)
        document = policy.current(client)
        await client.close()
        if document is not None and document.version >= version:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"policy version {version} never served")


async def test_policy_is_pinned_shown_and_followed_to_newer_versions(
    profiles: Profiles, server: ServerProcess
) -> None:
    alice = await profiles.online("alice", receive=False)
    first = policy.current(alice)
    assert first is not None
    assert (first.version, first.registration, first.file_transfer) == (1, "open", True)
    key = policy.pinned_key(alice)
    await alice.close()

    admin(server, "policy", "set", "file_transfer=off")
    await wait_for_version(profiles, "alice", 2)
    alice = await profiles.online("alice", receive=False)
    newer = policy.current(alice)
    assert newer is not None
    assert (newer.version, newer.file_transfer) == (2, False)
    assert policy.pinned_key(alice) == key

    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_PASSPHRASE"] = PASSPHRASE
    shown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bastion", "server-info", "--json",
         "--profile", str(profiles.path("alice"))],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    )  # fmt: skip
    info = json.loads(shown.stdout)
    assert info["policy"] == {
        "version": 2, "registration": "open", "file_transfer": False, "max_file_mb": 100,
    }  # fmt: skip
    assert info["policy_key"] == policy.key_fingerprint(key or b"")


async def test_rolled_back_policy_is_refused(profiles: Profiles, server: ServerProcess) -> None:
    await profiles.register("alice")
    admin(server, "policy", "set", "registration=invite")
    await wait_for_version(profiles, "alice", 2)
    # The server's database is restored from an older backup: its policy is
    # validly signed, but older than what alice has seen.
    with sqlite3.connect(server.data_dir / "bastion.db") as db:
        db.execute("UPDATE policy SET value = '1' WHERE key = '_version'")
    server.stop()
    server.start()
    with pytest.raises(UntrustedServerError, match="rolled-back"):
        await profiles.online("alice", receive=False)


async def test_policy_signed_by_another_key_is_refused(
    profiles: Profiles, server: ServerProcess
) -> None:
    await profiles.online("alice", receive=False)
    server.stop()
    (server.data_dir / "policy.key").unlink()
    server.start()
    with pytest.raises(UntrustedServerError, match="policy key changed"):
        await profiles.online("alice", receive=False)


async def test_forged_policy_signature_is_refused(
    server_factory: Callable[..., ServerProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TAMPER_ENV, "forge-policy")
    forged = server_factory("forging", script=SCRIPT)
    profiles = Profiles(tmp_path, forged)
    try:
        await profiles.register("alice")
        with pytest.raises(UntrustedServerError, match="not validly signed"):
            await profiles.online("alice", receive=False)
    finally:
        await profiles.close()
