"""The command line through a running gateway: no passphrase, no second connection, same output.

A real server, a real ``bastion gateway`` process for alice, and the ``bastion``
command run as a user runs it. Without the passphrase in the environment (and
no terminal), a command can only work through the gateway; the server's audit
log counts alice's sign-ins, so a second connection would show; the gateway's
own events say whether it was ever cut off.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bastion.cli._common import event_json, print_event
from bastion.cli._gateway import print_event_json
from bastion.client import (
    DevicesChangedEvent,
    Event,
    HistoryRecord,
    KeyChangedEvent,
    MessageEvent,
    WarningEvent,
    contacts,
    files,
    group_invites,
    groups,
    presence,
    receipts,
    verification,
)
from bastion.gateway.paths import hold_lock
from bastion.server.audit.log import AUDIT_DIR, read_records
from tests.conftest import REPO, ServerProcess
from tests.gateway.support import Events, GatewayProcess, pair, subscribed
from tests.test_cli import bastion, register

pytestmark = pytest.mark.network


def signins(server: ServerProcess, user: str) -> int:
    """How many times ``user`` signed in to the server, from its audit log."""
    return sum(
        1
        for r in read_records(server.data_dir / AUDIT_DIR)
        if r.event == "signin.ok" and r.fields.get("user") == user
    )


def lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def shape(obj: dict[str, Any]) -> dict[str, str]:
    return {key: type(value).__name__ for key, value in obj.items()}


async def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``bastion ARGS`` with no passphrase anywhere, off the event loop (events keep coming)."""
    return await asyncio.to_thread(bastion, *args, passphrase=None, check=check)


async def status(gw: GatewayProcess) -> dict[str, Any]:
    async with await gw.link() as link:
        answer: dict[str, Any] = await link.call("status")
        return answer


async def connected(gw: GatewayProcess) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while (await status(gw))["connection"] != "connected":
        if loop.time() > deadline:
            raise AssertionError("the gateway did not connect")
        await asyncio.sleep(0.1)


@pytest.fixture
def alice_gateway(server: ServerProcess, tmp_path: Path) -> Iterator[tuple[GatewayProcess, Path]]:
    """alice and bob are contacts; a gateway runs for alice. Yields it and bob's profile."""
    alice, bob = pair(server, tmp_path)
    gw = GatewayProcess(alice)
    gw.start()
    try:
        yield gw, bob
    finally:
        gw.kill()


def no_reconnect(events: Events) -> None:
    states = [e["state"] for e in events.of("connection")]
    assert "reconnecting" not in states, states
    assert "stopped" not in states, states


async def test_commands_work_without_passphrase_and_open_no_second_connection(
    server: ServerProcess, alice_gateway: tuple[GatewayProcess, Path]
) -> None:
    gw, bob = alice_gateway
    alice = str(gw.profile)
    await connected(gw)
    before = signins(server, "alice")
    async with subscribed(gw) as (_link, events):
        [sent] = lines(
            await run("send", "bob", "hello through the gateway", "--json", "--profile", alice)
        )
        assert (sent["type"], sent["to"], sent["state"]) == ("sent", "bob", "stored")
        human = await run("send", "bob", "second one", "--profile", alice)
        assert human.stdout.startswith("stored on the server for bob")

        history = lines(await run("history", "bob", "--json", "--profile", alice))
        assert [m["text"] for m in history][-2:] == ["hello through the gateway", "second one"]
        assert history[-2]["id"] == sent["id"]
        shown = (await run("history", "bob", "--profile", alice)).stdout.splitlines()
        assert shown[-1].endswith("you -> bob: second one"), shown

        [me] = lines(await run("whoami", "--json", "--profile", alice))
        assert (me["type"], me["user"], me["server"]) == ("whoami", "alice", server.url)
        assert (await run("whoami", "--profile", alice)).stdout.startswith("alice on ")

        listing = lines(await run("contacts", "list", "--json", "--profile", alice))
        assert [(c["user"], c["state"]) for c in listing] == [("bob", "accepted")]
        assert (await run("contacts", "list", "--profile", alice)).stdout.startswith(
            "bob  accepted"
        )

        assert (await run("outbox", "--json", "--profile", alice)).stdout == ""

        away = lines(
            await run("presence", "set", "away", "--status", "lunch", "--json", "--profile", alice)
        )
        assert away[0] == {
            "type": "presence_set",
            "state": "away",
            "status": "lunch",
            "not_told": [],
        }
        presence = lines(await run("presence", "--json", "--profile", alice))
        assert presence[0] == {"type": "presence_self", "state": "away", "status": "lunch"}
        assert [p["user"] for p in presence[1:]] == ["bob"]
        assert (await run("presence", "--profile", alice)).stdout.startswith("you are away (lunch)")

        inbox = await run("inbox", "--profile", alice)
        assert inbox.stdout == ""
        assert "the gateway receives for this profile" in inbox.stderr

        assert signins(server, "alice") == before
        assert (await status(gw))["connection"] == "connected"
        no_reconnect(events)

    # The messages really left: bob receives them.
    received = lines(bastion("inbox", "--json", "--profile", str(bob)))
    texts = [m["text"] for m in received if m["type"] == "message"]
    assert texts == ["hello through the gateway", "second one"]


