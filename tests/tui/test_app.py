"""The chat app driven like a person would, against a real server on 127.0.0.1.

One profile is driven through the app, the other through the client library.
"""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import Input, ListView

from bastion.client import (
    Client,
    MessageEvent,
    contacts,
    devices,
    files,
    groups,
    link_history,
    presence,
    receipts,
    trust,
    verification,
)
from bastion.crypto.safety import safety_number
from bastion.tui.app import ChatApp
from bastion.tui.screens import (
    FileScreen,
    FirstRunScreen,
    HelpScreen,
    KeyChangeScreen,
    PresenceScreen,
    RequestScreen,
    SasScreen,
    UnlockScreen,
)
from bastion.tui.verify_screens import VerifyScreen
from bastion.tui.widgets import (
    ContactBar,
    ConversationItem,
    MessageLine,
    NoticeLine,
    RequestItem,
)
from tests.conftest import PASSPHRASE, Profiles, ServerProcess
from tests.helpers import next_events, texts
from tests.tui.support import (
    chat_screen,
    has_chat_screen,
    online,
    plain,
    replace_account_on_server,
    seed_history,
    shown_texts,
    wait_until,
)

pytestmark = pytest.mark.network

SIZE = (80, 24)


async def befriended(profiles: Profiles, user: str, *others: str) -> None:
    """Register ``user`` (closed again, for the app to open) as a contact of ``others``."""
    client = await profiles.register(user)
    for other in others:
        await profiles.befriend(other, user)
    await client.close()


def notices(app: ChatApp) -> str:
    """Everything the app said inside the open conversation."""
    return " ".join(plain(n) for n in chat_screen(app).query(NoticeLine))


def app_for(path: Path, *, passphrase: str | None = PASSPHRASE) -> ChatApp:
    return ChatApp(path, passphrase=passphrase, tz=datetime.UTC, reconnect_delay_s=0.1)


async def type_text(pilot: Pilot[None], text: str) -> None:
    await pilot.press(*[c if c != " " else "space" for c in text])


