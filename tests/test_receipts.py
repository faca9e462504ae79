"""Delivery receipts: end to end, and only from the user a message went to."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from bastion.client import receipts
from tests.conftest import Profiles
from tests.helpers import drain, next_events, texts

pytestmark = pytest.mark.network


async def test_receiving_client_reports_delivery_and_the_sender_sees_it(
    profiles: Profiles,
) -> None:
    alice = await profiles.online("alice", receive=False)
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    first = await alice.send_text("bob", "one")
    second = await alice.send_text("bob", "two")
    assert [r.state for r in alice.history("bob")] == ["sent", "sent"]

    bob = await profiles.online("bob")
    receipts.enable(bob)
    assert texts(await drain(bob)) == ["one", "two"]

    alice_rx = await profiles.online("alice")
    events = await drain(alice_rx)
    [delivered] = [e for e in events if isinstance(e, receipts.DeliveredEvent)]
    assert delivered.peer == "bob"
    assert set(delivered.ids) == {first.id.hex(), second.id.hex()}
    assert delivered.to_json()["type"] == "delivered"
    assert [r.state for r in alice_rx.history("bob")] == ["delivered", "delivered"]


async def test_no_one_else_can_mark_a_message_delivered(profiles: Profiles) -> None:
    alice = await profiles.online("alice", receive=False)
    await profiles.register("bob")
    carol = await profiles.online("carol", receive=False)
    await profiles.befriend("alice", "bob")
    await profiles.befriend("alice", "carol")
    sent = await alice.send_text("bob", "for bob only")

    # Carol knows the id (say, the server leaked it) and sends a receipt for it.
    await carol.send_payload(
        "alice", receipts.KIND, json.dumps({"ids": [sent.id.hex()]}), history=False
    )
    alice_rx = await profiles.online("alice")
    events = await drain(alice_rx)
    assert [e for e in events if isinstance(e, receipts.DeliveredEvent)] == []
    assert [r.state for r in alice_rx.history("bob")] == ["sent"]
    assert alice_rx.stats().rejected == 0  # well formed, just not hers to confirm


async def test_messages_waiting_at_sign_in_are_receipted_without_waiting_for_another(
    profiles: Profiles,
) -> None:
    """A listening client (``receive`` without ``until_synced``) answers the sign-in queue at once.

    The queue ends with ``synced``, not with another delivery: the receipts for it must
    not wait until some later message arrives (they did, and a sender who wrote while
    the other side was offline saw "sent" for ever).
    """
    alice = await profiles.online("alice", receive=False)
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    sent = [await alice.send_text("bob", text) for text in ("one", "two", "three")]
    await alice.disconnect()

    bob = await profiles.online("bob")
    receipts.enable(bob)
    shown: list[str] = []

    async def listen() -> None:  # as `bastion listen` does: stays on after the queue
        async for event in bob.receive():
            shown.extend(texts([event]))

    listening = asyncio.create_task(listen())
    try:
        await alice.connect(receive=True)
        [delivered] = await next_events(alice, 1)
        assert isinstance(delivered, receipts.DeliveredEvent)
        assert set(delivered.ids) == {r.id.hex() for r in sent}
        assert shown == ["one", "two", "three"]
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
