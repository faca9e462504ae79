"""Groups, files, verification, devices, the export and server-info through a running gateway.

As in ``test_cli_via_gateway``: a real server, a real ``bastion gateway`` for
alice, and the ``bastion`` command with no passphrase anywhere, so a command can
only work through the gateway. The server's audit log would show a second
sign-in of alice's device. Then the gateway stops and the same commands run
directly: what they print must be what they printed through the gateway.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PASSPHRASE, REPO, ServerProcess
from tests.gateway.support import GatewayProcess, pair, subscribed
from tests.gateway.test_cli_via_gateway import connected, lines, no_reconnect, signins
from tests.test_cli import bastion

pytestmark = pytest.mark.network

EXPORT_PASSPHRASE = "a separate passphrase for the export"


def cli(
    *args: str,
    passphrase: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``bastion ARGS`` as a user runs it, by default with no passphrase anywhere."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    if passphrase is not None:
        environ["BASTION_PASSPHRASE"] = passphrase
    environ.update(env or {})
    result = subprocess.run(
        [sys.executable, "-m", "bastion", *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=cwd or REPO,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"bastion {args} failed: {result.stderr}")
    return result


async def run(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """:func:`cli` off the event loop, so the gateway's events keep coming in."""
    return await asyncio.to_thread(cli, *args, **kw)


# The commands whose output must not depend on the gateway (run after the changes below).
SAME_EITHER_WAY = (
    ("verify", "bob", "--json"),
    ("verify", "bob"),
    ("devices", "list", "--json"),
    ("devices", "list"),
    ("server-info", "--json"),
    ("server-info",),
    ("group", "info", "ops", "--json"),
    ("group", "info", "ops"),
    ("group", "list", "--json"),
    ("group", "list"),
    ("file", "list", "--json"),
    ("file", "list"),
)


async def test_profile_commands_work_through_the_gateway_and_print_as_without_it(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice, bob = pair(server, tmp_path)
    me = str(alice)
    report = tmp_path / "report.txt"
    report.write_text("quarterly numbers\n")
    (tmp_path / "from-bob.txt").write_text("bob's notes\n")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    gw = GatewayProcess(alice)
    gw.start()
    try:
        await connected(gw)
        before = signins(server, "alice")
        async with subscribed(gw) as (_link, events):
            # Groups: create, add a contact (added at once), send, info.
            [created] = lines(await run("group", "create", "ops", "--json", "--profile", me))
            assert (created["type"], created["name"], created["members"]) == (
                "group",
                "ops",
                ["alice"],
            )
            [added] = lines(await run("group", "add", "ops", "bob", "--json", "--profile", me))
            assert (added["group"], added["members"]) == (created["group"], ["alice", "bob"])
            [sent] = lines(
                await run("send", "--group", "ops", "hello group", "--json", "--profile", me)
            )
            assert (sent["type"], sent["conversation"]) == ("sent", f"group:{created['group']}")
            assert (await run("send", "--group", "ops", "second", "--profile", me)).stdout == ""
            mistake = await run("group", "admin", "ops", "bob", "--profile", me, check=False)
            assert (mistake.returncode, mistake.stderr) == (
                1,
                "error: say what to do: --grant or --revoke\n",
            )

            # Files: a relative path is the command's, not the gateway's working folder.
            [offer] = lines(
                await run(
                    "file", "send", "bob", "report.txt", "--json", "--profile", me, cwd=tmp_path
                )
            )
            assert (offer["type"], offer["to"], offer["name"], offer["size"]) == (
                "file_sent",
                "bob",
                "report.txt",
                18,
            )
            await asyncio.to_thread(
                bastion,
                "file",
                "send",
                "alice",
                str(tmp_path / "from-bob.txt"),
                "--profile",
                str(bob),
            )
            await events.wait_for(lambda e: e.get("type") == "file", "the offer from bob")
            [listed] = lines(await run("file", "list", "--json", "--profile", me))
            assert (listed["from"], listed["name"], listed["state"]) == (
                "bob",
                "from-bob.txt",
                "offered",
            )
            [got] = lines(
                await run(
                    "file",
                    "get",
                    listed["id"][:8],
                    "--to",
                    "downloads",
                    "--json",
                    "--profile",
                    me,
                    cwd=tmp_path,
                )
            )
            assert (got["state"], got["verdict"]) == ("saved", "clean")
            assert (downloads / "from-bob.txt").read_text() == "bob's notes\n"

            # Verification: the number, then marking bob verified with it.
            [number] = lines(await run("verify", "bob", "--json", "--profile", me))
            assert (number["type"], number["user"], number["trust"]) == (
                "safety_number",
                "bob",
                "unverified",
            )
            confirmed = await run(
                "verify", "bob", "--confirm", number["safety_number"], "--profile", me
            )
            assert confirmed.stdout == "The safety number matches: bob is verified.\n"
            qr = tmp_path / "qr.png"
            await run("verify", "bob", "--qr", str(qr), "--profile", me)
            assert qr.read_bytes().startswith(b"\x89PNG")

            # The export: its passphrase is asked for by the command and the file is private.
            export = tmp_path / "alice.export"
            exported = await run(
                "account",
                "export",
                "alice.export",
                "--profile",
                me,
                env={"BASTION_EXPORT_PASSPHRASE": EXPORT_PASSPHRASE},
                cwd=tmp_path,
            )
            assert exported.stdout.startswith("account exported to alice.export;")
            assert stat.S_IMODE(export.stat().st_mode) == 0o600
            assert export.stat().st_size > 0

            via = [await run(*command, "--profile", me) for command in SAME_EITHER_WAY]
            assert signins(server, "alice") == before
            no_reconnect(events)
    finally:
        assert await asyncio.to_thread(gw.stop) == 0

    # Bob received what went through the gateway.
    received = lines(bastion("inbox", "--json", "--profile", str(bob)))
    texts = [m["text"] for m in received if m["type"] == "message"]
    assert texts == ["hello group", "second"]
    assert [f["name"] for f in received if f["type"] == "file"] == ["report.txt"]

    direct = [
        await asyncio.to_thread(cli, *command, "--profile", me, passphrase=PASSPHRASE)
        for command in SAME_EITHER_WAY
    ]
    for command, through, alone in zip(SAME_EITHER_WAY, via, direct, strict=True):
        assert (through.stdout, through.stderr) == (alone.stdout, alone.stderr), command
        assert through.stdout, command
    [shown] = lines(via[0])
    assert (shown["user"], shown["trust"]) == ("bob", "verified")
    assert [d["this_device"] for d in lines(via[2])] == [True]
    assert lines(via[6])[0]["devices"].keys() == {"alice", "bob"}
    assert "  bob (member): " in via[7].stdout