async def test_send_and_receive_between_the_app_and_the_library(profiles: Profiles) -> None:
    alice = await profiles.online("alice")
    await befriended(profiles, "bob", "alice")
    app = app_for(profiles.path("bob"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="the app to sign in")
        await pilot.press("ctrl+n")
        await type_text(pilot, "alice")
        await pilot.press("enter")
        screen = chat_screen(app)
        await wait_until(pilot, lambda: screen.current == "alice", what="the chat to open")
        bar = screen.query_one("#contact", ContactBar)
        assert "[unverified]" in plain(bar)

        await alice.send_text("bob", "hi from the library")
        await wait_until(
            pilot, lambda: shown_texts(app) == ["hi from the library"], what="the message"
        )
        line = screen.query_one(MessageLine)
        assert "alice: hi from the library" in line.render_text().plain

        # The app told alice her message arrived; alice's client now does the same.
        [receipt] = await next_events(alice, 1)
        assert isinstance(receipt, receipts.DeliveredEvent)
        assert [r.state for r in alice.history("bob")] == ["delivered"]
        receipts.enable(alice)
        await type_text(pilot, "hello alice?")
        await pilot.press("enter")
        [event] = await next_events(alice, 1)
        assert texts([event]) == ["hello alice?"]
        await wait_until(
            pilot,
            lambda: (
                [x.record.state for x in screen.query(MessageLine)] == ["received", "delivered"]
            ),
            what="the delivered state",
        )
        assert (
            "you: hello alice?  (delivered)"
            in list(screen.query(MessageLine))[-1].render_text().plain
        )
        assert screen.query_one("#message", Input).value == ""

    # The history is in the encrypted store: the library reads the same conversation.
    bob = Client.open(profiles.path("bob"), PASSPHRASE)
    try:
        assert [r.text for r in bob.history("alice")] == ["hi from the library", "hello alice?"]
    finally:
        await bob.close()


async def test_a_message_for_another_conversation_counts_as_unread(profiles: Profiles) -> None:
    alice = await profiles.online("alice", receive=False)
    carol = await profiles.online("carol", receive=False)
    await befriended(profiles, "bob", "alice", "carol")
    app = app_for(profiles.path("bob"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        await alice.send_text("bob", "one")
        screen = chat_screen(app)
        await wait_until(pilot, lambda: screen.index.find("alice") is not None, what="alice")
        screen.open_conversation("alice")
        await carol.send_text("bob", "from carol")
        await wait_until(
            pilot,
            lambda: (e := screen.index.find("carol")) is not None and e.unread == 1,
            what="carol's unread count",
        )
        assert shown_texts(app) == ["one"]  # the open conversation did not change
        await pilot.press("ctrl+down")
        assert screen.current == "carol"
        assert shown_texts(app) == ["from carol"]
        entry = screen.index.find("carol")
        assert entry is not None
        assert entry.unread == 0


async def test_a_changed_key_blocks_the_contact_until_accepted(
    profiles: Profiles, server: ServerProcess, tmp_path: Path
) -> None:
    old_alice = await profiles.online("alice", receive=False)
    bob = await profiles.online("bob", receive=False)
    await profiles.befriend("alice", "bob")
    await trust.pinned_contact(bob, "alice")
    await bob.close()
    await old_alice.close()

    server.stop()
    replace_account_on_server(server.data_dir, "alice")
    server.start()
    new_alice = await Client.register(
        tmp_path / "alice-reinstalled",
        PASSPHRASE,
        username="alice",
        server_url=server.url,
        fingerprint=server.fingerprint,
    )
    profiles.clients.append(new_alice)
    await new_alice.connect()
    await profiles.befriend("alice", "bob")  # the server forgot the old account's contacts
    await new_alice.send_text("bob", "it is me, reinstalled")

    app = app_for(profiles.path("bob"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(
            pilot,
            lambda: isinstance(app.screen, KeyChangeScreen) and bool(app.screen.query(".title")),
            what="the key-change screen",
        )
        assert "alice's key has changed" in plain(app.screen.query_one(".title"))
        await pilot.press("escape")  # not now
        screen = chat_screen(app)
        screen.open_conversation("alice")
        await pilot.pause()
        bar = plain(screen.query_one("#contact", ContactBar))
        assert "[KEY CHANGED]" in bar
        assert "Ctrl+T" in bar
        assert screen.query_one("#message", Input).disabled
        assert shown_texts(app) == []  # the held message is not shown

        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: isinstance(app.screen, KeyChangeScreen), what="review")
        # The safety number with the new key is on the screen that accepts it.
        expected = safety_number(
            "bob", screen.client.identity().public_bytes, "alice", new_alice.identity().public_bytes
        )
        assert str(expected) in plain(app.screen.query_one("#new-safety-number"))
        await pilot.click("#accept")
        await wait_until(
            pilot,
            lambda: shown_texts(app) == ["it is me, reinstalled"],
            what="the held message after accepting",
        )
        assert "[unverified]" in plain(screen.query_one("#contact", ContactBar))
        assert not screen.query_one("#message", Input).disabled
        contact = screen.client.contact("alice")
        assert contact is not None
        assert contact.trust == "unverified"

        await pilot.press("w", "b")
        await pilot.press("enter")
        # The receipt for the held message may come first: it is sent as soon as it is shown.
        got: list[str] = []
        for _ in range(3):
            got += texts(await next_events(new_alice, 1))
            if got:
                break
        assert got == ["wb"]


async def test_verification_shows_the_safety_number_and_marks_verified(
    profiles: Profiles,
) -> None:
    alice = await profiles.online("alice", receive=False)
    await befriended(profiles, "bob", "alice")
    app = app_for(profiles.path("bob"))
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        screen = chat_screen(app)
        screen.start_chat("alice")
        await wait_until(pilot, lambda: screen.current == "alice", what="the chat")
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: isinstance(app.screen, VerifyScreen), what="verify")
        theirs = await trust.safety_number_with(alice, "bob")
        shown = " ".join(plain(w) for w in app.screen.query("Static"))
        assert theirs.groups[0] in shown
        assert theirs.groups[-1] in shown
        await pilot.click("#qr")
        qr = " ".join(plain(w) for w in app.screen.query("Static"))
        assert "▀" in qr or "▄" in qr  # the QR code, on a screen of its own
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, VerifyScreen), what="back")
        await pilot.click("#match")  # nothing typed: nothing marked
        await pilot.pause(0.1)
        assert "last five digits" in plain(app.screen.query_one("#verify-error"))
        wrong = f"{(int(theirs.groups[-1]) + 1) % 100000:05d}"
        await type_text(pilot, wrong)
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert "not the last five digits" in plain(app.screen.query_one("#verify-error"))
        contact = screen.client.contact("alice")
        assert contact is not None
        assert contact.trust == "unverified"
        await type_text(pilot, theirs.groups[-1])
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: "[verified]" in plain(screen.query_one("#contact", ContactBar)),
            what="the verified badge",
        )
        contact = screen.client.contact("alice")
        assert contact is not None
        assert contact.trust == "verified"


