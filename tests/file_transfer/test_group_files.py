"""A file offered to a group: one upload, one group message, every member may fetch it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from bastion.client import Client, files, groups
from bastion.errors import ServerRefusedError
from tests.conftest import PASSPHRASE, Profiles
from tests.file_transfer.conftest import write
from tests.helpers import drain

pytestmark = pytest.mark.network


async def offers(client: Client) -> list[files.FileEvent]:
    return [e for e in await drain(client) if isinstance(e, files.FileEvent)]


async def test_file_offered_to_a_group_reaches_every_member_and_no_one_else(
    profiles: Profiles,
) -> None:
    for name in ("bob", "carol", "dave"):
        await profiles.register(name)
    for name in ("bob", "carol"):
        await profiles.befriend("alice", name)
    alice = await profiles.online("alice", receive=False)
    ops = await groups.create(alice, "ops", ["bob", "carol"])
    data = b"quarterly numbers\n" * 500
    (profiles.root / "out").mkdir()
    source = write(profiles.root / "out", "report.txt", data)

    sent = await files.send_file(alice, ops, source)

    for name in ("bob", "carol"):
        member = await profiles.online(name)
        [offer] = await offers(member)
        assert (offer.id, offer.sender, offer.name) == (sent.offer_id, "alice", "report.txt")
        folder = profiles.root / f"in-{name}"
        folder.mkdir()
        result = await files.get_file(member, offer.id, folder)
        assert result.verdict.is_clean
        assert result.saved_to is not None
        assert result.saved_to.read_bytes() == data

    # Dave is no member: he got no offer, and the blob is not his to download.
    dave = await profiles.online("dave")
    assert await offers(dave) == []
    conn = dave.connection()
    with pytest.raises(ServerRefusedError):
        await files.download_blob(conn, sent.blob, len(data) + 64, profiles.root / "dave.part")


async def test_cli_sends_a_file_to_a_group(profiles: Profiles) -> None:
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    alice = await profiles.online("alice", receive=False)
    await groups.create(alice, "ops", ["bob"])
    await alice.close()
    (profiles.root / "out").mkdir()
    source = write(profiles.root / "out", "plan.txt", b"the plan\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_PASSPHRASE"] = PASSPHRASE
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bastion", "file", "send", "--group", "ops", str(source),
         "--json", "--profile", str(profiles.path("alice"))],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sent = json.loads(result.stdout)
    assert sent["type"] == "file_sent"
    assert sent["to"].startswith("group:")
    bob = await profiles.online("bob")
    [offer] = await offers(bob)
    assert (offer.id, offer.name) == (sent["id"], "plan.txt")
