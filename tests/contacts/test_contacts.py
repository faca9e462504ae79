"""Contacts with mutual consent through a real server: request, accept, decline, block, remove."""

from __future__ import annotations

import pytest

from bastion.client import Client, MessageEvent, contacts
from bastion.client.contacts import ContactChangedEvent, ContactRequestEvent
from bastion.errors import ServerRefusedError
from tests.conftest import Profiles
from tests.contacts.support import next_of, watching
from tests.helpers import drain, texts

pytestmark = pytest.mark.network


async def refused(client: Client, to: str, text: str = "hello?") -> str:
    with pytest.raises(ServerRefusedError) as info:
        await client.send_text(to, text)
    return info.value.code


def states(client: Client) -> dict[str, str]:
    return {c.user: c.state for c in contacts.local_contacts(client)}


async def test_request_with_note_then_accept_opens_the_conversation(profiles: Profiles) -> None:
    alice = await profiles.online("alice", receive=False)
    bob = await watching(profiles, "bob")

    assert await refused(alice, "bob") == "not_a_contact"
    assert await contacts.request(alice, "bob", "hi Bob, Alice from the office") == "pending_out"
    # The request carried its one note; anything more waits for Bob's answer.
    assert await refused(alice, "bob") == "not_a_contact"

    event = await next_of(bob, ContactRequestEvent)
    assert isinstance(event, ContactRequestEvent)
    assert (event.user, event.note) == ("alice", "hi Bob, Alice from the office")
    assert event.to_json()["type"] == "contact_request"
    assert event.to_json()["from"] == "alice"
    assert states(bob) == {"alice": "pending-in"}
    assert states(alice) == {"bob": "pending-out"}

    assert await contacts.act(bob, "alice", "accept") == "accepted"
    await alice.send_text("bob", "thanks for accepting")
    await bob.send_text("alice", "welcome")
    received = await next_of(bob, MessageEvent)
    assert isinstance(received, MessageEvent)
    assert received.record.text == "thanks for accepting"
    assert [c.state for c in await contacts.sync(alice)] == ["accepted"]
    alice_rx = await profiles.online("alice")
    assert texts(await drain(alice_rx)) == ["welcome"]


async def test_requests_cross_and_become_a_contact(profiles: Profiles) -> None:
    alice = await profiles.online("alice", receive=False)
    bob = await profiles.online("bob", receive=False)
    assert await contacts.request(alice, "bob", notify=False) == "pending_out"
    assert await contacts.request(bob, "alice", notify=False) == "accepted"
    await alice.send_text("bob", "we both asked")


async def test_accepting_someone_who_did_not_ask_is_refused(profiles: Profiles) -> None:
    alice = await profiles.online("alice", receive=False)
    await profiles.register("bob")
    with pytest.raises(ServerRefusedError) as info:
        await contacts.act(alice, "bob", "accept")
    assert info.value.code == "no_request"
    with pytest.raises(ServerRefusedError) as unknown:
        await contacts.request(alice, "nobody")
    assert unknown.value.code == "unknown_user"
    with pytest.raises(ValueError, match="280"):
        await contacts.request(alice, "bob", "x" * 281)


async def test_decline_is_silent_and_a_new_request_may_follow(profiles: Profiles) -> None:
    carol = await profiles.online("carol", receive=False)
    bob = await watching(profiles, "bob")
    await contacts.request(carol, "bob", "remember me?")
    await next_of(bob, ContactRequestEvent)
    assert await contacts.act(bob, "carol", "decline") == "none"
    assert states(bob) == {}
    # Carol is not told: her side still shows the request waiting.
    assert [(c.user, c.state) for c in await contacts.sync(carol)] == [("bob", "pending-out")]
    assert await refused(carol, "bob") == "not_a_contact"
    await contacts.request(carol, "bob", "second try")
    again = await next_of(bob, ContactRequestEvent)
    assert isinstance(again, ContactRequestEvent)
    assert again.note == "second try"