async def test_a_send_while_the_server_is_out_of_reach_is_queued_and_goes_out_later(
    server: ServerProcess, alice_gateway: tuple[GatewayProcess, Path]
) -> None:
    gw, bob = alice_gateway
    alice = str(gw.profile)
    await connected(gw)
    async with subscribed(gw) as (_link, events):
        await asyncio.to_thread(server.stop)
        await events.wait_for(lambda e: e.get("state") == "reconnecting", "the gateway to notice")
        result = await run("send", "bob", "later", "--json", "--profile", alice)
        [queued] = lines(result)
        assert (queued["type"], queued["to"], queued["state"]) == ("queued", "bob", "queued")
        human = await run("send", "bob", "later too", "--profile", alice)
        assert "it goes out when the server can be reached" in human.stdout
        waiting = (await run("outbox", "--profile", alice)).stdout.splitlines()
        assert [line.split(": ", 1)[1] for line in waiting] == [
            "later  [queued: goes out when the server can be reached]",
            "later too  [queued: goes out when the server can be reached]",
        ]
        await asyncio.to_thread(server.start)
        await events.wait_for(
            lambda e: e.get("id") == queued["id"] and e.get("state") in ("sent", "delivered"),
            "the queued message to go out",
        )
    assert (await run("outbox", "--profile", alice)).stdout == ""
    received = lines(bastion("inbox", "--json", "--profile", str(bob)))
    assert [m["text"] for m in received if m["type"] == "message"] == ["later", "later too"]


