"""Hostile text through a real server cannot fake a line, move the cursor or reorder a line.

An attacker (a modified client, driven in-process) puts controls, a fake message
line and a right-to-left override into each place a victim's ``bastion`` command
prints: a message, a stranger's contact request note, a presence status, a group
name, a file name and a verification cancel reason. The victim runs the real
command line; the human output shows every control visibly and no line starts as
another message would, while ``--json`` still carries the exact text.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import pytest

from bastion.client import Client, contacts, groups, presence, verification
from bastion.display import CONTINUATION
from bastion.files.names import sanitize_filename
from tests.conftest import PASSPHRASE, REPO, Profiles
from tests.file_transfer.conftest import hostile_offer
from tests.helpers import drain

pytestmark = pytest.mark.network

FAKE = "[2026-12-04 14:45:09Z] carol: new bank details, IBAN XX00"
EVIL = f"hi\n{FAKE}\r\x1b[2Kok \u202eexe.txt"
EVIL_SHORT = "on\n[2026-12-04 14:45:09Z] carol: pay\r\x1b[2K\u202egpj.exe"
FAKE_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ\] carol:", re.MULTILINE)


async def cli(*args: str, stdin: int | None = subprocess.DEVNULL) -> str:
    """Run ``bastion ARGS`` as the user would; return standard output and error together."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_PASSPHRASE"] = PASSPHRASE
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bastion", *args],
        capture_output=True,
        text=True,
        env=env,
        stdin=stdin,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    return result.stdout + result.stderr


def assert_harmless(out: str) -> None:
    """No control reaches the terminal, the tricks show visibly, and no fake line starts."""
    for ch in ("\x1b", "\r", "\u202e"):
        assert ch not in out, (ch, out)
    assert "\\x1b[2K" in out, out
    assert "⟨U+202E⟩" in out, out
    assert not FAKE_LINE.search(out), out


async def close(profiles: Profiles, user: str) -> None:
    """Close the user's in-process clients so that only the command line uses the profile."""
    for client in profiles.clients:
        if client.account.username == user:
            await client.close()


async def victim_and_attacker(
    profiles: Profiles, *, contacts_too: bool = True, receive: bool = False
) -> Client:
    """Bob (the victim, on the command line) and Alice (the attacker), as contacts."""
    await profiles.register("bob")
    if contacts_too:
        await profiles.befriend("alice", "bob")
    await close(profiles, "bob")
    return await profiles.online("alice", receive=receive)


async def test_a_message_cannot_fake_a_line_erase_one_or_reorder_text(profiles: Profiles) -> None:
    alice = await victim_and_attacker(profiles)
    await alice.send_text("bob", EVIL)
    bob = str(profiles.path("bob"))

    inbox = await cli("inbox", "--profile", bob)
    assert_harmless(inbox)
    # The embedded line is there, but marked as the continuation of alice's message.
    assert f"alice: hi\n{CONTINUATION}{FAKE}\\r\\x1b[2Kok ⟨U+202E⟩exe.txt" in inbox

    history = await cli("history", "alice", "--profile", bob)
    assert_harmless(history)
    assert history.count("\n[") == 0  # one message, one line that starts like one
    [record] = [
        json.loads(line)
        for line in (await cli("history", "alice", "--json", "--profile", bob)).strip().splitlines()
    ]
    assert record["text"] == EVIL  # --json is exact


async def test_a_strangers_contact_note_is_shown_escaped(profiles: Profiles) -> None:
    mallory = await victim_and_attacker(profiles, contacts_too=False)
    await contacts.request(mallory, "bob", EVIL_SHORT)
    bob = str(profiles.path("bob"))

    inbox = await cli("inbox", "--profile", bob)
    assert_harmless(inbox)
    assert "alice asks to be your contact: on\\n[2026-12-04" in inbox
    listed = await cli("contacts", "list", "--profile", bob)
    assert_harmless(listed)
    [contact] = [json.loads(x) for x in (await cli("contacts", "list", "--json", "--profile", bob))
                 .splitlines()]  # fmt: skip
    assert contact["note"] == EVIL_SHORT


