"""Ctrl+F in the chat app: search every conversation, open the one a message is in.

Driven by keys only, against a real server on 127.0.0.1: bob has direct
conversations with alice and carol and a group with both; one search lists the
messages of the group and of a direct conversation, newest first, and choosing
one opens its conversation showing the messages that hold the text.
"""

from __future__ import annotations

import pytest
from textual.widgets import Input, Label, ListView

from bastion.client import Client, groups
from bastion.tui.find import FindScreen, FoundItem
from tests.conftest import PASSPHRASE, Profiles
from tests.tui.support import chat_screen, online, plain, seed_history, shown_texts, wait_until
from tests.tui.test_app import SIZE, app_for, befriended, type_text

pytestmark = pytest.mark.network


def found_lines(screen: FindScreen) -> list[str]:
    return [item.describe().plain for item in screen.query(FoundItem)]


async def test_ctrl_f_finds_in_every_conversation_and_opens_the_chosen_one(
    profiles: Profiles,
) -> None:
    alice = await profiles.online("alice")
    await profiles.online("carol", receive=False)
    await befriended(profiles, "bob", "alice", "carol")
    ops = await groups.create(alice, "ops", ["bob", "carol"])
    key = groups.conversation(ops.group_id)
    bob = Client.open(profiles.path("bob"), PASSPHRASE)
    start = 1_700_000_000_000
    seed_history(
        bob,
        "alice",
        [("in", "saw a Kestrel on the roof"), ("out", "nice"), ("in", "kestrels nest there")],
        start_ms=start,
    )
    seed_history(bob, "carol", [("in", "lunch at noon?")], start_ms=start + 600_000)
    await bob.close()
    await groups.send_text(alice, ops, "the KESTREL is back")

    app = app_for(profiles.path("bob"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: online(app), what="sign-in")
        screen = chat_screen(app)
        await wait_until(
            pilot,
            lambda: (e := screen.index.find(key)) is not None and e.unread == 1,
            what="the group message",
        )

        await pilot.press("ctrl+f")
        find = app.screen
        assert isinstance(find, FindScreen)
        await type_text(pilot, "flamingo")
        await pilot.press("enter")
        result = find.query_one("#find-result", Label)
        assert plain(result) == "No message on this device holds that text."

        find.query_one("#find", Input).value = ""
        await pilot.press("enter")
        assert plain(result) == "say what to search for: the text is empty"
        assert found_lines(find) == []

        await type_text(pilot, "kestrel")
        await pilot.press("enter")
        assert plain(result) == "3 found"
        lines = found_lines(find)
        assert [line.split("  ", 1)[0] for line in lines] == ["#ops", "alice", "alice"]
        assert lines[0].endswith("alice: the KESTREL is back")
        assert lines[1].endswith("alice: kestrels nest there")
        assert lines[2].endswith("alice: saw a Kestrel on the roof")
        assert find.query_one("#found", ListView).has_focus

        # Down to the oldest, Enter: alice's conversation opens, filtered to the text.
        await pilot.press("down", "down", "enter")
        await wait_until(pilot, lambda: screen.current == "alice", what="alice's chat to open")
        assert app.screen is screen
        assert shown_texts(app) == ["saw a Kestrel on the roof", "kestrels nest there"]
        await pilot.press("escape")
        assert shown_texts(app) == ["saw a Kestrel on the roof", "nice", "kestrels nest there"]

        # The group's message opens the group; Esc closes the search without opening anything.
        await pilot.press("ctrl+f")
        await type_text(pilot, "KESTREL")
        await pilot.press("enter", "enter")
        await wait_until(pilot, lambda: screen.current == key, what="the group to open")
        assert shown_texts(app) == ["the KESTREL is back"]
        await pilot.press("ctrl+f", "escape")
        assert app.screen is screen
        assert screen.current == key
