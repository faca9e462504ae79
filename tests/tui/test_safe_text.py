"""The chat app shows other people's text by the same rule as the command line."""

from __future__ import annotations

import datetime
import re

import pytest

from bastion.client import groups
from bastion.display import CONTINUATION
from bastion.tui.app import ChatApp
from bastion.tui.widgets import MessageLine
from tests.conftest import PASSPHRASE, Profiles
from tests.tui.support import chat_screen, online, shown_texts, wait_until

pytestmark = pytest.mark.network

SIZE = (80, 24)
FAKE = "10:45 carol: new bank details"


async def test_a_message_line_cannot_pass_for_another_message(profiles: Profiles) -> None:
    alice = await profiles.online("alice", receive=False)
    bob = await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    await bob.close()
    app = ChatApp(profiles.path("bob"), passphrase=PASSPHRASE, tz=datetime.UTC)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        screen = chat_screen(app)
        screen.open_conversation("alice")
        await alice.send_text("bob", f"hi\n{FAKE}\r\x1b[2K\u202e")
        await wait_until(pilot, lambda: len(shown_texts(app)) == 1, what="the message")
        shown = screen.query_one(MessageLine).render_text().plain
        first, second = shown.split("\n")
        assert first.endswith("alice: hi")
        assert second == f"{CONTINUATION}{FAKE}\\r\\x1b[2K⟨U+202E⟩"
        assert not re.match(r"\d\d:\d\d carol:", second)


async def test_a_group_name_in_a_notification_is_text_not_markup(profiles: Profiles) -> None:
    alice = await profiles.online("alice", receive=False)
    bob = await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    await bob.close()
    app = ChatApp(profiles.path("bob"), passphrase=PASSPHRASE, tz=datetime.UTC)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        name = "[@click=app.quit]ops[/]\x1b[2J"
        await groups.create(alice, name, ["bob"])
        group = groups.resolve(alice, name)
        await groups.send_text(alice, group, "welcome")

        def told() -> bool:
            return any("ops" in n.message for n in app._notifications)

        await wait_until(pilot, told, what="the group notice")
        [notice] = [n for n in app._notifications if "ops" in n.message]
        assert notice.markup is False
        assert "[@click=app.quit]ops[/]\\x1b[2J" in notice.message
