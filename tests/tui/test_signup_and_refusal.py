"""``bastion chat``: sign-up shows the pinned certificate; refused and kept messages say so."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import Input

from bastion.client import Client, MessageEvent
from bastion.tui.app import ChatApp
from bastion.tui.screens import FirstRunScreen
from bastion.tui.widgets import MessageLine
from tests.conftest import PASSPHRASE, Profiles, ServerProcess
from tests.helpers import drain
from tests.test_send_outcomes import LONG_TEXT, CuttingForwarder, make_pair
from tests.tui.support import chat_screen, online, plain, wait_until

pytestmark = pytest.mark.network

SIZE = (80, 24)


def app_for(path: Path, *, passphrase: str | None = PASSPHRASE) -> ChatApp:
    return ChatApp(path, passphrase=passphrase, tz=datetime.UTC, reconnect_delay_s=0.1)


async def type_text(pilot: Pilot[None], text: str) -> None:
    await pilot.press(*[c if c != " " else "space" for c in text])


async def test_sign_up_shows_the_fingerprint_it_pins_and_what_pinning_means(
    server: ServerProcess, tmp_path: Path
) -> None:
    app = app_for(tmp_path / "new-profile")
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, FirstRunScreen)
        screen = app.screen
        await type_text(pilot, "dora")
        await pilot.press("enter")
        await type_text(pilot, server.url)  # no fingerprint: trust on first use
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: server.fingerprint in plain(screen.query_one("#error")),
            what="the fingerprint to be shown",
        )
        shown = plain(screen.query_one("#error"))
        assert "Pinning means this device will only ever talk to a server showing" in shown
        assert not (tmp_path / "new-profile" / "profile.json").exists()  # nothing made yet
        screen.query_one("#server", Input).focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: online(app), what="the new account to sign in")
    reopened = Client.open(tmp_path / "new-profile", PASSPHRASE)
    try:
        assert reopened.account.fingerprint == server.fingerprint
    finally:
        await reopened.close()


async def test_sign_up_refuses_a_short_passphrase(server: ServerProcess, tmp_path: Path) -> None:
    app = app_for(tmp_path / "p", passphrase=None)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause()
        app.screen.query_one("#who", Input).value = "dora"
        app.screen.query_one("#server", Input).value = f"{server.url} {server.fingerprint}"
        app.screen.query_one("#pass", Input).value = "short"
        app.screen.query_one("#pass", Input).focus()
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: "at least 10 characters" in plain(app.screen.query_one("#error")),
            what="the refusal",
        )
    assert not (tmp_path / "p" / "profile.json").exists()


async def test_a_refused_message_shows_not_sent_in_the_conversation(profiles: Profiles) -> None:
    await profiles.register("alice")
    bob = await profiles.register("bob")  # not alice's contact: the server refuses
    await bob.close()
    app = app_for(profiles.path("bob"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="the app to sign in")
        await pilot.press("ctrl+n")
        await type_text(pilot, "alice")
        await pilot.press("enter")
        screen = chat_screen(app)
        await wait_until(pilot, lambda: screen.current == "alice", what="the chat to open")
        await type_text(pilot, "hello?")
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: any(
                "(NOT SENT)" in line.render_text().plain for line in screen.query(MessageLine)
            ),
            what="the refused message",
        )
        [line] = screen.query(MessageLine)
        assert line.record.state == "failed"
        assert "not accepted you as a contact" in line.record.reason


async def test_a_message_whose_answer_was_lost_is_kept_and_goes_out_once(
    server: ServerProcess, tmp_path: Path
) -> None:
    forwarder = CuttingForwarder(server.port)
    await forwarder.start()
    try:
        alice_path, bob_path = await make_pair(server, tmp_path, server.url, bob_url=forwarder.url)
        app = app_for(bob_path)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: online(app), what="the app to sign in")
            await pilot.press("ctrl+n")
            await type_text(pilot, "alice")
            await pilot.press("enter")
            screen = chat_screen(app)
            await wait_until(pilot, lambda: screen.current == "alice", what="the chat to open")
            forwarder.cut = "before"
            forwarder.down_after_cut = True
            draft = screen.query_one("#message", Input)
            draft.value = LONG_TEXT
            draft.focus()
            await pilot.press("enter")
            await wait_until(
                pilot,
                lambda: [x.record.state for x in screen.query(MessageLine)] == ["pending"],
                what="the kept message",
            )
            assert draft.value == ""  # nothing to retype: it goes out on its own
            forwarder.down = False
            await wait_until(
                pilot,
                lambda: [x.record.state for x in screen.query(MessageLine)] == ["sent"],
                what="the kept message to be confirmed",
                wait_s=20,
            )
        alice = Client.open(alice_path, PASSPHRASE)
        try:
            await alice.connect(receive=True)
            events = await drain(alice)
            assert [e.record.text for e in events if isinstance(e, MessageEvent)] == [
                LONG_TEXT.strip()  # the app trims the draft
            ]
        finally:
            await alice.close()
    finally:
        await forwarder.close()
