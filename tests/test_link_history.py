"""History and trust on a new device: sent over the link, sealed, through a real server.

The server records every frame; after the link the new device shows the old
conversations and the verified contact, and no canary of that history is in
a recorded frame or in the server's data folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bastion.client import Client, HistoryRecord, devices, link_history, trust
from bastion.client.link_history import ALL_HISTORY, HistoryChoice, HistorySummary
from bastion.crypto.payload import direct_conversation
from bastion.errors import AuthenticationError
from bastion.protocol import frames
from tests.conftest import PASSPHRASE, Profiles, ServerProcess
from tests.gateway.test_cli_via_gateway_more import Terminal
from tests.helpers import next_events, texts
from tests.malicious_server import SCRIPT, TAMPER_ENV, read_record
from tests.test_canary import find_in_bytes, find_in_files, new_canary
from tests.test_cli import bastion

pytestmark = pytest.mark.network

DAY_MS = 86_400_000


async def link(
    profiles: Profiles, existing: Client, name: str, choice: HistoryChoice
) -> tuple[devices.LinkedDevice, Client, HistorySummary]:
    """Link a new device through ``existing`` sending ``choice``; the new one connected."""
    codes: asyncio.Queue[str] = asyncio.Queue()
    offer = asyncio.create_task(devices.offer_link(existing, codes.put_nowait, history=choice))
    code = await asyncio.wait_for(codes.get(), 10)
    kept: list[HistorySummary] = []
    new = await devices.join_with_code(
        profiles.path(name),
        PASSPHRASE,
        code=code,
        server_url=profiles.server.url,
        fingerprint=profiles.server.fingerprint,
        on_history=kept.append,
    )
    profiles.clients.append(new)
    linked = await asyncio.wait_for(offer, 10)
    await new.connect(receive=False)
    return linked, new, kept[0]


async def talk(profiles: Profiles) -> tuple[Client, Client, list[str]]:
    """alice and bob exchange two canaries; alice verifies bob. Returns (alice, bob, canaries)."""
    alice = await profiles.online("alice")
    bob = await profiles.online("bob")
    await profiles.befriend("alice", "bob")
    canaries = [new_canary(), new_canary()]
    await alice.send_text("bob", f"first {canaries[0]}")
    assert texts(await next_events(bob, 1)) == [f"first {canaries[0]}"]
    await bob.send_text("alice", f"second {canaries[1]}")
    assert texts(await next_events(alice, 1)) == [f"second {canaries[1]}"]
    number = await trust.safety_number_with(alice, "bob")
    trust.mark_verified(alice, "bob", number)
    return alice, bob, canaries


def link_frames(path: Path) -> list[frames.Frame]:
    """The link frames the server received or sent."""
    found: list[frames.Frame] = []
    for direction, data in read_record(path):
        frame = (
            frames.decode_client_frame(data)
            if direction == "in"
            else frames.decode_server_frame(data)
        )
        if isinstance(frame, frames.LinkMore | frames.LinkAnswer | frames.LinkPush):
            found.append(frame)
    return found


async def test_new_device_shows_the_history_and_the_verified_contact_and_the_server_saw_neither(
    recorded: tuple[ServerProcess, Profiles], tmp_path: Path
) -> None:
    server, profiles = recorded
    alice, bob, canaries = await talk(profiles)
    expected = [r.text for r in alice.history("bob")]
    assert expected == [f"first {canaries[0]}", f"second {canaries[1]}"]

    linked, laptop, kept = await link(profiles, alice, "alice-laptop", ALL_HISTORY)
    assert kept == HistorySummary(messages=2, conversations=1, verified=1)
    assert linked.history == kept
    assert [r.text for r in laptop.history("bob")] == expected
    assert [r.direction for r in laptop.history("bob")] == ["out", "in"]
    shown = laptop.contact("bob")
    assert shown is not None
    assert shown.trust == "verified"
    # The same safety number as on the first device, and bob's key is the one she verified.
    assert await trust.safety_number_with(laptop, "bob") == await trust.safety_number_with(
        alice, "bob"
    )
    # The new device talks to bob as any other device; new messages join the old history.
    await laptop.send_text("bob", "from the laptop")
    # bob is told of alice's new device, then gets its message.
    assert texts(await next_events(bob, 2)) == ["from the laptop"]
    assert [r.text for r in laptop.history("bob")] == [*expected, "from the laptop"]

    pieces = [f for f in link_frames(tmp_path / "frames.txt") if isinstance(f, frames.LinkMore)]
    assert len(pieces) == 1, "the history did not pass through the link"
    wire = b"".join(data for _, data in read_record(tmp_path / "frames.txt"))
    server_files = [server.data_dir, server.log_path]
    for canary in canaries:
        assert find_in_bytes(wire, canary) == []
        assert find_in_files(server_files, canary) == []
    # In the new device's profile only sealed, like everywhere else.
    assert find_in_files([profiles.path("alice-laptop")], canaries[0]) == []


async def test_with_history_none_nothing_but_the_grant_is_sent(
    recorded: tuple[ServerProcess, Profiles], tmp_path: Path
) -> None:
    _, profiles = recorded
    alice, _, _ = await talk(profiles)
    linked, laptop, kept = await link(profiles, alice, "alice-laptop", link_history.NO_HISTORY)
    assert kept == linked.history == HistorySummary()
    assert laptop.history("bob") == []
    assert laptop.contact("bob") is None
    sent = link_frames(tmp_path / "frames.txt")
    assert [type(f).__name__ for f in sent if not isinstance(f, frames.LinkPush)] == ["LinkAnswer"]


async def test_days_send_only_the_recent_messages(profiles: Profiles) -> None:
    alice, _, canaries = await talk(profiles)
    old = HistoryRecord(
        id=secrets.token_bytes(16),
        sender="alice",
        device=alice.account.device_id,
        peer="bob",
        conversation=direct_conversation("alice", "bob"),
        text="from ten days ago",
        sent_at=alice.history("bob")[0].sent_at - 10 * DAY_MS,
        server_ts=0,
        direction="out",
        state="sent",
    )
    with alice.profile.transaction():
        alice.profile.add_message(old.conversation, old.id, old)
    _, laptop, kept = await link(profiles, alice, "alice-laptop", link_history.parse_choice("7"))
    assert kept.messages == 2
    assert [r.text for r in laptop.history("bob")] == [
        f"first {canaries[0]}",
        f"second {canaries[1]}",
    ]


async def test_a_dropped_piece_of_history_is_refused_and_nothing_is_linked(
    tmp_path: Path,
    server_factory: Callable[..., ServerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TAMPER_ENV, "drop-link-piece")
    server = server_factory("server", script=SCRIPT)
    profiles = Profiles(tmp_path, server)
    try:
        alice = await profiles.online("alice", receive=False)
        await profiles.online("bob", receive=False)
        await profiles.befriend("alice", "bob")
        for _ in range(6):  # about 90 KB: two pieces
            await alice.send_text("bob", secrets.token_hex(7500))
        codes: asyncio.Queue[str] = asyncio.Queue()
        offer = asyncio.create_task(
            devices.offer_link(alice, codes.put_nowait, history=ALL_HISTORY)
        )
        code = await asyncio.wait_for(codes.get(), 10)
        with pytest.raises(AuthenticationError, match="not sealed for this link"):
            await devices.join_with_code(
                profiles.path("alice-laptop"),
                PASSPHRASE,
                code=code,
                server_url=server.url,
                fingerprint=server.fingerprint,
            )
        assert not (profiles.path("alice-laptop") / "profile.json").exists()
        offer.cancel()
        await asyncio.gather(offer, return_exceptions=True)
        listed = {d.device_id for d in await devices.list_devices(alice)}
        assert listed == {alice.account.device_id}
    finally:
        await profiles.close()


async def test_the_commands_send_and_show_the_history_and_the_verified_state(
    profiles: Profiles,
) -> None:
    alice, _, canaries = await talk(profiles)
    await alice.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_PASSPHRASE"] = PASSPHRASE
    showing = subprocess.Popen(  # noqa: ASYNC220 - started once; read off the loop
        [sys.executable, "-m", "bastion", "devices", "link", "--history", "all", "--json",
         "--profile", str(profiles.path("alice"))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        text=True, env=env,
    )  # fmt: skip
    try:
        assert showing.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(showing.stdout.readline), 30)
        code = json.loads(line)["code"]
        laptop = str(profiles.path("alice-laptop"))
        joined = await asyncio.to_thread(
            bastion, "link", code, "--server", profiles.server.url, "--profile", laptop
        )
        assert "received 2 messages in 1 conversation and 1 verified contact" in joined.stdout
        out, err = await asyncio.to_thread(showing.communicate, timeout=30)
        assert showing.returncode == 0, err
        sent = {"messages": 2, "conversations": 1, "verified": 1}
        assert json.loads(out)["history"] == sent
    finally:
        if showing.poll() is None:
            showing.kill()
            showing.wait(10)
    shown = await asyncio.to_thread(bastion, "history", "bob", "--json", "--profile", laptop)
    texts_shown = [json.loads(line)["text"] for line in shown.stdout.splitlines()]
    assert texts_shown == [f"first {canaries[0]}", f"second {canaries[1]}"]
    verify = await asyncio.to_thread(bastion, "verify", "bob", "--json", "--profile", laptop)
    assert json.loads(verify.stdout)["trust"] == "verified"
    bad = await asyncio.to_thread(
        bastion, "devices", "link", "--history", "forever", "--profile",
        str(profiles.path("alice")), check=False,
    )  # fmt: skip
    assert bad.returncode != 0
    assert "'all', 'none' or a number of days" in bad.stderr


async def test_in_a_terminal_the_command_asks_what_to_send(profiles: Profiles) -> None:
    alice, _, canaries = await talk(profiles)
    await alice.close()
    terminal = Terminal("devices", "link", "--profile", str(profiles.path("alice")))
    try:
        await terminal.read_until(b"Type all, a number of days, or none [none]: ")
        terminal.type("forever")
        await terminal.read_until(b"a number of days from 1 to 36500")
        terminal.type("30")
        await terminal.read_until(b"Profile passphrase: ")
        terminal.type(PASSPHRASE)
        await terminal.read_until(b"Waiting...")
        code = re.search(rb"bastion link (\S+) --server", terminal.screen)
        assert code is not None
        laptop = str(profiles.path("alice-laptop"))
        joined = await asyncio.to_thread(
            bastion, "link", code[1].decode(), "--server", profiles.server.url, "--profile", laptop
        )
        assert "received 2 messages in 1 conversation and 1 verified contact" in joined.stdout
        await terminal.read_until(b"sent 2 messages in 1 conversation and 1 verified contact")
        assert await terminal.exit_status() == 0
    finally:
        terminal.close()
    shown = await asyncio.to_thread(bastion, "history", "bob", "--json", "--profile", laptop)
    assert [json.loads(line)["text"] for line in shown.stdout.splitlines()] == [
        f"first {canaries[0]}",
        f"second {canaries[1]}",
    ]