async def test_first_run_registers_in_two_fields(server: ServerProcess, tmp_path: Path) -> None:
    app = app_for(tmp_path / "new-profile")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, FirstRunScreen)
        assert len(app.screen.query(Input)) == 2  # the passphrase came from the environment
        await type_text(pilot, "dora")
        await pilot.press("enter")
        await type_text(pilot, f"{server.url} {server.fingerprint}")
        await pilot.press("enter")
        await wait_until(pilot, lambda: online(app), what="the new account to sign in")
        assert plain(chat_screen(app).query_one("#status")).startswith("Bastion · dora")
    reopened = Client.open(tmp_path / "new-profile", PASSPHRASE)
    try:
        assert reopened.account.username == "dora"
        assert reopened.account.fingerprint == server.fingerprint
    finally:
        await reopened.close()


async def test_first_run_says_what_is_wrong_with_a_bad_name(
    server: ServerProcess, tmp_path: Path
) -> None:
    app = app_for(tmp_path / "p", passphrase=None)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert len(app.screen.query(Input)) == 3  # no passphrase given: it is asked here
        app.screen.query_one("#who", Input).value = "Not A Name"
        app.screen.query_one("#server", Input).value = server.url
        app.screen.query_one("#pass", Input).value = "a passphrase"
        app.screen.query_one("#pass", Input).focus()
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: "neither a username" in plain(app.screen.query_one("#error")),
            what="the error",
        )
        assert not (tmp_path / "p" / "profile.json").exists()


async def test_unlock_refuses_a_wrong_passphrase_then_opens(profiles: Profiles) -> None:
    await (await profiles.register("bob")).close()
    app = app_for(profiles.path("bob"), passphrase="wrong guess")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, UnlockScreen)
        assert "wrong passphrase" in plain(app.screen.query_one("#error"))
        await type_text(pilot, PASSPHRASE)
        await pilot.press("enter")
        await wait_until(pilot, lambda: online(app), what="unlock and sign-in")


