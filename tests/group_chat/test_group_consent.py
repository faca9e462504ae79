"""Nobody is put in a group without consent: invitations, blocks and the contact gate.

Real server process, real clients. Each attack here worked before group
membership needed consent (a stranger's group delivered to the victim at once,
co-members could message each other directly, a block did not reach through a
group, a member who left could be added back at once).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bastion.client import (
    Client,
    Event,
    MessageEvent,
    WarningEvent,
    contacts,
    group_invites,
    groups,
)
from bastion.errors import ServerRefusedError, StateError
from bastion.groups import chain
from bastion.protocol import frames
from tests.conftest import Profiles
from tests.group_chat.test_group_chat import fresh, group_texts
from tests.hardening.harness import ConfiguredServers
from tests.helpers import drain

pytestmark = pytest.mark.network


def invites_in(events: list[Event]) -> list[group_invites.GroupInviteEvent]:
    return [e for e in events if isinstance(e, group_invites.GroupInviteEvent)]


async def online(profiles: Profiles, name: str) -> tuple[Client, list[Event]]:
    """``name`` on a new connection (an older one of the device is closed), and its backlog."""
    client = await profiles.online(name)
    return client, await drain(client)


def direct_texts(events: list[Event]) -> list[tuple[str, str]]:
    return [
        (e.record.sender, e.record.text)
        for e in events
        if isinstance(e, MessageEvent) and not e.record.conversation.startswith("group:")
    ]


async def test_a_stranger_who_puts_you_in_a_group_only_sends_an_invitation(
    profiles: Profiles,
) -> None:
    await profiles.register("victim")
    mallory = await fresh(profiles, "mallory")
    spam = await groups.create(mallory, "cheap pills", ["victim"])
    await groups.send_text(mallory, spam, "buy now")
    posted = await groups.send_text(mallory, spam, "buy more")
    assert posted.state == "sent"  # the stranger is not told anything

    victim, events = await online(profiles, "victim")
    assert group_texts(events) == []
    assert [i.inviter for i in invites_in(events)] == ["mallory"]
    assert groups.groups(victim) == []  # not in any group
    [invite] = await group_invites.pending(victim)
    assert (invite.inviter, invite.name, invite.members) == ("mallory", "cheap pills", 2)
    # The server gives the chain only to members who joined.
    with pytest.raises(ServerRefusedError) as refused:
        await groups.sync(victim, spam.group_id)
    assert refused.value.code == "unknown_group"

    # Declined: nothing ever arrives, and the stranger's view does not change.
    await group_invites.decline(victim, "cheap pills")
    assert await group_invites.pending(victim) == []
    await groups.send_text(mallory, spam, "last chance")
    victim, events = await online(profiles, "victim")
    assert group_texts(events) == []
    assert await group_invites.pending(victim) == []


async def test_the_invitation_arrives_as_an_event_and_accepting_joins(profiles: Profiles) -> None:
    await profiles.register("bob")
    alice = await fresh(profiles, "alice")
    ops = await groups.create(alice, "ops", ["bob"])
    bob, events = await online(profiles, "bob")
    [invite] = invites_in(events)
    assert invite.to_json()["type"] == "group_invite"
    assert (invite.group_id, invite.inviter) == (ops.group_id.hex(), "alice")
    joined = await group_invites.accept(bob, ops.group_id.hex()[:12])
    assert sorted(joined.members) == ["alice", "bob"]
    await groups.send_text(alice, ops, "welcome")
    bob, events = await online(profiles, "bob")
    assert group_texts(events) == [("alice", "welcome")]
    with pytest.raises(StateError, match="no invitation"):
        await group_invites.accept(bob, "ops")


async def test_sharing_a_group_opens_no_direct_conversation(profiles: Profiles) -> None:
    await profiles.register("bob")
    alice = await fresh(profiles, "alice")
    ops = await groups.create(alice, "ops", ["bob"])
    bob = await profiles.online("bob", receive=False)
    await group_invites.accept(bob, "ops")
    await groups.send_text(bob, ops, "hello group")  # room keys pass: they are members

    # A direct message between co-members who are not contacts is refused...
    with pytest.raises(ServerRefusedError) as refused:
        await bob.send_text("alice", "hi, just you")
    assert refused.value.code == "not_a_contact"
    # ...and a text smuggled on the group's room-key path is dropped by the receiver.
    await bob.send_payload("alice", "text", "sneaky direct text", group_id=ops.group_id)
    alice_rx, events = await online(profiles, "alice")
    assert direct_texts(events) == []
    assert any(isinstance(e, WarningEvent) and "other than a room key" in e.reason for e in events)
    assert group_texts(events) == [("bob", "hello group")]
    assert alice_rx.history("bob") == []


async def test_a_blocked_account_cannot_add_you_or_reach_you_through_a_group(
    profiles: Profiles,
) -> None:
    for name in ("victim", "mallory"):
        await profiles.register(name)
        await profiles.befriend("alice", name)
    victim = await profiles.online("victim", receive=False)
    await contacts.act(victim, "mallory", "block")

    # Mallory cannot add the victim: no invitation, nothing delivered, and mallory
    # sees what an unanswered invitation looks like.
    mallory = await fresh(profiles, "mallory")
    trap = await groups.create(mallory, "trap", ["victim"])
    await groups.send_text(mallory, trap, "gotcha")
    assert await group_invites.pending(victim) == []
    await contacts.act(victim, "mallory", "unblock")
    assert await group_invites.pending(victim) == []  # a withheld invitation stays withheld
    await contacts.act(victim, "mallory", "block")

    # In a group both are in, nothing of mallory's reaches the victim once blocked, not even
    # under a room key the victim already holds; alice gets it, and mallory is not told.
    await contacts.act(victim, "mallory", "unblock")
    alice = await fresh(profiles, "alice")
    ops = await groups.create(alice, "ops", ["victim", "mallory"])
    await groups.send_text(mallory, ops, "before the block")
    await contacts.act(victim, "mallory", "block")
    await groups.send_text(mallory, ops, "from mallory")
    await groups.send_text(alice, ops, "from alice")
    _, victim_events = await online(profiles, "victim")
    assert group_texts(victim_events) == [
        ("mallory", "before the block"),
        ("alice", "from alice"),
    ]
    assert invites_in(victim_events) == []
    _, alice_events = await online(profiles, "alice")
    assert ("mallory", "from mallory") in group_texts(alice_events)
    assert not [w for w in mallory.notices if "victim" in str(w)]  # the block is not shown


async def test_after_leaving_only_a_new_accepted_invitation_brings_you_back(
    profiles: Profiles,
) -> None:
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    alice = await fresh(profiles, "alice")
    ops = await groups.create(alice, "ops", ["bob"])  # a contact: joins at once
    bob = await profiles.online("bob", receive=False)
    await groups.sync(bob, ops.group_id)
    await groups.change(bob, ops, chain.Leave())

    ops = await groups.add_member(alice, ops, "bob")  # the chain names bob again...
    await groups.send_text(alice, ops, "come back")
    bob, bob_events = await online(profiles, "bob")
    assert group_texts(bob_events) == []  # ...but nothing reaches him
    assert [i.inviter for i in invites_in(bob_events)] == ["alice"]
    fetched = await alice.conn.request(  # type: ignore[union-attr]
        frames.GroupFetch(req=7, group_id=ops.group_id, after_seq=ops.seq - 1), 7
    )
    assert isinstance(fetched, frames.GroupChain)
    assert (fetched.members, fetched.invited) == (["alice"], ["bob"])

    await group_invites.accept(bob, "ops")
    await groups.send_text(alice, ops, "welcome back")
    _, bob_events = await online(profiles, "bob")
    assert group_texts(bob_events) == [("alice", "welcome back")]


@pytest.fixture
async def strict(tmp_path: Path) -> AsyncIterator[Profiles]:
    """Clients of a server that lets each account receive 2 requests or invitations at once."""
    servers = ConfiguredServers(tmp_path / "servers")
    server = servers.start(
        contact_requests_per_recipient_burst=2, contact_requests_per_recipient_per_hour=0.001
    )
    profiles = Profiles(tmp_path, server)
    try:
        yield profiles
    finally:
        await profiles.close()
        for started in servers.started:
            started.kill()


async def test_invitations_share_the_contact_requests_flood_limit(strict: Profiles) -> None:
    await strict.register("victim")
    spammers = [await fresh(strict, f"spammer{n}") for n in range(3)]
    await groups.create(spammers[0], "one", ["victim"])
    await contacts.request(spammers[1], "victim", notify=False)
    with pytest.raises(ServerRefusedError) as limited:
        await groups.create(spammers[2], "three", ["victim"])
    assert limited.value.code == "rate_limited"
    assert groups.groups(spammers[2]) == []
    victim = await strict.online("victim", receive=False)
    assert [i.inviter for i in await group_invites.pending(victim)] == ["spammer0"]
