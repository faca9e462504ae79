"""Replies, reactions, edits and delete for everyone, between real clients through a real server."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from bastion.cli._common import message_json, render_message
from bastion.client import Client, HistoryRecord, MessageEvent, message_actions, replies
from bastion.client.message_actions import DELETE_WINDOW_MS, MessageChangedEvent
from bastion.client.records import Edit
from bastion.crypto.payload import Payload, seal
from bastion.errors import RejectedMessageError
from bastion.gateway import rpc
from tests.conftest import Profiles
from tests.helpers import drain, next_events, texts, warnings
from tests.test_devices import link_second_device

pytestmark = pytest.mark.network

CANARY = "canary-7f3a9c-the-words-that-must-go"


def changes(events: list[Any]) -> list[tuple[str, str, str]]:
    """(change, by, emoji or new text) of each message-changed event."""
    out = []
    for event in events:
        if isinstance(event, MessageChangedEvent):
            detail = event.emoji if event.change == "reaction" else event.record.text
            out.append((event.change, event.by, detail))
    return out


async def pair(profiles: Profiles) -> tuple[Client, Client, HistoryRecord]:
    """alice and bob, contacts and online; alice has sent bob one message (bob received it).

    mallory is registered too, and a contact of bob's (a third client for the forgeries).
    """
    alice = await profiles.online("alice")
    bob = await profiles.online("bob")
    await profiles.befriend("alice", "bob")
    await profiles.befriend("mallory", "bob")
    await drain(alice)
    await drain(bob)
    sent = await alice.send_text("bob", CANARY)
    assert texts(await next_events(bob, 1)) == [CANARY]
    return alice, bob, sent


async def events_until_deleted(client: Client) -> list[Any]:
    """Events up to and including the next deletion (notices of new devices come between)."""
    events: list[Any] = []

    async def collect() -> None:
        async for event in client.receive():
            events.append(event)
            if isinstance(event, MessageChangedEvent) and event.change == "deleted":
                return

    await asyncio.wait_for(collect(), 10)
    return events


def stored(client: Client, message_id: bytes) -> HistoryRecord:
    record = client.message(message_id)
    assert record is not None
    return record


async def test_reply_quotes_a_message_on_both_sides(profiles: Profiles) -> None:
    alice, bob, sent = await pair(profiles)
    reply = await bob.send_text("alice", "yes, that one", reply_to=sent.id)
    [event] = await next_events(alice, 1)
    assert isinstance(event, MessageEvent)
    assert (event.record.text, event.record.reply_to) == ("yes, that one", sent.id)
    assert stored(alice, reply.id).reply_to == sent.id
    assert stored(bob, reply.id).reply_to == sent.id
    with pytest.raises(ValueError, match="no message with this id"):
        await bob.send_text("alice", "quoting nothing", reply_to=b"\x01" * 16)


async def test_reactions_are_one_per_person_changeable_and_removable(profiles: Profiles) -> None:
    alice, bob, sent = await pair(profiles)
    await message_actions.react(bob, "alice", sent.id, "👍")
    await message_actions.react(alice, "bob", sent.id, "🎉")
    assert changes(await next_events(alice, 1)) == [("reaction", "bob", "👍")]
    assert changes(await next_events(bob, 1)) == [("reaction", "alice", "🎉")]
    await message_actions.react(bob, "alice", sent.id, "❤️")
    assert changes(await next_events(alice, 1)) == [("reaction", "bob", "❤️")]
    for client in (alice, bob):
        assert stored(client, sent.id).reactions == {"alice": "🎉", "bob": "❤️"}
    await message_actions.react(bob, "alice", sent.id, "")
    assert changes(await next_events(alice, 1)) == [("reaction", "bob", "")]
    for client in (alice, bob):
        assert stored(client, sent.id).reactions == {"alice": "🎉"}
    for bad in ("ok", "👍 ", "\u202e👍", ""):
        with pytest.raises(ValueError):
            message_actions.check_emoji(bad)


async def test_edit_keeps_the_trail_and_shows_edited(profiles: Profiles) -> None:
    alice, bob, sent = await pair(profiles)
    await message_actions.edit(alice, "bob", sent.id, "second try")
    await message_actions.edit(alice, "bob", sent.id, "third try")
    assert changes(await next_events(bob, 2)) == [
        ("edited", "alice", "second try"),
        ("edited", "alice", "third try"),
    ]
    for client in (alice, bob):
        record = stored(client, sent.id)
        assert record.text == "third try"
        assert record.edited_at > 0
        assert [e.text for e in record.edits] == [CANARY, "second try"]
    with pytest.raises(ValueError, match="someone else sent"):
        await message_actions.edit(bob, "alice", sent.id, "bob's words")


async def test_delete_for_everyone_leaves_a_marker_and_no_old_text_on_disk(
    profiles: Profiles,
) -> None:
    alice, bob, sent = await pair(profiles)
    await message_actions.edit(alice, "bob", sent.id, CANARY + " edited")
    await message_actions.react(bob, "alice", sent.id, "👍")
    await next_events(bob, 1)
    await next_events(alice, 1)
    old_rows = {name: sealed_row(c, sent.id) for name, c in (("alice", alice), ("bob", bob))}

    with pytest.raises(ValueError, match="someone else sent"):
        await message_actions.delete(bob, "alice", sent.id)
    await message_actions.delete(alice, "bob", sent.id)
    assert changes(await next_events(bob, 1)) == [("deleted", "alice", "")]
    for name, client in (("alice", alice), ("bob", bob)):
        record = stored(client, sent.id)
        assert record.deleted_at > 0
        assert (record.text, record.edits, record.reactions) == ("", [], {})
        folder = profiles.path(name)
        # The old row was sealed; with secure_delete no byte of it is left in any file,
        # and the rollback journal is gone after the commit (no WAL).
        assert not [p.name for p in folder.iterdir() if p.name.endswith(("-wal", "-journal"))]
        for path in folder.iterdir():
            data = path.read_bytes()
            assert CANARY.encode() not in data, path.name
            assert old_rows[name] not in data, path.name
    with pytest.raises(ValueError, match="deleted"):
        await message_actions.edit(alice, "bob", sent.id, "back again")


async def test_a_delete_only_within_the_window(profiles: Profiles) -> None:
    alice, _bob, sent = await pair(profiles)
    late = sent.sent_at + DELETE_WINDOW_MS + 1
    with pytest.raises(ValueError, match="within 24 hours"):
        await message_actions.delete(alice, "bob", sent.id, now=late)
    assert stored(alice, sent.id).text == CANARY


async def test_actions_reach_the_senders_other_device(profiles: Profiles) -> None:
    alice, bob, sent = await pair(profiles)
    laptop = await link_second_device(profiles, "alice", "alice-laptop")
    await drain(laptop)
    first = await bob.send_text("alice", "to both devices")
    assert texts(await next_events(laptop, 1)) == ["to both devices"]
    await next_events(alice, 1)

    await message_actions.react(alice, "bob", first.id, "👀")
    reply = await alice.send_text("bob", CANARY + " reply", reply_to=first.id)
    await message_actions.edit(alice, "bob", reply.id, "edited reply")
    await message_actions.delete(alice, "bob", reply.id)
    events = await next_events(laptop, 4)
    assert changes(events) == [
        ("reaction", "alice", "👀"),
        ("edited", "alice", "edited reply"),
        ("deleted", "alice", ""),
    ]
    assert changes(await events_until_deleted(bob)) == changes(events)
    for client in (laptop, bob):
        assert stored(client, first.id).reactions == {"alice": "👀"}
        assert stored(client, reply.id).deleted_at > 0
        assert stored(client, reply.id).text == ""
    assert sent.text == CANARY


# --- forged actions: a modified client signs what the honest one would refuse ------------


def forging(monkeypatch: pytest.MonkeyPatch, **fields: Any) -> None:
    """Make this process's clients sign payloads with ``fields`` changed."""

    def forged(payload: Payload, sign: Callable[[bytes], bytes]) -> bytes:
        return seal(msgspec.structs.replace(payload, **fields), sign)

    monkeypatch.setattr("bastion.client.client.seal", forged)