async def test_block_looks_like_removal_and_stops_everything(profiles: Profiles) -> None:
    alice = await profiles.online("alice", receive=False)
    bob = await profiles.online("bob", receive=False)
    carol = await profiles.online("carol", receive=False)
    await profiles.befriend("alice", "bob")
    await profiles.befriend("carol", "bob")
    await alice.send_text("bob", "before the block")

    assert await contacts.act(bob, "alice", "block") == "blocked"
    stranger_code = await refused(carol, "alice")  # what anyone who is not a contact sees
    assert await refused(alice, "bob") == stranger_code == "not_a_contact"
    # Alice's list shows what a removal would show: Bob is simply gone.
    assert await contacts.sync(alice) == []

    # A new request from Alice is swallowed: she sees it pending, Bob sees nothing.
    assert await contacts.request(alice, "bob", "why?") == "pending_out"
    assert [c.state for c in await contacts.sync(alice)] == ["pending-out"]
    assert await refused(alice, "bob") == "not_a_contact"

    # Carol, an accepted contact, is not affected.
    await carol.send_text("bob", "still here")
    bob_rx = await profiles.online("bob")
    events = await drain(bob_rx)
    assert texts(events) == ["before the block", "still here"]
    assert not [e for e in events if isinstance(e, ContactRequestEvent)]
    assert {c.user: c.state for c in await contacts.sync(bob_rx)} == {
        "alice": "blocked",
        "carol": "accepted",
    }

    # Unblocked, Alice can ask again and Bob hears about it.
    assert await contacts.act(bob_rx, "alice", "unblock") == "none"
    await contacts.request(alice, "bob", "friends again?")
    event = await next_of(bob_rx, ContactRequestEvent)
    assert isinstance(event, ContactRequestEvent)
    assert event.note == "friends again?"


async def test_remove_ends_the_conversation_both_ways(profiles: Profiles) -> None:
    alice = await watching(profiles, "alice")
    bob = await profiles.online("bob", receive=False)
    await profiles.befriend("alice", "bob")
    await bob.send_text("alice", "hi")
    assert await contacts.act(bob, "alice", "remove") == "none"
    told = [await next_of(alice, ContactChangedEvent) for _ in range(3)]
    assert [(e.user, e.state) for e in told if isinstance(e, ContactChangedEvent)] == [
        ("bob", "pending-out"),  # her own request, made from another connection
        ("bob", "accepted"),
        ("bob", "none"),
    ]
    assert await refused(bob, "alice") == "not_a_contact"
    assert await refused(alice, "bob") == "not_a_contact"
    assert states(alice) == {}


async def test_three_profiles_each_pair_decides_on_its_own(profiles: Profiles) -> None:
    alice = await profiles.online("alice", receive=False)
    bob = await profiles.online("bob", receive=False)
    carol = await profiles.online("carol", receive=False)
    await contacts.request(alice, "bob", notify=False)
    await contacts.request(alice, "carol", notify=False)
    await contacts.act(bob, "alice", "accept")
    await contacts.act(carol, "alice", "block")
    await alice.send_text("bob", "ok")
    # A request may carry one message; Carol blocked Alice, so it is swallowed, not refused.
    await alice.send_text("carol", "the request's one message")
    assert await refused(alice, "carol") == "not_a_contact"
    assert await refused(bob, "carol") == "not_a_contact"
    assert {c.user: c.state for c in await contacts.sync(alice)} == {
        "bob": "accepted",
        "carol": "pending-out",
    }
    assert {c.user: c.state for c in await contacts.sync(carol)} == {"alice": "blocked"}
    # Withdrawing a request removes it from the other side.
    await contacts.request(bob, "carol", notify=False)
    assert {c.user: c.state for c in await contacts.sync(carol)} == {
        "alice": "blocked",
        "bob": "pending-in",
    }
    assert await contacts.act(bob, "carol", "remove") == "none"
    assert {c.user: c.state for c in await contacts.sync(carol)} == {"alice": "blocked"}