async def test_history_scrolls_back_and_search_finds_old_messages(profiles: Profiles) -> None:
    bob = await profiles.register("bob")
    lines = [("in" if n % 2 else "out", f"message number {n}") for n in range(250)]
    seed_history(bob, "alice", lines, start_ms=1_700_000_000_000)
    await bob.close()
    app = app_for(profiles.path("bob"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: has_chat_screen(app), what="the chat")
        screen = chat_screen(app)
        assert screen.current == "alice"
        assert len(shown_texts(app)) == 100
        assert shown_texts(app)[-1] == "message number 249"
        for _ in range(12):
            await pilot.press("pageup")
        assert shown_texts(app)[0] == "message number 0"
        assert len(shown_texts(app)) == 250

        await pilot.press("ctrl+r")
        await type_text(pilot, "number 7")
        assert shown_texts(app) == [
            "message number 7",
            *[f"message number {n}" for n in range(70, 80)],
        ]
        assert "search: 11 found" in plain(screen.query_one("#contact", ContactBar))
        await pilot.press("escape")
        assert len(shown_texts(app)) == 250


async def test_question_mark_shows_keys_but_can_still_be_typed(profiles: Profiles) -> None:
    await (await profiles.register("bob")).close()
    app = app_for(profiles.path("bob"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        screen = chat_screen(app)
        screen.open_conversation("alice")
        await pilot.pause()
        assert app.focused is screen.query_one("#message")
        await pilot.press("question_mark")  # on the empty message line: the keys
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.press("o", "k", "question_mark")
        assert screen.query_one("#message", Input).value == "ok?"
        assert not isinstance(app.screen, HelpScreen)


async def test_a_message_cannot_restyle_the_screen(profiles: Profiles) -> None:
    alice = await profiles.online("alice", receive=False)
    await befriended(profiles, "bob", "alice")
    app = app_for(profiles.path("bob"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        screen = chat_screen(app)
        screen.open_conversation("alice")
        await alice.send_text("bob", "[b red]\x1b[2J[verified]\u202eexe.txt")
        await wait_until(pilot, lambda: len(shown_texts(app)) == 1, what="the message")
        shown = screen.query_one(MessageLine).render_text()
        assert "\x1b" not in shown.plain
        assert "\u202e" not in shown.plain
        assert "[b red]" in shown.plain  # shown literally, not applied as markup
        assert all(span.style != "b red" for span in shown.spans)


async def test_a_contact_request_is_answered_and_presence_shows(profiles: Profiles) -> None:
    carol = await profiles.online("carol")
    await (await profiles.register("bob")).close()
    app = app_for(profiles.path("bob"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        screen = chat_screen(app)
        assert not screen.query_one("#requests").display  # no requests: no section
        await contacts.request(carol, "bob", "we met at the conference")
        await wait_until(
            pilot, lambda: len(screen.query(RequestItem)) == 1, what="the request to show"
        )
        assert screen.query_one("#requests").display
        screen.query_one("#requests", ListView).focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, RequestScreen), what="request")
        assert "we met at the conference" in " ".join(plain(w) for w in app.screen.query("Static"))
        await pilot.click("#accept")
        await wait_until(pilot, lambda: screen.current == "carol", what="carol's chat")
        assert not screen.query_one("#requests").display
        assert [c.state for c in await contacts.sync(carol)] == ["accepted"]

        await presence.watch(carol)
        await presence.set_presence(carol, "away", "lunch")
        await wait_until(
            pilot,
            lambda: (
                "◐ carol" in " ".join(i.describe().plain for i in screen.query(ConversationItem))
            ),
            what="carol's presence dot",
        )
        assert "away: lunch" in plain(screen.query_one("#contact", ContactBar))

        await pilot.press("ctrl+p")
        await wait_until(pilot, lambda: isinstance(app.screen, PresenceScreen), what="presence")
        await pilot.click("#busy")
        events = await next_events(carol, 1)
        assert [(e.user, e.state) for e in events if isinstance(e, presence.PresenceEvent)] == [
            ("bob", "busy")
        ]


async def test_files_go_out_with_progress_and_a_blocked_one_says_why(
    profiles: Profiles, tmp_path: Path
) -> None:
    alice = await profiles.online("alice")
    await befriended(profiles, "bob", "alice")
    outgoing = tmp_path / "notes.txt"
    outgoing.write_bytes(b"minutes of the meeting\n" * 2000)
    downloads = tmp_path / "downloads"
    app = ChatApp(
        profiles.path("bob"),
        passphrase=PASSPHRASE,
        tz=datetime.UTC,
        reconnect_delay_s=0.1,
        downloads=downloads,
    )
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        screen = chat_screen(app)
        screen.open_conversation("alice")
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen, FileScreen), what="file dialog")
        await type_text(pilot, str(outgoing))
        await pilot.press("enter")
        events = await next_events(alice, 1)
        offers = [e for e in events if isinstance(e, files.FileEvent)]
        assert [(o.sender, o.name, o.size) for o in offers] == [("bob", "notes.txt", 46000)]
        await wait_until(
            pilot, lambda: "You sent notes.txt" in notices(app), what="the sent notice"
        )

        trojan = tmp_path / "invoice.pdf.exe"
        trojan.write_bytes(b"MZ pretend this is a program")
        await files.send_file(alice, "bob", trojan)
        await wait_until(
            pilot, lambda: "Ctrl+G downloads and scans it" in notices(app), what="the offer"
        )
        await pilot.press("ctrl+g")
        await wait_until(pilot, lambda: "BLOCKED" in notices(app), what="the verdict")
        assert "double extension" in notices(app)
        assert not downloads.exists() or list(downloads.iterdir()) == []


async def test_a_group_is_listed_read_and_written_to(profiles: Profiles) -> None:
    alice = await profiles.online("alice")
    await profiles.online("carol", receive=False)
    await befriended(profiles, "bob", "alice", "carol")
    ops = await groups.create(alice, "ops", ["bob", "carol"])
    await groups.send_text(alice, ops, "hello ops")
    key = groups.conversation(ops.group_id)
    app = app_for(profiles.path("bob"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        screen = chat_screen(app)
        await wait_until(
            pilot,
            lambda: (e := screen.index.find(key)) is not None and e.unread == 1,
            what="the group message",
        )
        assert any(i.describe().plain == "# ops (1)" for i in screen.query(ConversationItem))
        screen.open_conversation(key)
        await pilot.pause()
        assert shown_texts(app) == ["hello ops"]
        bar = plain(screen.query_one("#contact", ContactBar))
        assert bar.startswith("#ops 3 members: alice, bob, carol")
        await type_text(pilot, "hi all")
        await pilot.press("enter")
        events = await next_events(alice, 1, wait_s=15)
        assert [(e.record.text, e.record.peer) for e in events if isinstance(e, MessageEvent)] == [
            ("hi all", key)
        ]


async def test_live_verification_compares_the_same_codes_on_both_sides(
    profiles: Profiles,
) -> None:
    alice = await profiles.online("alice")
    await befriended(profiles, "bob", "alice")
    seen: list[verification.SasCodes] = []

    async def alice_says_match(codes: verification.SasCodes) -> bool:
        seen.append(codes)
        return True

    asked = asyncio.Event()

    async def alice_receives() -> None:  # the receive loop runs throughout, as in any client
        async for event in alice.receive():
            if isinstance(event, verification.VerificationRequestEvent):
                asked.set()

    async def alice_answers() -> None:
        await asked.wait()
        await verification.verify_interactively(alice, "bob", alice_says_match)

    app = app_for(profiles.path("bob"))
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        screen = chat_screen(app)
        screen.start_chat("alice")
        await wait_until(pilot, lambda: screen.current == "alice", what="the chat")
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: isinstance(app.screen, VerifyScreen), what="verify")
        pump = asyncio.create_task(alice_receives())
        answering = asyncio.create_task(alice_answers())
        await pilot.click("#sas")
        await wait_until(pilot, lambda: isinstance(app.screen, SasScreen), what="the codes")
        await wait_until(pilot, lambda: bool(seen), what="alice's codes")
        assert plain(app.screen.query_one("#codes")) == str(seen[0])
        await pilot.click("#same")
        await asyncio.wait_for(answering, 15)
        await wait_until(
            pilot,
            lambda: "[verified]" in plain(screen.query_one("#contact", ContactBar)),
            what="the verified badge",
        )
        assert alice.contact("bob").trust == "verified"  # type: ignore[union-attr]
        pump.cancel()


async def test_first_run_links_this_machine_with_a_code(
    profiles: Profiles, server: ServerProcess, tmp_path: Path
) -> None:
    alice = await profiles.online("alice", receive=False)
    await profiles.befriend("alice", "bob")
    await alice.send_text("bob", "said before the laptop")
    codes: asyncio.Queue[str] = asyncio.Queue()
    offering = asyncio.create_task(
        devices.offer_link(
            alice, codes.put_nowait, wait_s=30, history=link_history.parse_choice("all")
        )
    )
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
        assert plain(chat_screen(app).query_one("#status")).startswith("Bastion · alice")
        # The history alice's first device sent is listed and shown.
        assert [e.peer for e in chat_screen(app).index.ordered()] == ["bob"]
        laptop = chat_screen(app).client
        assert [r.text for r in laptop.history("bob")] == ["said before the laptop"]
    linked = await asyncio.wait_for(offering, 10)
    assert linked.device_id != alice.account.device_id
    assert linked.device_id in {d.device_id for d in await devices.list_devices(alice)}