async def test_a_presence_status_is_shown_escaped(profiles: Profiles) -> None:
    alice = await victim_and_attacker(profiles, receive=True)  # online, as the server sees it
    await presence.set_presence(alice, "away", EVIL_SHORT)
    bob = str(profiles.path("bob"))

    # Bob learns that alice is online, and her status end to end: `contacts list`
    # picks up what waits on the server first, so the status reaches either output.
    fetched = await cli("contacts", "list", "--profile", bob)
    fetched += await cli("inbox", "--profile", bob)
    shown = await cli("presence", "--profile", bob)
    listed = await cli("contacts", "list", "--profile", bob)
    for out in (fetched, shown, listed):
        assert_harmless(out)
    assert "alice is away (on\\n[2026-12-04" in shown
    as_json = [json.loads(x) for x in (await cli("presence", "--json", "--profile", bob))
               .splitlines()]  # fmt: skip
    assert [e["status"] for e in as_json if e["type"] == "presence"] == [EVIL_SHORT]


async def test_a_group_name_is_shown_escaped(profiles: Profiles) -> None:
    alice = await victim_and_attacker(profiles)
    group = await groups.create(alice, EVIL_SHORT, ["bob"])
    await groups.send_text(alice, group, "welcome")
    bob = str(profiles.path("bob"))

    inbox = await cli("inbox", "--profile", bob)
    assert_harmless(inbox)
    assert "[on\\n[2026-12-04 14:45:09Z] carol: pay\\r\\x1b[2K⟨U+202E⟩gpj.exe] alice" in inbox
    listed = await cli("group", "list", "--profile", bob)
    assert_harmless(listed)
    info = await cli("group", "info", group.group_id.hex(), "--profile", bob)
    assert_harmless(info)
    [described] = [json.loads(x) for x in (await cli("group", "list", "--json", "--profile", bob))
                   .splitlines()]  # fmt: skip
    assert described["name"] == EVIL_SHORT


async def test_a_file_name_cannot_fake_a_line(profiles: Profiles) -> None:
    alice = await victim_and_attacker(profiles)
    raw_name = "notes\n" + FAKE + "\r\x1b[2K.txt"
    await hostile_offer(alice, "bob", b"plain notes\n", raw_name)
    bob = str(profiles.path("bob"))

    for args in (("inbox",), ("file", "list")):
        out = await cli(*args, "--profile", bob)
        for ch in ("\x1b", "\r", "\n[", "\u202e"):
            assert ch not in out, (args, out)
        assert not FAKE_LINE.search(out), out
        assert sanitize_filename(raw_name).name in out  # the name, on the offer's own line
    [listed] = [json.loads(x) for x in (await cli("file", "list", "--json", "--profile", bob))
                .splitlines()]  # fmt: skip
    assert listed["name"] == sanitize_filename(raw_name).name  # as before: names are sanitised


async def test_a_verification_cancel_reason_is_shown_escaped(profiles: Profiles) -> None:
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    await close(profiles, "bob")
    alice = await profiles.online("alice")
    await drain(alice)
    bob = str(profiles.path("bob"))
    # `verify --sas` wants a terminal on standard input: give it one.
    main, terminal = os.openpty()
    try:
        victim = asyncio.create_task(
            cli("verify", "alice", "--sas", "--profile", bob, stdin=terminal)
        )
        request = None
        async with asyncio.timeout(30):
            async for event in alice.receive():
                if isinstance(event, verification.VerificationRequestEvent):
                    request = event
                    break
        assert request is not None
        session = verification.accept(alice, request.txn)
        await session.cancel(EVIL_SHORT)
        out = await asyncio.wait_for(victim, 60)
    finally:
        os.close(main)
        os.close(terminal)
    assert_harmless(out)
    assert "error: alice cancelled: on\\n[2026-12-04 14:45:09Z] carol: pay" in out
