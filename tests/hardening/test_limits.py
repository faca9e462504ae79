"""Abuse limits on a real server: each one holds, and honest traffic still passes."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from bastion.client.transport import ServerConnection
from bastion.errors import ServerRefusedError
from tests.conftest import Profiles
from tests.hardening.harness import ConfiguredServers
from tests.helpers import drain, next_events, texts

pytestmark = pytest.mark.network


async def test_registration_burst_from_one_address_is_cut_off(
    tmp_path: Path, servers: ConfiguredServers
) -> None:
    server = servers.start(registrations_per_address_burst=3, registrations_per_address_per_hour=1)
    profiles = Profiles(tmp_path, server)
    try:
        for name in ("user1", "user2", "user3"):
            await profiles.register(name)
        with pytest.raises(ServerRefusedError) as caught:
            await profiles.register("user4")
        assert caught.value.code == "rate_limited"
        # Existing accounts still sign in from the same address.
        user1 = await profiles.online("user1", receive=False)
        assert user1.conn is not None
    finally:
        await profiles.close()


async def test_message_flood_from_one_device_is_limited_while_others_get_through(
    tmp_path: Path, servers: ConfiguredServers
) -> None:
    server = servers.start(messages_per_second=0.5, messages_burst=5)
    profiles = Profiles(tmp_path, server)
    try:
        flooder = await profiles.online("flooder", receive=False)
        honest = await profiles.online("honest", receive=False)
        victim = await profiles.online("victim")
        await profiles.befriend("flooder", "victim")
        await profiles.befriend("honest", "victim")
        await drain(victim)
        codes = []
        for i in range(12):
            try:
                await flooder.send_text("victim", f"spam {i}")
                codes.append("sent")
            except ServerRefusedError as exc:
                codes.append(exc.code)
        assert codes == ["sent"] * 5 + ["rate_limited"] * 7
        await honest.send_text("victim", "hello, a real message")
        events = await next_events(victim, 6)
        assert texts(events)[-1] == "hello, a real message"
        assert texts(events).count("hello, a real message") == 1
        assert len([t for t in texts(events) if t.startswith("spam")]) == 5
        assert "limit.hit" in server.log_text()
    finally:
        await profiles.close()


async def test_full_offline_queue_tells_the_sender(
    tmp_path: Path, servers: ConfiguredServers
) -> None:
    server = servers.start(offline_queue_max=3)
    profiles = Profiles(tmp_path, server)
    try:
        alice = await profiles.online("alice", receive=False)
        await profiles.register("bob")
        await profiles.befriend("alice", "bob")
        for i in range(3):
            await alice.send_text("bob", f"message {i}")
        with pytest.raises(ServerRefusedError) as caught:
            await alice.send_text("bob", "one too many")
        assert caught.value.code == "queue_full"
        bob = await profiles.online("bob")
        assert texts(await drain(bob)) == ["message 0", "message 1", "message 2"]
        await bob.close()
        # Once bob has taken his messages, his queue has room again.
        await alice.send_text("bob", "after the drain")
    finally:
        await profiles.close()


async def test_connections_per_address_are_capped_and_freed_on_close(
    servers: ConfiguredServers,
) -> None:
    server = servers.start(connections_per_address=3)
    held = [await ServerConnection.open(server.url, pin=server.fingerprint) for _ in range(3)]
    try:
        with pytest.raises(ServerRefusedError) as caught:
            held.append(await ServerConnection.open(server.url, pin=server.fingerprint))
        assert "too many connections" in caught.value.message
        await held.pop().aclose()
        again = await ServerConnection.open(server.url, pin=server.fingerprint)
        held.append(again)
        assert again.challenge.nonce
    finally:
        for conn in held:
            with contextlib.suppress(Exception):
                await conn.aclose()
