"""Groups, files, verification, devices, the export and server-info through a running gateway.

As in ``test_cli_via_gateway``: a real server, a real ``bastion gateway`` for
alice, and the ``bastion`` command with no passphrase anywhere, so a command can
only work through the gateway. The server's audit log would show a second
sign-in of alice's device. Then the gateway stops and the same commands run
directly: what they print must be what they printed through the gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bastion.server.audit.log import AUDIT_DIR, read_records
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
            [granted] = lines(
                await run("group", "admin", "ops", "bob", "--grant", "--json", "--profile", me)
            )
            assert granted["admins"] == ["alice", "bob"]
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
    assert "  bob (admin): " in via[7].stdout


class Terminal:
    """``bastion ARGS`` on a pseudo-terminal (the SAS question needs one), no passphrase."""

    def __init__(self, *args: str) -> None:
        self.primary, secondary = pty.openpty()
        environ = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bastion", *args],
            stdin=secondary,
            stdout=secondary,
            stderr=secondary,
            env=environ,
            cwd=REPO,
        )
        os.close(secondary)
        self.screen = b""

    async def read_until(self, marker: bytes, wait_s: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while marker not in self.screen:
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"{marker!r} not shown: {self.screen!r}")
            try:
                chunk = await asyncio.wait_for(asyncio.to_thread(os.read, self.primary, 4096), left)
            except OSError:  # the process ended and the terminal closed
                chunk = b""
            if not chunk:
                raise AssertionError(f"{marker!r} not shown before the end: {self.screen!r}")
            self.screen += chunk

    def type(self, line: str) -> None:
        os.write(self.primary, line.encode() + b"\n")

    async def exit_status(self) -> int:
        return await asyncio.to_thread(self.proc.wait, 30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.primary)


async def test_sas_verification_and_linking_a_device_through_the_gateway(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice, bob = pair(server, tmp_path)
    alice_gw, bob_gw = GatewayProcess(alice), GatewayProcess(bob)
    alice_gw.start()
    bob_gw.start()
    try:
        await connected(alice_gw)
        await connected(bob_gw)
        before = signins(server, "alice")
        async with subscribed(bob_gw) as (bob_link, bob_events):

            async def bob_answers(round_: int) -> dict[str, Any]:
                """Bob answers alice's request through his gateway; his codes."""
                await bob_events.wait_for(
                    lambda e: (
                        len(
                            [
                                x
                                for x in bob_events.of("verification_request")
                                if x["from"] == "alice"
                            ]
                        )
                        >= round_
                    ),
                    "alice's request",
                )
                started = await bob_link.call("verify.sas_start", user="alice")
                return await bob_events.wait_for(
                    lambda e: e["type"] == "verification_codes" and e["id"] == started["id"],
                    "bob's codes",
                )

            # The codes differ (alice says no): nothing is marked, as without the gateway.
            no = Terminal("verify", "bob", "--sas", "--profile", str(alice))
            try:
                await no.read_until(b"Waiting for bob (they run: bastion verify alice --sas)")
                differ = await bob_answers(1)
                await no.read_until(b"Do they match exactly? [y/N] ")
                no.type("n")
                await bob_link.call("verify.sas_cancel", id=differ["id"])  # bob says no too
                assert await no.exit_status() == 1
                await no.read_until(b"error: the codes did not match; nothing was marked verified")
            finally:
                no.close()
            [shown] = lines(await run("verify", "bob", "--json", "--profile", str(alice)))
            assert shown["trust"] == "unverified"

            # They match: alice says yes at her terminal, bob confirms through his gateway.
            yes = Terminal("verify", "bob", "--sas", "--profile", str(alice))
            try:
                await yes.read_until(b"Waiting for bob")
                codes = await bob_answers(2)
                await yes.read_until(b"Do they match exactly? [y/N] ")
                yes.type("y")
                await bob_link.call("verify.sas_confirm", id=codes["id"])
                await yes.read_until(b"bob is verified.")
                assert await yes.exit_status() == 0
            finally:
                yes.close()
            screen = yes.screen.decode()
            assert " ".join(f"{n:04d}" for n in codes["decimals"]) in screen
            assert codes["emoji"][0]["name"] in screen
            [shown] = lines(await run("verify", "bob", "--json", "--profile", str(alice)))
            assert shown["trust"] == "verified"

        # Linking: the code comes from the gateway, the outcome as its event.
        offering = subprocess.Popen(  # noqa: ASYNC220 - started once; read off the loop
            [sys.executable, "-m", "bastion", "devices", "link", "--json", "--profile", str(alice)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("BASTION_")},
            cwd=REPO,
        )
        try:
            assert offering.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(offering.stdout.readline), 30)
            offer = json.loads(line)
            assert (offer["type"], offer.keys()) == ("link_code", {"type", "code"})
            second = tmp_path / "alice-laptop"
            joined = await asyncio.to_thread(
                cli, "link", offer["code"], "--server", server.url, "--profile", str(second),
                passphrase=PASSPHRASE,
            )  # fmt: skip
            device = joined.stdout.split("(device ")[1].split(")")[0]
            assert "no history was sent" in joined.stdout  # --json without --history: none
            out, err = await asyncio.to_thread(offering.communicate, timeout=30)
            assert offering.returncode == 0, err
            nothing = {"messages": 0, "conversations": 0, "verified": 0}
            assert json.loads(out) == {"type": "linked", "device": device, "history": nothing}
        finally:
            if offering.poll() is None:
                offering.kill()
                offering.wait(10)
        listed = lines(await run("devices", "list", "--json", "--profile", str(alice)))
        assert device in [d["device"] for d in listed]
        revoked = await run("devices", "revoke", device, "--profile", str(alice))
        assert revoked.stdout == f"revoked {device}\n"
        listed = lines(await run("devices", "list", "--json", "--profile", str(alice)))
        assert device not in [d["device"] for d in listed]
        # Only the new device may have signed in (as itself); alice's first device never again.
        new_device = sum(
            1
            for r in read_records(server.data_dir / AUDIT_DIR)
            if r.event == "signin.ok" and r.fields.get("device") == device
        )
        assert signins(server, "alice") == before + new_device
    finally:
        alice_gw.kill()
        bob_gw.kill()
