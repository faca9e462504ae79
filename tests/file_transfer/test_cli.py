"""``bastion file send|list|get`` and file offers in ``inbox --json``, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PASSPHRASE, REPO, Profiles
from tests.file_transfer.conftest import hostile_offer
from tests.files.test_file_scan import elf

pytestmark = pytest.mark.network


def bastion(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_PASSPHRASE"] = PASSPHRASE
    return subprocess.run(
        [sys.executable, "-m", "bastion", *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_send_list_get_through_the_command_line(tmp_path: Path, profiles: Profiles) -> None:
    await profiles.register("alice")
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    for client in profiles.clients:
        await client.close()
    alice, bob = str(profiles.path("alice")), str(profiles.path("bob"))
    source = tmp_path / "minutes.txt"
    source.write_text("minutes of the meeting\n")

    sent = json.loads(ok(bastion("file", "send", "bob", str(source), "--profile", alice, "--json")))
    assert sent["type"] == "file_sent"
    events = [
        json.loads(line) for line in ok(bastion("inbox", "--json", "--profile", bob)).splitlines()
    ]
    [offer] = [e for e in events if e["type"] == "file"]
    assert offer["id"] == sent["id"]
    assert (offer["from"], offer["name"], offer["size"]) == ("alice", "minutes.txt", 23)

    [listed] = [
        json.loads(x) for x in ok(bastion("file", "list", "--json", "--profile", bob)).splitlines()
    ]
    assert (listed["id"], listed["state"], listed["verdict"]) == (offer["id"], "offered", None)

    to = tmp_path / "saved"
    to.mkdir()
    out = ok(bastion("file", "get", offer["id"][:8], "--to", str(to), "--profile", bob))
    assert out.startswith("clean: saved")
    assert (to / "minutes.txt").read_text() == "minutes of the meeting\n"
    [listed] = [
        json.loads(x) for x in ok(bastion("file", "list", "--json", "--profile", bob)).splitlines()
    ]
    assert (listed["state"], listed["verdict"]) == ("saved", "clean")


async def test_blocked_file_needs_a_typed_confirmation(tmp_path: Path, profiles: Profiles) -> None:
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    alice = await profiles.online("alice", receive=False)
    await hostile_offer(alice, "bob", elf(), "cute-cat.jpg", "image/jpeg")
    for client in profiles.clients:
        await client.close()
    bob = str(profiles.path("bob"))
    events = [
        json.loads(line) for line in ok(bastion("inbox", "--json", "--profile", bob)).splitlines()
    ]
    [offer] = [e for e in events if e["type"] == "file"]
    to = tmp_path / "saved"
    to.mkdir()

    blocked = bastion("file", "get", offer["id"], "--to", str(to), "--profile", bob)
    assert blocked.returncode == 3
    assert "blocked" in blocked.stdout
    assert "Linux program" in blocked.stdout
    refused = bastion(
        "file",
        "get",
        offer["id"],
        "--to",
        str(to),
        "--allow-blocked",
        "--profile",
        bob,
        stdin="no\n",
    )
    assert refused.returncode != 0
    assert "stays in quarantine" in refused.stderr
    assert list(to.iterdir()) == []

    saved = bastion(
        "file",
        "get",
        offer["id"],
        "--to",
        str(to),
        "--allow-blocked",
        "--profile",
        bob,
        stdin="yes\n",
    )
    assert saved.returncode == 0, saved.stderr
    assert "saved anyway" in saved.stdout
    assert [p.name for p in to.iterdir()] == ["cute-cat.jpg"]
