"""A sender's Megolm session is replaced after a member's device is revoked and after N messages."""

from __future__ import annotations

import pytest

from bastion.client import Client, devices, group_keys, groups
from bastion.errors import RejectedMessageError
from bastion.groups import chain
from tests.conftest import Profiles
from tests.group_chat.test_group_chat import fresh, group_texts, last_ciphertext
from tests.helpers import drain, next_events
from tests.test_devices import link_second_device

pytestmark = pytest.mark.network

DAY_MS = 86_400_000


def outbound(client: Client, group: chain.GroupState) -> group_keys.OutboundSession:
    out = client.profile.get("group-out:" + group.group_id.hex(), group_keys.OutboundSession)
    assert out is not None
    return out


def held_sessions(client: Client, group: chain.GroupState, sender: Client) -> list[str]:
    name = f"group-in:{group.group_id.hex()}:{sender.account.username}:{sender.account.device_id}"
    held = client.profile.get(name, groups.InboundSessions)
    return [] if held is None else [s.session_id for s in held.sessions]


async def next_group_text(client: Client) -> tuple[str, str]:
    """The next group message of a live connection (change events on the way are skipped)."""
    while True:
        found = group_texts(await next_events(client, 1))
        if found:
            return found[0]


async def test_session_is_replaced_when_a_members_device_is_revoked(profiles: Profiles) -> None:
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    alice = await fresh(profiles, "alice")
    bob_laptop = await link_second_device(profiles, "bob", "bob-laptop")
    await drain(bob_laptop)  # up to date; from here on it receives live
    bob = await profiles.online("bob", receive=False)
    ops = await groups.create(alice, "ops", ["bob"])
    await groups.send_text(alice, ops, "before the theft")
    first = outbound(alice, ops)
    assert set(first.shared["bob"]) == {bob.account.device_id, bob_laptop.account.device_id}
    assert await next_group_text(bob_laptop) == ("alice", "before the theft")
    assert held_sessions(bob_laptop, ops, alice) == [first.session_id]

    # Bob's laptop is stolen; he revokes it from his phone.
    await devices.revoke_device(bob, bob_laptop.account.device_id)
    await groups.send_text(alice, ops, "after the theft")
    second = outbound(alice, ops)
    assert second.session_id != first.session_id
    assert second.shared["bob"] == [bob.account.device_id]

    # Every key the laptop ever saved fails on the new message.
    ciphertext = last_ciphertext(alice)
    held = bob_laptop.profile.get(
        f"group-in:{ops.group_id.hex()}:alice:{alice.account.device_id}", groups.InboundSessions
    )
    assert held is not None
    assert [s.session_id for s in held.sessions] == [first.session_id]
    for inbound in held.sessions:
        with pytest.raises(RejectedMessageError, match="could not be decrypted"):
            group_keys.decrypt(
                inbound,
                ciphertext,
                group_id=ops.group_id,
                sender="alice",
                sender_device=alice.account.device_id,
                sender_ed25519=alice.device().ed25519,
                pickle_key=bob_laptop.profile.pickle_key,
            )

    bob_rx = await fresh_texts(profiles, "bob")
    assert bob_rx == [("alice", "before the theft"), ("alice", "after the theft")]


async def fresh_texts(profiles: Profiles, name: str) -> list[tuple[str, str]]:
    client = await profiles.online(name)
    return group_texts(await drain(client))


async def test_session_is_replaced_after_its_message_budget_and_after_seven_days(
    profiles: Profiles,
) -> None:
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    alice = await fresh(profiles, "alice")
    ops = await groups.create(alice, "ops", ["bob"])
    start = 1_800_000_000_000
    session_ids = []
    for n in range(4):
        await groups.send_text(alice, ops, f"m{n}", now=start + n, rotate_after_messages=3)
        session_ids.append(outbound(alice, ops).session_id)
    assert session_ids[0] == session_ids[1] == session_ids[2] != session_ids[3]

    # A week after the session was made, the next message starts a new one.
    await groups.send_text(alice, ops, "a week later", now=start + 3 + 7 * DAY_MS)
    assert outbound(alice, ops).session_id not in session_ids

    bob = await profiles.online("bob")
    assert [t for _, t in group_texts(await drain(bob))] == [
        "m0",
        "m1",
        "m2",
        "m3",
        "a week later",
    ]
    assert len(held_sessions(bob, ops, alice)) == 3


def test_default_budget_is_one_hundred_messages_or_seven_days() -> None:
    out = group_keys.new_outbound(b"g" * 32, b"k" * 32, 1000)
    worn = group_keys.OutboundSession(
        group_id=out.group_id, session_id=out.session_id, pickle=out.pickle, created_at=1000
    )
    worn.sent = 99
    assert not group_keys.needs_rotation(worn, 1000 + 7 * DAY_MS - 1)
    assert group_keys.needs_rotation(worn, 1000 + 7 * DAY_MS)
    worn.sent = 100
    assert group_keys.needs_rotation(worn, 1000)