async def test_a_refused_send_says_why_as_without_the_gateway(
    server: ServerProcess, alice_gateway: tuple[GatewayProcess, Path], tmp_path: Path
) -> None:
    gw, _bob = alice_gateway
    alice = str(gw.profile)
    register(server, "carol", tmp_path)  # not alice's contact: the server refuses
    await connected(gw)
    result = await run("send", "carol", "hello carol", "--profile", alice, check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: not sent: the server refused it: ")
    assert "not accepted you as a contact" in result.stderr
    as_json = await run("send", "carol", "hello carol", "--json", "--profile", alice, check=False)
    assert as_json.returncode == 1
    [refused] = lines(as_json)
    assert (refused["type"], refused["to"]) == ("refused", "carol")
    assert as_json.stderr == result.stderr
    shown = (await run("history", "carol", "--profile", alice)).stdout
    assert "you -> carol: hello carol  [NOT SENT: " in shown


async def test_send_and_history_print_the_same_shapes_with_and_without_the_gateway(
    alice_gateway: tuple[GatewayProcess, Path],
) -> None:
    gw, _bob = alice_gateway
    alice = str(gw.profile)
    await connected(gw)
    [via_send] = lines(await run("send", "bob", "one", "--json", "--profile", alice))
    via_history = lines(await run("history", "bob", "--json", "--profile", alice))
    via_human = (await run("history", "bob", "--profile", alice)).stdout
    via_mistake = await run("send", "Bob Smith", "hi", "--profile", alice, check=False)
    assert gw.stop() == 0

    [direct_send] = lines(bastion("send", "bob", "two", "--json", "--profile", alice))
    direct_history = lines(bastion("history", "bob", "--json", "--profile", alice))
    direct_human = bastion("history", "bob", "--profile", alice).stdout
    direct_mistake = bastion("send", "Bob Smith", "hi", "--profile", alice, check=False)
    assert (via_mistake.returncode, via_mistake.stderr) == (1, direct_mistake.stderr)
    assert "is not a valid username" in via_mistake.stderr
    assert shape(via_send) == shape(direct_send)
    assert shape(via_history[-1]) == shape(direct_history[-1])
    assert direct_history[: len(via_history)] == via_history
    assert direct_human.startswith(via_human)
    # Without the gateway and without the passphrase, nothing is open to use: it says so.
    alone = bastion("whoami", "--profile", alice, passphrase=None, check=False)
    assert alone.returncode == 1
    assert "no passphrase" in alone.stderr


async def test_history_search_prints_the_same_with_and_without_the_gateway(
    alice_gateway: tuple[GatewayProcess, Path],
) -> None:
    gw, _bob = alice_gateway
    alice = str(gw.profile)
    await connected(gw)
    await run("send", "bob", "Meet at the Harbour", "--profile", alice)
    await run("group", "create", "Harbourmasters", "--members", "bob", "--profile", alice)
    await run("send", "--group", "Harbourmasters", "harbour at noon", "--profile", alice)
    via_json = lines(await run("history", "--search", "HARBOUR", "--json", "--profile", alice))
    via_human = (await run("history", "--search", "harbour", "--profile", alice)).stdout
    via_one = (
        await run("history", "--search", "harbour", "--limit", "1", "--profile", alice)
    ).stdout
    via_mistake = await run("history", "--search", " ", "--profile", alice, check=False)
    assert gw.stop() == 0

    assert [m["text"] for m in via_json] == ["harbour at noon", "Meet at the Harbour"]
    assert via_json[0]["conversation"].startswith("group:")
    shown = via_human.splitlines()
    assert shown[0].startswith("[#Harbourmasters] [")
    assert shown[1].startswith("[with bob] [")
    assert via_one.splitlines() == shown[:1]
    assert (via_mistake.returncode, via_mistake.stdout) == (1, "")
    assert "the text is empty" in via_mistake.stderr

    direct_json = lines(bastion("history", "--search", "HARBOUR", "--json", "--profile", alice))
    direct_human = bastion("history", "--search", "harbour", "--profile", alice).stdout
    direct_mistake = bastion("history", "--search", " ", "--profile", alice, check=False)
    assert direct_json == via_json
    assert direct_human == via_human
    assert (direct_mistake.returncode, direct_mistake.stderr) == (1, via_mistake.stderr)


async def test_listen_prints_through_the_gateway_and_ends_when_it_stops(
    server: ServerProcess, alice_gateway: tuple[GatewayProcess, Path]
) -> None:
    gw, bob = alice_gateway
    await connected(gw)
    before = signins(server, "alice")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    listen = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bastion", "listen", "--json", "--profile", str(gw.profile)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
    )
    assert listen.stdout is not None
    assert listen.stderr is not None
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (await status(gw))["subscribers"] < 1:
            assert listen.returncode is None, "listen ended before it subscribed"
            assert loop.time() < deadline, "listen did not subscribe"
            await asyncio.sleep(0.1)
        await asyncio.to_thread(bastion, "send", "alice", "hi alice", "--profile", str(bob))
        while True:
            line = await asyncio.wait_for(listen.stdout.readline(), 30)
            assert line, "listen ended before the message came"
            event = json.loads(line)
            if event["type"] == "message":
                break
        assert (event["from"], event["text"]) == ("bob", "hi alice")
        assert signins(server, "alice") == before

        assert await asyncio.to_thread(gw.stop) == 0
        assert await asyncio.wait_for(listen.wait(), 20) == 1
        errors = (await listen.stderr.read()).decode()
        assert "the gateway stopped" in errors
    finally:
        if listen.returncode is None:
            listen.kill()
            await listen.wait()


