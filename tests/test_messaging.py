"""End to end through a real server process: register, send, receive, offline delivery."""

from __future__ import annotations

import pytest

from bastion.client import Client, MessageEvent
from bastion.errors import ServerRefusedError
from tests.conftest import PASSPHRASE, Profiles, ServerProcess
from tests.helpers import drain, next_events, texts, warnings

pytestmark = pytest.mark.network


async def test_two_users_exchange_messages_both_ways(profiles: Profiles) -> None:
    alice = await profiles.online("alice", receive=False)
    bob = await profiles.online("bob")
    await profiles.befriend("alice", "bob")
    assert texts(await drain(bob)) == []

    await alice.send_text("bob", "hello bob")
    [event] = await next_events(bob, 1)
    assert isinstance(event, MessageEvent)
    assert event.record.sender == "alice"
    assert event.record.device == alice.account.device_id
    assert event.record.text == "hello bob"
    assert event.record.conversation == "dm:alice,bob"

    await bob.send_text("alice", "hi alice")
    alice_rx = await profiles.online("alice")
    assert texts(await drain(alice_rx)) == ["hi alice"]
    history = [(r.sender, r.text) for r in alice_rx.history("bob")]
    assert history == [("alice", "hello bob"), ("bob", "hi alice")]


async def test_offline_user_gets_everything_in_order_once(profiles: Profiles) -> None:
    alice = await profiles.online("alice", receive=False)
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    sent = [f"message {i}" for i in range(30)]
    for text in sent:
        await alice.send_text("bob", text)

    bob = await profiles.online("bob")
    assert texts(await drain(bob)) == sent
    await bob.close()

    # Everything was acknowledged: a second session gets nothing again.
    bob_again = await profiles.online("bob")
    assert texts(await drain(bob_again)) == []
    assert [r.text for r in bob_again.history("alice")] == sent


async def test_unacknowledged_messages_are_redelivered_and_shown_once(
    profiles: Profiles,
) -> None:
    alice = await profiles.online("alice", receive=False)
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    await alice.send_text("bob", "are you there")

    bob = await profiles.online("bob")
    conn = bob.conn
    assert conn is not None
    deliver = await conn.incoming.get()
    # Process it (stored locally) but drop the connection before acknowledging.
    event = await bob.process(deliver)  # type: ignore[arg-type]
    assert isinstance(event, MessageEvent)
    await bob.close()

    bob_again = await profiles.online("bob")
    events = await drain(bob_again)
    assert texts(events) == []
    assert warnings(events) == []
    assert [r.text for r in bob_again.history("alice")] == ["are you there"]


async def test_register_refuses_taken_and_invalid_usernames(
    profiles: Profiles, server: ServerProcess
) -> None:
    await profiles.register("alice")
    with pytest.raises(ServerRefusedError) as taken:
        await Client.register(
            profiles.root / "other",
            PASSPHRASE,
            username="alice",
            server_url=server.url,
            fingerprint=server.fingerprint,
        )
    assert taken.value.code == "username_taken"
    assert not (profiles.root / "other" / "profile.json").exists()
    for bad in ["Al", "ALICE", "a" * 33, "alice bob", "al/ice", ""]:
        with pytest.raises(ValueError, match="not a valid username"):
            await Client.register(
                profiles.root / "bad",
                PASSPHRASE,
                username=bad,
                server_url=server.url,
                fingerprint=server.fingerprint,
            )


async def test_sending_to_unknown_user_is_refused(profiles: Profiles) -> None:
    alice = await profiles.online("alice", receive=False)
    with pytest.raises(ServerRefusedError) as refused:
        await alice.send_text("nobody", "hello?")
    assert refused.value.code == "unknown_user"


async def test_idempotent_send_is_stored_once(profiles: Profiles) -> None:
    alice = await profiles.online("alice", receive=False)
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    await alice.send_text("bob", "first")
    # Simulate a lost acknowledgement: queue the encrypted frame again and flush it twice.
    record = alice.history("bob")[-1]
    frame, _ = alice._encrypt(
        record.id,
        "bob",
        "text",
        "first",
        [("bob", d) for d in await alice.devices_of("bob")],
    )
    await alice.flush_outbox()
    with alice.profile.transaction():
        from bastion.protocol import frames

        alice.profile.queue_outgoing(record.id, frames.encode(frame))
    await alice.flush_outbox()

    bob = await profiles.online("bob")
    events = await drain(bob)
    assert texts(events) == ["first"]
