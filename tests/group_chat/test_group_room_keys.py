"""Room keys count only for the device that sent them over Olm, never from the group channel."""

from __future__ import annotations

import msgspec
import pytest

from bastion.client import WarningEvent, group_keys, groups
from bastion.protocol import frames
from tests.conftest import Profiles
from tests.group_chat.test_group_chat import fresh, group_texts
from tests.helpers import drain

pytestmark = pytest.mark.network


async def test_a_member_cannot_slip_in_a_room_key_for_another_sender(profiles: Profiles) -> None:
    for name in ("bob", "carol"):
        await profiles.register(name)
        await profiles.befriend("alice", name)
    alice = await fresh(profiles, "alice")
    ops = await groups.create(alice, "ops", ["bob", "carol"])
    await groups.send_text(alice, ops, "real")
    bob = await fresh(profiles, "bob")

    # Bob makes a Megolm session of his own and shares its key with Carol over Olm...
    now = 1_800_000_000_000
    fake = group_keys.new_outbound(ops.group_id, bob.profile.pickle_key, now)
    key = group_keys.room_key(
        fake, bob.profile.pickle_key, chain_seq=ops.seq, chain_hash=ops.state_hash
    )
    await bob.send_payload(
        "carol",
        group_keys.ROOM_KEY_KIND,
        msgspec.json.encode(key).decode(),
        group_id=ops.group_id,
    )
    # ...then has the server deliver a message from that session as if from Alice's device.
    claimed = group_keys.GroupPlaintext(
        group_id=ops.group_id,
        sender="alice",
        sender_device=alice.account.device_id,
        message_id=bytes(16),
        sent_at=now,
        body="forged",
        chain_seq=ops.seq,
        chain_hash=ops.state_hash,
    )
    _, ciphertext = group_keys.encrypt(fake, claimed, bob.device().sign, bob.profile.pickle_key)
    carol = await fresh(profiles, "carol")
    prefix = f"group-in:{ops.group_id.hex()}:"
    filed = carol.profile.get(prefix + f"bob:{bob.account.device_id}", groups.InboundSessions)
    assert filed is not None
    assert [s.session_id for s in filed.sessions] == [fake.session_id]  # filed under Bob
    alices = carol.profile.get(prefix + f"alice:{alice.account.device_id}", groups.InboundSessions)
    assert alices is not None
    assert fake.session_id not in [s.session_id for s in alices.sessions]

    forged = frames.Deliver(
        seq=10**12,
        sender="alice",
        sender_device=alice.account.device_id,
        server_ts=now,
        kind=frames.GROUP_KIND,
        body=frames.encode_item(
            frames.GroupMessageItem(group_id=ops.group_id, ciphertext=ciphertext)
        ),
    )
    event = await carol.process(forged)
    assert isinstance(event, WarningEvent)
    assert [r.text for r in groups.history(carol, ops)] == ["real"]


async def test_a_room_key_in_the_group_channel_is_refused(profiles: Profiles) -> None:
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    alice = await fresh(profiles, "alice")
    ops = await groups.create(alice, "ops", ["bob"])
    out = group_keys.new_outbound(ops.group_id, alice.profile.pickle_key, 1)
    key = group_keys.room_key(
        out, alice.profile.pickle_key, chain_seq=ops.seq, chain_hash=ops.state_hash
    )
    bob = await profiles.online("bob")
    assert group_texts(await drain(bob)) == []
    smuggled = frames.Deliver(
        seq=10**12,
        sender="alice",
        sender_device=alice.account.device_id,
        server_ts=1,
        kind=frames.GROUP_KIND,
        body=msgspec.msgpack.encode({"item": "key", **msgspec.to_builtins(key)}),
    )
    event = await bob.process(smuggled)
    assert isinstance(event, WarningEvent)
    assert "malformed group envelope" in event.reason
    held = bob.profile.get(
        f"group-in:{ops.group_id.hex()}:alice:{alice.account.device_id}", groups.InboundSessions
    )
    assert held is None
