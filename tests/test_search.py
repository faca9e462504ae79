"""Search across every conversation, through a real server: library, ``history --search``.

Alice talks with bob directly and with bob and carol in a group; her device
finds messages of both kinds by a word in any case, newest first, within the
limit, and neither the word searched for nor the texts found are written
anywhere in her profile folder.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import pytest

from bastion.client import Client, groups, search
from tests.conftest import Profiles
from tests.helpers import drain, next_events
from tests.test_canary import find_in_files
from tests.test_cli import bastion

pytestmark = pytest.mark.network


@dataclass
class Talk:
    """Alice's profile after the conversations, and what was said."""

    alice: Client
    profile: Path
    word: str  # a canary, in every message that should be found
    group: str  # the group's conversation id
    said: list[str]  # the texts holding ``word``, oldest first as alice stored them


@pytest.fixture
async def talk(profiles: Profiles) -> Talk:
    word = "pelican" + secrets.token_hex(4)
    for name in ("bob", "carol"):
        await profiles.register(name)
        await profiles.befriend("alice", name)
    alice = await profiles.online("alice")
    await drain(alice)
    club = await groups.create(alice, "Birders", ["bob", "carol"])
    bob = await profiles.online("bob")
    await drain(bob)
    carol = await profiles.online("carol")
    await drain(carol)

    said = [
        f"Saw a {word.upper()} at the pier",
        f"no way, a {word}? photos please",
        f"The {word.capitalize()}s fly over the Straße tonight",
    ]
    await bob.send_text("alice", said[0])
    await next_events(alice, 1)
    await alice.send_text("bob", said[1])
    await alice.send_text("bob", "lunch at noon instead")
    await groups.send_text(carol, groups.resolve(carol, "Birders"), said[2])
    await next_events(alice, 1)
    await groups.send_text(alice, club, "bring binoculars")
    return Talk(alice, profiles.path("alice"), word, groups.conversation(club.group_id), said)


def found(client: Client, text: str, **limit: int) -> list[tuple[str, str]]:
    return [(r.conversation, r.text) for r in search.messages(client, text, **limit)]


async def test_search_finds_direct_and_group_messages_newest_first_in_any_case(
    talk: Talk,
) -> None:
    dm = "dm:alice,bob"
    newest_first = [(talk.group, talk.said[2]), (dm, talk.said[1]), (dm, talk.said[0])]
    assert found(talk.alice, talk.word) == newest_first
    assert found(talk.alice, talk.word.upper()) == newest_first
    assert found(talk.alice, "sAW a " + talk.word) == [(dm, talk.said[0])]
    assert found(talk.alice, "STRASSE") == [(talk.group, talk.said[2])]  # case folding: ß = ss
    assert found(talk.alice, talk.word, limit=2) == newest_first[:2]
    assert found(talk.alice, "binoculars") == [(talk.group, "bring binoculars")]
    assert found(talk.alice, "flamingo") == []

    [record] = search.messages(talk.alice, "photos please")
    assert (record.sender, record.peer, record.direction) == ("alice", "bob", "out")


@pytest.mark.parametrize(
    ("text", "limit", "says"),
    [
        ("", 50, "the text is empty"),
        ("   ", 50, "the text is empty"),
        ("x" * 201, 50, "at most 200 characters"),
        ("pelican", 0, "from 1 to 500"),
        ("pelican", 501, "from 1 to 500"),
    ],
)
async def test_a_search_that_cannot_be_run_is_refused_with_a_sentence(
    profiles: Profiles, text: str, limit: int, says: str
) -> None:
    alice = await profiles.online("alice", receive=False)
    with pytest.raises(ValueError, match=says):
        search.messages(alice, text, limit=limit)


async def test_nothing_searched_or_found_lands_in_the_profile_folder(talk: Talk) -> None:
    assert len(search.messages(talk.alice, talk.word.upper())) == 3
    assert len(search.messages(talk.alice, "flamingo")) == 0
    await talk.alice.close()
    for canary in (talk.word, talk.word.upper(), "flamingo", "Straße", "photos please"):
        assert find_in_files([talk.profile], canary) == []


async def test_history_search_on_the_command_line(talk: Talk) -> None:
    await talk.alice.close()
    profile = str(talk.profile)

    lines = bastion("history", "--search", talk.word.upper(), "--json", "--profile", profile)
    messages = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [(m["type"], m["conversation"], m["text"]) for m in messages] == [
        ("message", talk.group, talk.said[2]),
        ("message", "dm:alice,bob", talk.said[1]),
        ("message", "dm:alice,bob", talk.said[0]),
    ]
    assert [m["from"] for m in messages] == ["carol", "alice", "bob"]
    assert messages[1]["state"] == "sent"

    text = bastion("history", "--search", talk.word, "--profile", profile).stdout.splitlines()
    when = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ\]"
    expected = [
        rf"\[#Birders\] {when} carol: {re.escape(talk.said[2])}",
        rf"\[with bob\] {when} you -> bob: {re.escape(talk.said[1])}",
        rf"\[with bob\] {when} bob: {re.escape(talk.said[0])}",
    ]
    assert len(text) == len(expected)
    for line, pattern in zip(text, expected, strict=True):
        assert re.fullmatch(pattern, line), line

    one = bastion("history", "--search", talk.word, "--limit", "1", "--profile", profile)
    assert one.stdout.splitlines() == text[:1]

    none = bastion("history", "--search", "flamingo", "--profile", profile)
    assert none.stdout == ""
    assert "no message on this device holds that text" in none.stderr

    for args, says in (
        (["--search", ""], "the text is empty"),
        (["--search", "x" * 201], "at most 200 characters"),
        (["--search", "x", "--limit", "501"], "from 1 to 500"),
        (["bob", "--search", "x"], "leave out the user"),
        (["bob", "--limit", "3"], "--limit goes with --search"),
        ([], "usage: bastion history USER"),
    ):
        refused = bastion("history", *args, "--profile", profile, check=False)
        assert refused.returncode == 1, (args, refused.stderr)
        assert says in refused.stderr, (args, refused.stderr)
        assert refused.stdout == ""

    for canary in (talk.word, talk.word.upper(), "flamingo"):
        assert find_in_files([talk.profile], canary) == []