async def refused(receiver: Client, before: HistoryRecord, match: str) -> None:
    """The receiver warns about the next payload, counts it, and changes nothing."""
    rejected = receiver.stats().rejected
    [event] = warnings(await next_events(receiver, 1))
    assert match in event.reason
    assert receiver.stats().rejected == rejected + 1
    assert stored(receiver, before.id) == before


async def test_an_action_claiming_another_sender_is_rejected(
    profiles: Profiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    _alice, bob, sent = await pair(profiles)
    mallory = await profiles.online("mallory", receive=False)
    before = stored(bob, sent.id)
    forging(monkeypatch, sender="alice", conversation="dm:alice,bob")
    body = msgspec.json.encode({"id": sent.id.hex(), "text": "mallory was here"}).decode()
    await mallory.send_payload("bob", message_actions.EDIT, body, history=False)
    await refused(bob, before, "sender inside the message does not match")


async def test_an_action_on_a_message_of_another_conversation_is_rejected(
    profiles: Profiles,
) -> None:
    _alice, bob, sent = await pair(profiles)
    mallory = await profiles.online("mallory", receive=False)
    before = stored(bob, sent.id)
    for kind, body in (
        (message_actions.REACT, {"id": sent.id.hex(), "emoji": "💩"}),
        (message_actions.EDIT, {"id": sent.id.hex(), "text": "mallory was here"}),
        (message_actions.DELETE, {"id": sent.id.hex()}),
    ):
        await mallory.send_payload("bob", kind, msgspec.json.encode(body).decode(), history=False)
        await refused(bob, before, "another conversation")
    with pytest.raises(ValueError, match="no message with this id"):
        await mallory.send_text("bob", "quoting alice", reply_to=sent.id)


async def test_editing_or_deleting_someone_elses_message_is_rejected(
    profiles: Profiles,
) -> None:
    alice, bob, sent = await pair(profiles)
    before = stored(alice, sent.id)
    # bob's client skips its own check and sends the actions anyway.
    for kind, body in (
        (message_actions.EDIT, {"id": sent.id.hex(), "text": "bob's words"}),
        (message_actions.DELETE, {"id": sent.id.hex()}),
    ):
        await bob.send_payload("alice", kind, msgspec.json.encode(body).decode(), history=False)
        await refused(alice, before, "someone else sent")


async def test_a_delete_after_the_window_is_rejected(profiles: Profiles) -> None:
    alice, bob, sent = await pair(profiles)
    # The message arrived a day and a minute ago (as far as bob's history says).
    day_ago = sent.sent_at - DELETE_WINDOW_MS - 60_000
    old = msgspec.structs.replace(stored(bob, sent.id), sent_at=day_ago, server_ts=day_ago)
    with bob.profile.transaction():
        bob.profile.update_message(sent.id, old)
    body = msgspec.json.encode({"id": sent.id.hex()}).decode()
    await alice.send_payload("bob", message_actions.DELETE, body, history=False)
    await refused(bob, old, "within 24 hours")
    # The server's clock counts too: a sender who backdates the delete is still late.
    with bob.profile.transaction():
        bob.profile.update_message(sent.id, msgspec.structs.replace(old, sent_at=sent.sent_at))
    await alice.send_payload("bob", message_actions.DELETE, body, history=False)
    await refused(bob, stored(bob, sent.id), "within 24 hours")


async def test_a_reply_quoting_another_conversation_is_rejected(
    profiles: Profiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    _alice, bob, sent = await pair(profiles)
    mallory = await profiles.online("mallory", receive=False)
    mine = await mallory.send_text("bob", "an honest message")
    await next_events(bob, 1)
    # mallory's client rewrites the quoted id after its own check passed.
    honest_encode = replies.encode
    monkeypatch.setattr(replies, "encode", lambda text, reply_to: honest_encode(text, sent.id))
    await mallory.send_text("bob", "quoting alice", reply_to=mine.id)
    [event] = warnings(await next_events(bob, 1))
    assert "another conversation" in event.reason
    with pytest.raises(RejectedMessageError):
        replies.decode('{"reply_to": "zz", "text": "x"}')


def sealed_row(client: Client, message_id: bytes) -> bytes:
    """The sealed bytes of a message's row as the profile holds them now."""
    tag = client.profile.tag("msg", message_id)
    db = sqlite3.connect(Path(client.profile.path) / "profile.db")
    try:
        row = db.execute("SELECT value FROM messages WHERE tag = ?", (tag,)).fetchone()
    finally:
        db.close()
    assert row is not None
    return bytes(row[0])


def test_history_shows_replies_reactions_edited_and_deleted() -> None:
    base = HistoryRecord(
        id=b"\x0a" * 16,
        sender="bob",
        device="D1",
        peer="bob",
        conversation="dm:alice,bob",
        text="second try",
        sent_at=1_700_000_000_000,
        server_ts=1_700_000_000_000,
        direction="in",
        state="received",
        reply_to=b"\x0b" * 16,
        reactions={"alice": "👍", "bob": "\u202e"},
        edits=[Edit(text=CANARY, replaced_at=1_700_000_001_000)],
        edited_at=1_700_000_001_000,
    )
    deleted = msgspec.structs.replace(
        base, text="", edits=[], edited_at=0, reactions={}, reply_to=None, deleted_at=1
    )
    schema = {
        "$ref": "#/components/schemas/Message",
        "components": rpc.schema_document()["components"],
    }
    validator = jsonschema.Draft202012Validator(schema)
    shown = message_json(base, verified=False)
    assert shown["reply_to"] == "0b" * 16
    assert shown["reactions"] == {"alice": "👍", "bob": "\u202e"}
    assert shown["edited"] is True
    assert CANARY not in str(shown)
    line = render_message(shown)
    assert "(reply to 0b0b0b0b) second try  [edited]" in line
    assert "\u202e" not in line  # a reaction cannot turn the line around
    gone = message_json(deleted, verified=False)
    assert gone["deleted"] is True
    assert "[deleted]" in render_message(gone)
    for message in (shown, gone):
        assert not list(validator.iter_errors(message))
