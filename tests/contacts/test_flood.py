"""Floods of contact requests and messages from many fresh accounts hit the limits.

The target's accepted contacts still get through, and what does reach the target
is bounded: one request (with one encrypted note) per admitted requester.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterator
from pathlib import Path

import pytest

from bastion.client import Client, contacts
from bastion.client.contacts import ContactRequestEvent
from bastion.errors import ServerRefusedError
from tests.conftest import Profiles
from tests.hardening.harness import ConfiguredServers
from tests.helpers import drain, texts

pytestmark = pytest.mark.network


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ConfiguredServers]:
    factory = ConfiguredServers(tmp_path / "configured")
    yield factory
    for server in factory.started:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()


async def outcome(work: Awaitable[object]) -> str:
    try:
        await work
    except ServerRefusedError as exc:
        return exc.code
    return "ok"


async def test_fifty_fresh_accounts_cannot_bury_one_user(profiles: Profiles) -> None:
    await profiles.befriend("alice", "bill")
    bill = await profiles.online("bill", receive=False)
    flood: list[Client] = [await profiles.online(f"flood{i:02d}", receive=False) for i in range(50)]

    requests = [await outcome(contacts.request(c, "alice", "let me in")) for c in flood]
    messages = [await outcome(c.send_text("alice", "spam")) for c in flood]
    # The default per-recipient burst (10) admits the first requests; the rest are told why.
    assert requests == ["ok"] * 10 + ["rate_limited"] * 40
    assert messages == ["not_a_contact"] * 50  # each admitted request carried its one note

    await bill.send_text("alice", "the real one")
    alice = await profiles.online("alice")
    events = await drain(alice)
    assert texts(events) == ["the real one"]
    asked = [e.user for e in events if isinstance(e, ContactRequestEvent)]
    assert asked == [f"flood{i:02d}" for i in range(10)]


async def test_one_account_cannot_ask_everyone(profiles: Profiles) -> None:
    spammer = await profiles.online("spammer", receive=False)
    targets = [f"target{i:02d}" for i in range(21)]
    for name in targets:
        await profiles.register(name)
    results = [await outcome(contacts.request(spammer, name, notify=False)) for name in targets]
    assert results == ["ok"] * 20 + ["rate_limited"]  # contact_requests_per_sender_burst


async def test_open_requests_per_recipient_are_capped(
    servers: ConfiguredServers, tmp_path: Path
) -> None:
    server = servers.start(contact_requests_per_recipient_burst=100, contact_requests_pending_max=3)
    profiles = Profiles(tmp_path, server)
    try:
        alice = await profiles.online("alice", receive=False)
        askers = [await profiles.online(f"asker{i}", receive=False) for i in range(4)]
        results = [await outcome(contacts.request(c, "alice", notify=False)) for c in askers]
        assert results == ["ok"] * 3 + ["rate_limited"]
        # Declining one frees a place.
        await contacts.act(alice, "asker0", "decline")
        assert await outcome(contacts.request(askers[3], "alice", notify=False)) == "ok"
    finally:
        await profiles.close()