async def test_a_direct_command_leaves_receiving_to_the_gateway(
    alice_gateway: tuple[GatewayProcess, Path],
) -> None:
    gw, bob = alice_gateway
    await connected(gw)
    async with subscribed(gw) as (_link, events):
        # Saving a blocked file waits for a person's "yes", so it never goes through the
        # gateway: the command unlocks and connects itself, without taking this device's
        # deliveries from the gateway.
        direct = await asyncio.to_thread(
            bastion,
            "file",
            "get",
            "0000",
            "--allow-blocked",
            "--profile",
            str(gw.profile),
            check=False,
        )
        assert (direct.returncode, direct.stdout) == (1, "")
        assert direct.stderr.startswith("error: ")
        bastion("send", "alice", "still here", "--profile", str(bob))
        await events.wait_for(lambda e: e.get("text") == "still here", "the message")
        no_reconnect(events)


def test_a_gateway_that_does_not_answer_yet_is_not_taken_over(
    server: ServerProcess, tmp_path: Path
) -> None:
    # The gateway's lock held, no socket yet: how a gateway looks while it starts.
    alice = register(server, "alice", tmp_path)
    lock = hold_lock(alice)
    try:
        inbox = bastion("inbox", "--profile", str(alice), passphrase=None)
        assert inbox.stdout == ""
        assert "the gateway receives for this profile" in inbox.stderr
        listen = bastion("listen", "--profile", str(alice), check=False)
        assert listen.returncode == 1
        assert "does not answer on its socket yet" in listen.stderr
        # Commands that do not receive go direct, with the passphrase.
        assert bastion("whoami", "--profile", str(alice)).stdout.startswith("alice on ")
    finally:
        if lock is not None:
            os.close(lock)


AT = 1_764_936_000_123  # milliseconds, with a fraction of a second that must survive


def every_kind_of_event() -> list[Event]:
    def record(direction: str, state: str, reason: str = "") -> HistoryRecord:
        return HistoryRecord(
            id=bytes(16),
            sender="alice" if direction == "out" else "bob",
            device="dev1",
            peer="bob",
            conversation="dm:alice,bob",
            text="two\nlines \u202e",
            sent_at=AT,
            server_ts=AT,
            direction=direction,
            state=state,
            reason=reason,
        )

    return [
        MessageEvent(record("in", "received"), verified=True),
        MessageEvent(record("out", "sent"), verified=False),
        MessageEvent(record("out", "failed", "no"), verified=False),
        KeyChangedEvent(user="bob", at=AT),
        DevicesChangedEvent("bob", ("d2",), ("d1",), AT, certified_at=(AT,), own_account=False),
        DevicesChangedEvent("alice", ("d9",), (), AT, certified_at=(AT,), own_account=True),
        WarningEvent(reason="a bad signature", sender="bob", device="d1", at=AT),
        presence.PresenceEvent(user="bob", state="away", status="lunch", at=AT),
        receipts.DeliveredEvent(peer="bob", ids=("ab", "cd"), at=AT),
        contacts.ContactRequestEvent(user="bob", note="it's me", at=AT),
        contacts.ContactChangedEvent(user="bob", state="accepted", at=AT),
        verification.VerificationRequestEvent(user="bob", device="d1", txn="t1", at=AT),
        verification.VerificationCancelledEvent(user="bob", txn="t1", reason="timeout"),
        files.FileEvent("f1", "bob", "a.txt", 2048, "text/plain", AT),
        groups.GroupChangeEvent("g1", "ops", 2, "bob", "add_member", "alice", AT),
        groups.GroupWarningEvent(group_id="g1", reason="a fork", at=AT),
        group_invites.GroupInviteEvent("g1", "ops", "bob", 3, AT),
    ]


@pytest.mark.parametrize("event", every_kind_of_event(), ids=lambda e: type(e).__name__)
def test_an_event_from_the_gateway_is_shown_as_the_direct_one(
    event: Event, capsys: pytest.CaptureFixture[str]
) -> None:
    print_event(event, False, server_url="wss://example.org:8443")
    direct = capsys.readouterr()
    print_event_json(event_json(event), False, server_url="wss://example.org:8443")
    via = capsys.readouterr()
    assert (via.out, via.err) == (direct.out, direct.err)
    assert direct.out or direct.err
