"""Group chats through a real server: create, talk, add, remove, leave, rename; attacks."""

from __future__ import annotations

import pytest

from bastion.client import Client, Event, MessageEvent, WarningEvent, groups
from bastion.groups import chain
from bastion.protocol import frames
from tests.conftest import Profiles
from tests.helpers import drain

pytestmark = pytest.mark.network


def group_texts(events: list[Event]) -> list[tuple[str, str]]:
    return [
        (e.record.sender, e.record.text)
        for e in events
        if isinstance(e, MessageEvent) and e.record.conversation.startswith("group:")
    ]


def changes(events: list[Event]) -> list[str]:
    return [e.change for e in events if isinstance(e, groups.GroupChangeEvent)]


def group_warnings(events: list[Event]) -> list[str]:
    return [e.reason for e in events if isinstance(e, groups.GroupWarningEvent)]


def last_ciphertext(client: Client) -> bytes:
    found = client.extensions["groups.last_ciphertext"]
    assert isinstance(found, bytes)
    return found


async def fresh(profiles: Profiles, name: str) -> Client:
    client = await profiles.online(name)
    await drain(client)
    return client


async def test_create_talk_add_remove_leave_rename(profiles: Profiles) -> None:
    for name in ("bill", "carol", "dave"):
        await profiles.register(name)
        await profiles.befriend(
            "alice", name
        )  # members join at once: they are the creator's contacts
    alice = await fresh(profiles, "alice")
    ops = await groups.create(alice, "ops", ["bill", "carol"])
    assert sorted(ops.members) == ["alice", "bill", "carol"]
    await groups.send_text(alice, ops, "hello ops")

    bill = await fresh(profiles, "bill")
    carol = await fresh(profiles, "carol")
    assert groups.resolve(bill, "ops").members == ops.members
    assert [r.text for r in groups.history(bill, ops)] == ["hello ops"]
    assert [r.text for r in groups.history(carol, ops)] == ["hello ops"]
    assert groups.history(carol, ops)[0].conversation == "group:" + ops.group_id.hex()

    ops = await groups.add_member(alice, ops, "dave")
    ops = await groups.change(alice, ops, chain.RemoveMember(user="carol"))
    carol_ciphertext_before = last_ciphertext(alice)
    await groups.send_text(alice, ops, "carol is gone")
    after_removal = last_ciphertext(alice)
    assert after_removal != carol_ciphertext_before

    dave = await fresh(profiles, "dave")
    assert [r.text for r in groups.history(dave, ops)] == ["carol is gone"]
    bill_rx = await profiles.online("bill")
    events = await drain(bill_rx)
    assert "carol is gone" in [t for _, t in group_texts(events)]
    assert {"add_member", "remove_member"} <= set(changes(events))

    # Carol, with every key she ever had, cannot read what was sent after her removal.
    carol_rx = await profiles.online("carol")
    carol_events = await drain(carol_rx)
    assert "remove_member" in changes(carol_events)
    forged = frames.Deliver(
        seq=10**12,
        sender="alice",
        sender_device=alice.account.device_id,
        server_ts=1,
        kind=frames.GROUP_KIND,
        body=frames.encode_item(
            frames.GroupMessageItem(group_id=ops.group_id, ciphertext=after_removal)
        ),
    )
    event = await carol_rx.process(forged)
    assert isinstance(event, WarningEvent)
    assert "carol is gone" not in [r.text for r in groups.history(carol_rx, ops)]

    # Bill leaves; Dave renames (after being made admin).
    await groups.change(alice, ops, chain.Promote(user="dave"))
    await groups.change(bill_rx, ops, chain.Leave())
    ops = await groups.change(dave, ops, chain.Rename(name="ops-2"))
    assert ops.name == "ops-2"
    assert sorted(ops.members) == ["alice", "dave"]
    await groups.send_text(dave, ops, "just us")
    alice_rx = await profiles.online("alice")
    alice_events = await drain(alice_rx)
    assert ("dave", "just us") in group_texts(alice_events)
    assert groups.resolve(alice_rx, "ops-2").members == ops.members

    # Carol, a former member, can fetch the chain only up to her own removal: she
    # learns neither the new name nor who is in the group now.
    await groups.sync(carol_rx, ops.group_id)
    carol_view = groups.state_of(carol_rx, ops.group_id)
    assert carol_view is not None
    assert carol_view.name == "ops"
    assert "carol" not in carol_view.members
    assert "bill" in carol_view.members


async def test_replayed_reordered_and_moved_ciphertexts_are_rejected(profiles: Profiles) -> None:
    await profiles.register("bill")
    await profiles.befriend("alice", "bill")
    alice = await fresh(profiles, "alice")
    one = await groups.create(alice, "one", ["bill"])
    two = await groups.create(alice, "two", ["bill"])
    await groups.send_text(alice, two, "in two")
    in_two = last_ciphertext(alice)
    sent = []
    for text in ("first", "second"):
        await groups.send_text(alice, one, text)
        sent.append(last_ciphertext(alice))
    bill = await fresh(profiles, "bill")
    assert [r.text for r in groups.history(bill, one)] == ["first", "second"]

    def deliver(seq: int, group_id: bytes, ciphertext: bytes) -> frames.Deliver:
        return frames.Deliver(
            seq=seq,
            sender="alice",
            sender_device=alice.account.device_id,
            server_ts=1,
            kind=frames.GROUP_KIND,
            body=frames.encode_item(
                frames.GroupMessageItem(group_id=group_id, ciphertext=ciphertext)
            ),
        )

    replayed = await bill.process(deliver(10**12, one.group_id, sent[1]))
    reordered = await bill.process(deliver(10**12 + 1, one.group_id, sent[0]))
    moved = await bill.process(deliver(10**12 + 2, one.group_id, in_two))
    for event in (replayed, reordered, moved):
        assert isinstance(event, WarningEvent)
    assert isinstance(replayed, WarningEvent)
    assert "replayed" in replayed.reason
    assert [r.text for r in groups.history(bill, one)] == ["first", "second"]


async def test_forged_and_replayed_membership_changes_are_rejected(profiles: Profiles) -> None:
    for name in ("bill", "mallory"):
        await profiles.register(name)
    await profiles.befriend("alice", "bill")
    alice = await fresh(profiles, "alice")
    ops = await groups.create(alice, "ops", ["bill"])
    bill = await fresh(profiles, "bill")
    mallory = await fresh(profiles, "mallory")
    before = groups.state_of(bill, ops.group_id)
    assert before is not None

    # A change signed by a key that is not an admin's (the server's, or a stranger's).
    forged = chain.make_change(
        mallory.identity(),
        before,
        "alice",
        chain.AddMember(user="mallory", key=mallory.identity().public_bytes),
        now=2e9,
    )
    events = groups.ingest(bill, ops.group_id, [chain.encode_change(forged)])
    assert group_warnings(events)
    assert changes(events) == []
    # A genuine old change delivered again.
    record = bill.profile.get("group:" + ops.group_id.hex(), groups.GroupRecord)
    assert record is not None
    events = groups.ingest(bill, ops.group_id, [record.changes[0]])
    assert group_warnings(events)
    assert changes(events) == []
    assert groups.state_of(bill, ops.group_id) == before
