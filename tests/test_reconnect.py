"""A kept connection (``Client.stay_connected``) through a real server that is killed and restarted.

Nothing alice was told is stored, or that waits in her outbox, is lost; bob sees
each message once, in order; both loops come back on their own and say so; and
a server that is not the pinned one stops the loop instead of being retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO

import msgspec
import pytest

from bastion.client import (
    UNANSWERED,
    Backoff,
    Client,
    ConnectionStateEvent,
    Event,
    MessageEvent,
    outbox,
)
from bastion.errors import BastionError, ServerRefusedError, UntrustedServerError
from bastion.protocol import frames
from bastion.tui.app import ChatApp
from tests.conftest import PASSPHRASE, Profiles, ServerProcess
from tests.test_cli import bastion, befriend, register
from tests.test_send_outcomes import LONG_TEXT, CuttingForwarder, make_pair
from tests.tui.support import chat_screen, online, plain, shown_texts, wait_until

pytestmark = pytest.mark.network


def quick() -> Backoff:
    """Short pauses, so a restart is noticed within the test's patience."""
    return Backoff(base_s=0.05, cap_s=0.5)


class Kept:
    """Runs ``client.stay_connected`` in a task and records what it yields."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.texts: list[str] = []
        self.states: list[ConnectionStateEvent] = []
        self.up = asyncio.Event()
        self.error: BaseException | None = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for event in self.client.stay_connected(backoff=quick()):
                if isinstance(event, ConnectionStateEvent):
                    self.states.append(event)
                    if event.state == "connected":
                        self.up.set()
                    else:
                        self.up.clear()
                elif isinstance(event, MessageEvent) and event.record.direction == "in":
                    self.texts.append(event.record.text)
        except BaseException as exc:
            self.error = exc
            raise

    def count(self, state: str) -> int:
        return sum(1 for s in self.states if s.state == state)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, BastionError):
            await self.task


@contextlib.asynccontextmanager
async def kept(client: Client) -> AsyncIterator[Kept]:
    loop = Kept(client)
    try:
        yield loop
    finally:
        await loop.stop()


async def until(condition: Callable[[], bool], what: str, *, wait_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def send_until_taken(alice: Kept, text: str) -> str:
    """Send ``text`` until the server stored it or it is kept; returns "sent" or "kept".

    A send that failed before anything was encrypted left nothing behind and is
    tried again once alice is back; one whose answer was lost is kept, and is
    never sent a second time by hand.
    """
    while True:
        await alice.up.wait()
        try:
            record = await alice.client.send_text("bob", text)
        except ServerRefusedError as exc:
            if exc.code in UNANSWERED and any(
                r.text == text for r in outbox.kept_messages(alice.client)
            ):
                return "kept"
            if exc.code not in {*UNANSWERED, "unreachable"}:
                raise
            await asyncio.sleep(0.05)
            continue
        assert record.state == "sent"
        return "sent"


async def test_kill_9_while_alice_sends_loses_nothing_and_shows_nothing_twice(
    server: ServerProcess, profiles: Profiles
) -> None:
    alice = await profiles.register("alice")
    bob = await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    sent = [f"message {i:02d}" for i in range(24)]
    outcomes: list[str] = []
    async with kept(alice) as alice_loop, kept(bob) as bob_loop:
        await until(lambda: alice_loop.up.is_set() and bob_loop.up.is_set(), "both signed in")

        async def sender() -> None:
            for text in sent:
                outcomes.append(await send_until_taken(alice_loop, text))

        sending = asyncio.create_task(sender())
        await until(lambda: len(bob_loop.texts) >= 6, "the first messages")
        server.kill()  # kill -9 in the middle of the stream
        await until(lambda: bob_loop.count("reconnecting") >= 1, "bob to notice")
        await asyncio.sleep(0.5)
        await asyncio.to_thread(server.start)  # same data folder, same port
        await asyncio.wait_for(sending, 60)
        await until(lambda: len(bob_loop.texts) >= len(sent), "every message at bob")
        await asyncio.sleep(1.0)  # anything shown twice would arrive now

        assert bob_loop.texts == sent
        assert outbox.kept_messages(alice) == []
        assert [r.state for r in alice.history("bob")] == ["sent"] * len(sent)
        assert bob_loop.count("connected") >= 2  # came back without help
        assert alice_loop.count("connected") >= 2
        lost = next(s for s in bob_loop.states if s.state == "reconnecting")
        assert 0.0 <= lost.retry_in_s <= 0.5
        assert lost.reason  # says why, for the status line
        kept_ones = [t for t, o in zip(sent, outcomes, strict=True) if o == "kept"]
        flushed = [r.text for s in alice_loop.states for r in s.sent]
        assert flushed == kept_ones  # each kept message went out once, on a reconnect
        assert bob_loop.error is None
        assert alice_loop.error is None
        assert [r.text for r in bob.history("alice")] == sent


@pytest.mark.parametrize("cut", ["before", "after"])
async def test_a_message_kept_while_the_server_is_out_of_reach_goes_out_on_reconnect(
    server: ServerProcess, tmp_path: Path, cut: str
) -> None:
    forwarder = CuttingForwarder(server.port)
    await forwarder.start()
    try:
        alice_path, bob_path = await make_pair(server, tmp_path, forwarder.url)
        alice = Client.open(alice_path, PASSPHRASE)
        bob = Client.open(bob_path, PASSPHRASE)
        try:
            async with kept(alice) as alice_loop, kept(bob) as bob_loop:
                await until(lambda: alice_loop.up.is_set() and bob_loop.up.is_set(), "sign-in")
                forwarder.cut = cut
                forwarder.down_after_cut = True
                with pytest.raises(ServerRefusedError) as lost:
                    await alice.send_text("bob", LONG_TEXT)
                assert lost.value.code in UNANSWERED
                [waiting] = outbox.kept_messages(alice)
                assert (waiting.text, waiting.state) == (LONG_TEXT, "pending")
                await until(lambda: alice_loop.count("reconnecting") >= 3, "failed attempts")
                assert not alice_loop.up.is_set()
                assert outbox.is_kept(alice, waiting.id)  # still waiting while out of reach

                forwarder.down = False
                await until(lambda: alice_loop.up.is_set(), "alice to come back")
                back = alice_loop.states[-1]
                assert [(r.id, r.state) for r in back.sent] == [(waiting.id, "sent")]
                assert outbox.kept_messages(alice) == []
                await until(lambda: bob_loop.texts == [LONG_TEXT], "the kept message at bob")
                await asyncio.sleep(1.0)
                assert bob_loop.texts == [LONG_TEXT]  # stored once, shown once
                assert alice_loop.error is None
        finally:
            await alice.close()
            await bob.close()
    finally:
        await forwarder.close()


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"fingerprint": "SHA256:" + "00" * 32}, UntrustedServerError),
        ({"server_name": "someone-else.example"}, UntrustedServerError),
        ({"device_id": "aaaaaaaaaaaaaaaa"}, ServerRefusedError),
    ],
    ids=["certificate", "server-name", "unknown-device"],
)
async def test_what_retrying_cannot_heal_ends_the_loop_at_once(
    server: ServerProcess, profiles: Profiles, change: dict[str, str], error: type[Exception]
) -> None:
    bob = await profiles.register("bob")
    bob.account = msgspec.structs.replace(bob.account, **change)
    states: list[ConnectionStateEvent] = []

    async def run() -> None:
        async for event in bob.stay_connected(backoff=quick()):
            if isinstance(event, ConnectionStateEvent):
                states.append(event)

    with pytest.raises(error) as raised:
        await asyncio.wait_for(run(), 10)
    assert states == []  # not one retry, not one "connected"
    assert not bob.connected
    if isinstance(raised.value, ServerRefusedError):
        assert raised.value.code not in {"disconnected", "timeout", "unreachable"}


async def test_an_unreachable_server_is_retried_with_growing_pauses(
    server: ServerProcess, profiles: Profiles
) -> None:
    bob = await profiles.register("bob")
    server.kill()
    pauses: list[float] = []

    async def no_wait(seconds: float) -> None:
        pauses.append(seconds)

    states: list[ConnectionStateEvent] = []
    backoff = Backoff(base_s=1.0, cap_s=8.0, fraction=lambda: 1.0)
    async for event in bob.stay_connected(backoff=backoff, sleep=no_wait):
        if isinstance(event, ConnectionStateEvent):
            states.append(event)
        if len(states) == 6:
            break
    assert pauses == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert [(s.state, s.retry_in_s, s.attempt) for s in states] == [
        ("reconnecting", 1.0, 1),
        ("reconnecting", 2.0, 2),
        ("reconnecting", 4.0, 3),
        ("reconnecting", 8.0, 4),
        ("reconnecting", 8.0, 5),
        ("reconnecting", 8.0, 6),
    ]
    assert all("reach" in s.reason for s in states)


# --- bastion listen -------------------------------------------------------------------------------


class Lines:
    """The lines a child process writes to one of its pipes, read by a thread."""

    def __init__(self, pipe: IO[str]) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.pipe = pipe
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.pipe:
            self.queue.put(line)

    def close(self) -> None:
        """Once the process ended: wait for the last lines and close the pipe."""
        self.thread.join(timeout=10)
        self.pipe.close()

    def until(self, condition: Callable[[str], bool], what: str, wait_s: float = 30.0) -> str:
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; saw {self.seen}")
            try:
                line = self.queue.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(line)
            if condition(line):
                return line


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "human"])
def test_listen_survives_a_server_restart_and_says_so(
    server: ServerProcess, tmp_path: Path, as_json: bool
) -> None:
    alice = register(server, "alice", tmp_path)
    bob = register(server, "bob", tmp_path)
    befriend(alice, "alice", bob, "bob")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_PASSPHRASE"] = PASSPHRASE
    command = [sys.executable, "-m", "bastion", "listen", "--profile", str(bob)]
    listener = subprocess.Popen(
        [*command, "--json"] if as_json else command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert listener.stdout is not None
    assert listener.stderr is not None
    out = Lines(listener.stdout)
    err = Lines(listener.stderr)
    try:
        bastion("send", "bob", "before the crash", "--profile", str(alice))
        out.until(lambda line: "before the crash" in line, "the first message")
        server.kill()
        if as_json:
            line = out.until(lambda line: '"connection"' in line, "the reconnecting line")
            lost = json.loads(line)
            assert (lost["type"], lost["state"]) == ("connection", "reconnecting")
            assert lost["retry_in_s"] >= 0
            assert lost["reason"]
        else:
            err.until(lambda line: "reconnecting in" in line, "the reconnecting warning")
        server.start()
        if as_json:
            back = out.until(lambda line: '"connected"' in line, "the connected line")
            assert json.loads(back) == {"type": "connection", "state": "connected"}
        else:
            err.until(lambda line: line == "connected again\n", "the connected notice")
        bastion("send", "bob", "after the restart", "--profile", str(alice))
        out.until(lambda line: "after the restart" in line, "the message after the restart")
        listener.send_signal(signal.SIGINT)
        assert listener.wait(timeout=15) == 0
        messages = [line for line in out.seen if "the crash" in line or "the restart" in line]
        assert len(messages) == 2  # nothing shown twice
        if not as_json:
            assert all(line.startswith("warning: ") for line in err.seen[:-1])
    finally:
        listener.kill()
        listener.wait()
        out.close()
        err.close()


# --- bastion chat ---------------------------------------------------------------------------------


async def test_chat_says_it_is_reconnecting_and_comes_back_after_a_restart(
    server: ServerProcess, profiles: Profiles
) -> None:
    alice = await profiles.register("alice")
    bob = await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    await bob.close()
    app = ChatApp(profiles.path("bob"), passphrase=PASSPHRASE, reconnect_delay_s=0.1)

    def status() -> str:
        return plain(chat_screen(app).query_one("#status"))

    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        server.kill()
        await wait_until(pilot, lambda: "reconnecting in" in status(), what="the offline status")
        assert status().startswith("Bastion · bob · offline (")
        await asyncio.to_thread(server.start)
        await wait_until(pilot, lambda: online(app), what="sign-in after the restart")
        await alice.connect(receive=False)
        await alice.send_text("bob", "welcome back")
        chat_screen(app).open_conversation("alice")
        await wait_until(
            pilot, lambda: shown_texts(app) == ["welcome back"], what="the message", wait_s=20
        )


async def test_a_takeover_by_another_connection_of_the_device_ends_the_loop(
    server: ServerProcess, profiles: Profiles
) -> None:
    bob = await profiles.register("bob")
    async with kept(bob) as bob_loop:
        await until(lambda: bob_loop.up.is_set(), "sign-in")
        await profiles.online("bob")  # `bastion inbox` on the same profile, say
        await until(lambda: bob_loop.task.done(), "the loop to end")
        assert isinstance(bob_loop.error, ServerRefusedError)
        assert bob_loop.error.code == "sent_away"
        assert "another connection" in bob_loop.error.message
        assert [s.state for s in bob_loop.states] == ["connected"]  # not fought back
        assert not bob.connected


async def test_messages_whose_acknowledgement_was_lost_come_again_and_are_not_shown_twice(
    server: ServerProcess, profiles: Profiles
) -> None:
    alice = await profiles.online("alice", receive=False)
    bob = await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    handled: list[str] = []  # per delivery: "new" or "again" (dropped as already stored)
    process = bob.process

    async def counting(deliver: frames.Deliver) -> Event | None:
        event = await process(deliver)
        handled.append("again" if event is None else "new")
        return event

    bob.process = counting  # type: ignore[method-assign]
    async with kept(bob) as bob_loop:
        await until(lambda: bob_loop.up.is_set(), "sign-in")
        first = bob.conn
        assert first is not None
        send = first.send

        def no_acks(frame: frames.Frame) -> None:
            if not isinstance(frame, frames.Ack):
                send(frame)

        first.send = no_acks  # type: ignore[method-assign]
        sent = ["one", "two", "three"]
        for text in sent:
            await alice.send_text("bob", text)
        await until(lambda: bob_loop.texts == sent, "the messages")
        await first.aclose()  # the acknowledgements never left: the server still holds them
        await until(lambda: bob_loop.count("connected") == 2, "the reconnect")
        await until(lambda: handled.count("again") == len(sent), "the redelivery")
        await asyncio.sleep(0.5)
        assert bob_loop.texts == sent  # delivered twice, shown once
        assert handled == ["new"] * len(sent) + ["again"] * len(sent)
        assert [r.text for r in bob.history("alice")] == sent
        assert bob.stats().rejected == 0


async def test_texts_written_while_the_server_is_down_are_queued_and_sent_in_order_when_back(
    server: ServerProcess, profiles: Profiles
) -> None:
    alice = await profiles.register("alice")
    bob = await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    async with kept(alice) as alice_loop, kept(bob) as bob_loop:
        await until(lambda: alice_loop.up.is_set() and bob_loop.up.is_set(), "sign-in")
        await alice.send_text("bob", "before")
        server.kill()
        await until(lambda: not alice_loop.up.is_set(), "alice to notice")
        with pytest.raises(ServerRefusedError):
            await alice.send_text("bob", "not connected: refused at once, nothing kept")
        written = [outbox.queue_text(alice, "bob", f"offline {i}") for i in range(3)]
        assert [r.state for r in written] == ["queued"] * 3
        assert outbox.queued_messages(alice) == written
        assert [r.text for r in alice.history("bob")] == [
            "before",
            "offline 0",
            "offline 1",
            "offline 2",
        ]
        await asyncio.sleep(0.3)
        assert outbox.queued_messages(alice) == written  # still waiting while down
        listed = bastion("outbox", "--profile", str(profiles.path("alice"))).stdout
        assert listed.count("[queued: goes out when the server can be reached]") == 3

        await asyncio.to_thread(server.start)
        await until(lambda: alice_loop.up.is_set(), "alice to come back")
        back = alice_loop.states[-1]
        assert [(r.id, r.state) for r in back.sent] == [(r.id, "sent") for r in written]
        assert outbox.queued_messages(alice) == []
        assert outbox.kept_messages(alice) == []
        expected = ["before", "offline 0", "offline 1", "offline 2"]
        await until(lambda: bob_loop.texts == expected, "the queued messages at bob")
        await asyncio.sleep(1.0)
        assert bob_loop.texts == expected
        assert [(r.text, r.state) for r in alice.history("bob")] == [(t, "sent") for t in expected]


async def test_a_queued_text_to_a_changed_key_is_marked_failed_not_sent(
    server: ServerProcess, profiles: Profiles
) -> None:
    alice = await profiles.register("alice")
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    await alice.connect(receive=False)
    await alice.devices_of("bob")  # pins bob's key
    record = outbox.queue_text(alice, "bob", "for the old key")
    contact = alice.contact("bob")
    assert contact is not None
    with alice.profile.transaction():  # as if the key changed after the text was written
        alice.profile.put(
            "contact:bob",
            msgspec.structs.replace(contact, trust="changed", pending_key=b"\x01" * 32),
        )
    sent, failed = await outbox.send_queued(alice)
    assert sent == []
    assert [(r.id, r.state) for r in failed] == [(record.id, "failed")]
    assert "account key has changed" in failed[0].reason
    assert outbox.queued_messages(alice) == []
    assert outbox.kept_messages(alice) == []
