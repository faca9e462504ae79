"""The chat app without click-through verification, lost drafts or focus hunting.

Driven like a person would, against a real server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path
from typing import Any

import pytest
from textual.screen import Screen
from textual.widgets import Button, Input

import bastion.tui.app
from bastion.client import Client, contacts, devices, files, trust, verification
from bastion.crypto.safety import safety_number
from bastion.tui.app import ChatApp
from bastion.tui.screens import FirstRunScreen, NewChatScreen, RequestScreen
from bastion.tui.transfers import OfferScreen
from bastion.tui.verify_screens import QrScreen, VerifyScreen
from bastion.tui.widgets import NoticeLine
from tests.conftest import PASSPHRASE, Profiles, ServerProcess
from tests.helpers import next_events
from tests.tui.support import (
    FIXED_NOW,
    chat_screen,
    online,
    plain,
    seed_history,
    shown_texts,
    wait_until,
)
from tests.tui.test_app import app_for, befriended, type_text

pytestmark = pytest.mark.network

SIZE = (80, 24)


class BellCountingApp(ChatApp):
    """The app, counting the terminal bells it rings."""

    CSS_PATH = str(Path(bastion.tui.app.__file__).with_name("chat.tcss"))
    rung = 0

    def bell(self) -> None:
        self.rung += 1
        super().bell()


def toasts(app: ChatApp) -> str:
    """The text of the notifications the app shows now (toasts are not drawn in tests)."""
    return " ".join(n.message for n in app._notifications)


def drawn(app: ChatApp, kind: type[Screen[Any]]) -> bool:
    """Whether the top screen is a ``kind`` whose widgets are mounted and focused."""
    return (
        isinstance(app.screen, kind)
        and app.focused is not None
        and app.focused.screen is app.screen
    )


def notices(app: ChatApp) -> str:
    return " ".join(plain(n) for n in chat_screen(app).query(NoticeLine))


async def test_tab_and_enter_on_a_fresh_verify_dialog_mark_nothing(profiles: Profiles) -> None:
    await profiles.online("alice", receive=False)
    await befriended(profiles, "bob", "alice")
    app = app_for(profiles.path("bob"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        screen = chat_screen(app)
        screen.start_chat("alice")
        await wait_until(pilot, lambda: screen.current == "alice", what="the chat")
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: drawn(app, VerifyScreen), what="verify")
        assert app.focused is not None
        assert app.focused.id == "digits"  # not a button that marks verified
        for keys in (["enter"], ["tab", "enter"], ["enter"]):
            await pilot.press(*keys)
            await pilot.pause(0.1)
            contact = screen.client.contact("alice")
            assert contact is not None
            assert contact.trust == "unverified", keys
        assert isinstance(app.screen, VerifyScreen)
        assert "last five digits" in plain(app.screen.query_one("#verify-error"))


async def test_a_live_request_from_a_verified_contact_leads_to_a_button_that_exists(
    profiles: Profiles,
) -> None:
    alice = await profiles.online("alice", receive=False)
    await befriended(profiles, "bob", "alice")
    app = app_for(profiles.path("bob"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        screen = chat_screen(app)
        screen.start_chat("alice")
        await wait_until(pilot, lambda: screen.client.contact("alice") is not None, what="key")
        contact = screen.client.contact("alice")
        assert contact is not None
        number = safety_number("bob", screen.client.identity().public_bytes, "alice",
                               contact.identity_key)  # fmt: skip
        trust.mark_verified(screen.client, "alice", number)
        await verification.start(alice, "bob")
        await wait_until(pilot, lambda: "asks to verify live" in notices(app), what="request")
        assert "Ctrl+T" in notices(app)
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: drawn(app, VerifyScreen), what="verify")
        assert app.focused is not None
        assert app.focused.id == "sas"  # the button the prompt names is there, and focused
        assert "Compare emoji live" in str(app.screen.query_one("#sas", Button).label)


async def test_a_draft_refused_for_alice_is_not_sent_to_ezra_after_switching(
    profiles: Profiles,
) -> None:
    await profiles.online("alice", receive=False)  # a stranger to bob: the server refuses
    ezra = await profiles.online("ezra", receive=False)
    await befriended(profiles, "bob", "ezra")
    app = app_for(profiles.path("bob"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        screen = chat_screen(app)
        screen.open_conversation("ezra")
        screen.open_conversation("alice")
        message = screen.query_one("#message", Input)
        await type_text(pilot, "for alice only")
        await pilot.press("enter")
        await wait_until(pilot, lambda: message.value == "for alice only", what="the draft back")
        assert "Not sent to alice" in toasts(app)
        await pilot.press("ctrl+up")
        await wait_until(pilot, lambda: screen.current == "ezra", what="ezra's chat")
        assert message.value == ""  # the draft did not come along
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert screen.client.history("ezra") == []
        assert shown_texts(app) == []
        await pilot.press("ctrl+down")
        await wait_until(pilot, lambda: screen.current == "alice", what="alice's chat")
        assert message.value == "for alice only"  # it stayed with alice
    del ezra


async def test_a_live_contact_request_is_answered_with_the_key_in_the_toast(
    profiles: Profiles,
) -> None:
    carol = await profiles.online("carol")
    await (await profiles.register("bob")).close()
    app = app_for(profiles.path("bob"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        await contacts.request(carol, "bob", "hi, it's carol")
        await wait_until(pilot, lambda: "Ctrl+Y" in toasts(app), what="the toast")
        assert "carol asks to be your contact" in toasts(app)
        await pilot.press("ctrl+y")
        await wait_until(pilot, lambda: drawn(app, RequestScreen), what="request")
        assert "hi, it's carol" in " ".join(plain(w) for w in app.screen.query("Static"))
        await pilot.press("enter")  # the first button: Accept
        screen = chat_screen(app)
        await wait_until(pilot, lambda: screen.current == "carol", what="carol's chat")
        assert [c.state for c in await contacts.sync(carol)] == ["accepted"]


async def test_the_app_opens_the_latest_conversation_at_start(profiles: Profiles) -> None:
    await befriended(profiles, "bob")

    bob = Client.open(profiles.path("bob"), PASSPHRASE)
    try:
        seed_history(bob, "alice", [("in", "older")], start_ms=FIXED_NOW - 7_200_000)
        seed_history(bob, "ezra", [("in", "newest")], start_ms=FIXED_NOW - 60_000)
        seed_history(bob, "dave", [("in", "middle")], start_ms=FIXED_NOW - 3_600_000)
    finally:
        await bob.close()
    app = app_for(profiles.path("bob"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        screen = chat_screen(app)
        assert screen.current == "ezra"
        assert shown_texts(app) == ["newest"]
        message = screen.query_one("#message")
        await wait_until(pilot, lambda: app.focused is message, what="focus, ready to type")


async def test_a_message_in_a_background_conversation_rings_the_bell_unless_off(
    profiles: Profiles,
) -> None:
    alice = await profiles.online("alice", receive=False)
    ezra = await profiles.online("ezra", receive=False)
    await befriended(profiles, "bob", "alice", "ezra")
    for bell in (True, False):
        app = BellCountingApp(
            profiles.path("bob"), passphrase=PASSPHRASE, tz=datetime.UTC,
            reconnect_delay_s=0.1, bell=bell,
        )  # fmt: skip
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: online(app), what="sign-in")  # noqa: B023
            screen = chat_screen(app)
            screen.open_conversation("alice")
            await alice.send_text("bob", "on screen")
            await wait_until(pilot, lambda: "on screen" in shown_texts(app), what="alice")  # noqa: B023
            assert app.rung == 0  # the open conversation does not ring
            await ezra.send_text("bob", "in the background")
            await wait_until(
                pilot,
                lambda: (e := screen.index.find("ezra")) is not None and e.unread > 0,  # noqa: B023
                what="ezra's message",
            )
            assert app.rung == (1 if bell else 0)


async def test_notices_and_offers_stay_after_a_search_and_any_offer_can_be_fetched(
    profiles: Profiles, tmp_path: Path
) -> None:
    alice = await profiles.online("alice")
    await befriended(profiles, "bob", "alice")
    for name in ("first.txt", "second.txt"):
        (tmp_path / name).write_text(f"the {name}\n")
    downloads = tmp_path / "downloads"
    app = ChatApp(
        profiles.path("bob"), passphrase=PASSPHRASE, tz=datetime.UTC,
        reconnect_delay_s=0.1, downloads=downloads,
    )  # fmt: skip
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        screen = chat_screen(app)
        screen.open_conversation("alice")
        await files.send_file(alice, "bob", tmp_path / "first.txt")
        await files.send_file(alice, "bob", tmp_path / "second.txt")
        await verification.start(alice, "bob")
        await wait_until(pilot, lambda: "asks to verify live" in notices(app), what="request")
        assert "'first.txt'" in notices(app)
        assert "'second.txt'" in notices(app)
        await pilot.press("ctrl+r")
        await type_text(pilot, "nothing matches this")
        await pilot.press("escape")
        screen.open_conversation("alice")  # reopen: the pane is rebuilt from the store
        screen.load_messages()
        await pilot.pause(0.1)
        for said in ("'first.txt'", "'second.txt'", "asks to verify live"):
            assert said in notices(app), said

        await pilot.press("ctrl+g")
        await wait_until(pilot, lambda: drawn(app, OfferScreen), what="the choice")
        await pilot.press("down", "enter")  # the older offer, not only the newest
        await wait_until(pilot, lambda: "clean, saved" in notices(app), what="the verdict")
        assert [p.name for p in downloads.iterdir()] == ["first.txt"]


async def test_the_new_chat_dialog_lowercases_a_name_and_carries_a_note(
    profiles: Profiles,
) -> None:
    ezra = await profiles.online("ezra")
    await (await profiles.register("bob")).close()
    app = app_for(profiles.path("bob"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: drawn(app, NewChatScreen), what="dialog")
        await type_text(pilot, "Ezra")
        await pilot.press("tab")
        await type_text(pilot, "from the book club")
        await pilot.press("enter")
        screen = chat_screen(app)
        await wait_until(pilot, lambda: screen.current == "ezra", what="ezra's chat")
        await wait_until(pilot, lambda: "request sent" in toasts(app), what="the toast")
        asked = [
            e for e in await next_events(ezra, 1) if isinstance(e, contacts.ContactRequestEvent)
        ]
        assert [(e.user, e.note) for e in asked] == [("bob", "from the book club")]
        # A second Ctrl+N to the same pending contact does not pretend to ask again.
        await pilot.press("ctrl+n")
        await type_text(pilot, "ezra")
        await pilot.press("enter")
        await wait_until(pilot, lambda: "asked ezra already" in toasts(app), what="the toast")
        assert "not sent" not in toasts(app)
        placeholder = str(screen.query_one("#message", Input).placeholder)
        assert "once ezra accepts" in placeholder


async def test_the_verify_dialog_and_the_qr_code_fit_80_by_24(profiles: Profiles) -> None:
    await (await profiles.register("bob")).close()
    app = app_for(profiles.path("bob"))
    number = safety_number("bob", bytes(range(32)), "alice", bytes(range(32, 64)))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        app.push_screen(VerifyScreen("alice", number, verified=False, confirm=lambda _: None))
        await pilot.pause(0.2)
        buttons = list(app.screen.query(Button))
        assert {b.id for b in buttons} == {"match", "sas", "qr", "close"}
        for widget in [*buttons, app.screen.query_one("#digits")]:
            region = widget.region
            assert region.width > 0
            assert region.height > 0
            assert region.right <= SIZE[0]
            assert region.bottom <= SIZE[1], widget.id
        await pilot.click("#qr")
        await pilot.pause(0.2)
        assert isinstance(app.screen, QrScreen)
        qr = app.screen.query_one(".qr")
        assert qr.region.bottom <= SIZE[1]
        assert qr.region.right <= SIZE[0]


async def test_enter_and_down_work_in_the_conversation_list(profiles: Profiles) -> None:
    await befriended(profiles, "bob")
    bob = Client.open(profiles.path("bob"), PASSPHRASE)
    try:
        seed_history(bob, "alice", [("in", "older")], start_ms=FIXED_NOW - 7_200_000)
        seed_history(bob, "ezra", [("in", "newest")], start_ms=FIXED_NOW - 60_000)
    finally:
        await bob.close()
    app = app_for(profiles.path("bob"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        screen = chat_screen(app)
        assert screen.current == "ezra"
        await pilot.press("shift+tab", "shift+tab")  # from the message line back to the list
        assert app.focused is screen.query_one("#conversations")
        assert screen.query_one("#sidebar").has_class("-focused")  # the list says it has the keys
        await pilot.press("down")
        screen.refresh_list()  # what any event does (a presence change, a message)
        await pilot.pause(0.1)
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.current == "alice", what="alice's chat")
        assert shown_texts(app) == ["older"]
        assert app.focused is screen.query_one("#message")
        assert not screen.query_one("#sidebar").has_class("-focused")


async def test_a_freshly_linked_device_opens_a_conversation(
    profiles: Profiles, server: ServerProcess, tmp_path: Path
) -> None:
    alice = await profiles.online("alice", receive=False)
    await profiles.befriend("bob", "alice")
    codes: asyncio.Queue[str] = asyncio.Queue()
    offering = asyncio.create_task(devices.offer_link(alice, codes.put_nowait, wait_s=30))
    code = await asyncio.wait_for(codes.get(), 10)
    app = app_for(tmp_path / "laptop")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, FirstRunScreen)
        app.screen.query_one("#who", Input).value = code
        app.screen.query_one("#server", Input).value = f"{server.url} {server.fingerprint}"
        app.screen.query_one("#server", Input).focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: online(app), what="the linked device to sign in")
        screen = chat_screen(app)
        await wait_until(pilot, lambda: screen.current == "bob", what="bob's chat to open")
        message = screen.query_one("#message")
        await wait_until(pilot, lambda: app.focused is message, what="the message line's focus")
    await asyncio.wait_for(offering, 10)


async def test_a_file_name_with_markup_is_shown_as_text_in_the_notice_and_toast(
    profiles: Profiles, tmp_path: Path
) -> None:
    alice = await profiles.online("alice")
    await befriended(profiles, "bob", "alice")
    tricky = tmp_path / "[b red]urgent[@click=app.quit]open me.txt"
    tricky.write_text("just text\n")
    app = app_for(profiles.path("bob"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        chat_screen(app).open_conversation("alice")
        await files.send_file(alice, "bob", tricky)
        await wait_until(pilot, lambda: "urgent" in notices(app), what="the offer")
        assert "[b red]urgent[@click=app.quit]open me.txt" in notices(app)
        await wait_until(pilot, lambda: "urgent" in toasts(app), what="the toast")
        assert "[b red]urgent[@click=app.quit]open me.txt" in toasts(app)
        assert all(not n.markup for n in app._notifications if "urgent" in n.message)
