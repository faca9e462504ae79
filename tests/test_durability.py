"""What the server acknowledged survives it being killed or stopped, and is shown once."""

from __future__ import annotations

import asyncio

import pytest

from bastion.client import Client, Event
from tests.conftest import Profiles, ServerProcess
from tests.helpers import drain, next_events, texts, warnings

pytestmark = pytest.mark.network


async def reconnect(profiles: Profiles, client: Client, *, receive: bool = True) -> Client:
    """Close ``client`` (its connection may be dead) and sign in again from its profile."""
    await client.close()
    profiles.clients.remove(client)
    return await profiles.online(client.account.username, receive=receive)


async def test_acknowledged_messages_survive_kill_9(
    server: ServerProcess, profiles: Profiles
) -> None:
    alice = await profiles.online("alice", receive=False)
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    sent = [f"durable {i}" for i in range(5)]
    for text in sent:
        record = await alice.send_text("bob", text)
        assert record.state == "sent"
    server.kill()  # SIGKILL the moment the last acknowledgement arrived
    server.start()

    alice = await reconnect(profiles, alice, receive=False)  # flushes her outbox, if any
    assert [(r.text, r.state) for r in alice.history("bob")] == [(t, "sent") for t in sent]
    bob = await profiles.online("bob")
    events = await drain(bob)
    assert texts(events) == sent
    assert warnings(events) == []

    bob = await reconnect(profiles, bob)
    assert await drain(bob) == []
    assert [r.text for r in bob.history("alice")] == sent


async def test_received_messages_are_not_shown_again_after_kill_9(
    server: ServerProcess, profiles: Profiles
) -> None:
    alice = await profiles.online("alice", receive=False)
    bob = await profiles.online("bob")
    await profiles.befriend("alice", "bob")
    sent = ["one", "two", "three"]
    for text in sent:
        await alice.send_text("bob", text)
    assert texts(await next_events(bob, 3)) == sent
    # Acknowledgements may still be on their way to the database: at-least-once delivery
    # may hand them over again, and the client must not show them twice.
    server.kill()
    server.start()

    bob = await reconnect(profiles, bob)
    events = await drain(bob)
    assert texts(events) == []
    assert warnings(events) == []
    assert [r.text for r in bob.history("alice")] == sent
    assert bob.stats().rejected == 0


async def test_sigterm_restart_keeps_twenty_queued_messages_in_order(
    server: ServerProcess, profiles: Profiles
) -> None:
    alice = await profiles.online("alice", receive=False)
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    sent = [f"queued {i:02d}" for i in range(20)]
    for text in sent:
        await alice.send_text("bob", text)

    assert server.stop() == 0
    assert server.stdout.decode().splitlines()[-1] == "stopped"
    server.start()

    bob = await profiles.online("bob")
    assert texts(await drain(bob)) == sent
    bob = await reconnect(profiles, bob)
    assert await drain(bob) == []


async def test_sigterm_stops_cleanly_with_clients_connected(
    server: ServerProcess, profiles: Profiles
) -> None:
    alice = await profiles.online("alice")
    bob = await profiles.online("bob")
    await profiles.befriend("alice", "bob")
    await alice.send_text("bob", "still there?")
    assert texts(await next_events(bob, 1)) == ["still there?"]

    status = server.stop()
    server.proc = None  # stopped for good: the fixture's teardown would read its closed stdout
    assert status == 0
    assert server.stdout.decode().splitlines()[-1] == "stopped"
    assert "server.stopping" in server.log_text()

    # Both clients see their connection end instead of hanging.
    async def rest(client: Client) -> list[Event]:
        return [event async for event in client.receive()]

    assert await asyncio.wait_for(rest(bob), 10) == []
    assert await asyncio.wait_for(rest(alice), 10) == []
