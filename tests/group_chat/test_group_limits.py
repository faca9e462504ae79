"""The server's group limits, set in its bastion.toml: the member cap and the creation rate."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bastion.client import groups
from bastion.errors import ServerRefusedError
from bastion.groups import chain
from tests.conftest import Profiles
from tests.group_chat.test_group_chat import fresh
from tests.hardening.harness import ConfiguredServers

pytestmark = pytest.mark.network


@pytest.fixture
async def small(tmp_path: Path) -> AsyncIterator[Profiles]:
    """Clients of a server that allows 3 members per group and 2 new groups per user."""
    servers = ConfiguredServers(tmp_path / "servers")
    server = servers.start(
        group_max_members=3, group_creations_burst=2, group_creations_per_hour=0.001
    )
    profiles = Profiles(tmp_path, server)
    try:
        yield profiles
    finally:
        await profiles.close()
        for started in servers.started:
            started.kill()


async def test_member_cap_is_enforced_by_the_server(small: Profiles) -> None:
    for name in ("bill", "carol", "dave"):
        await small.register(name)
        await small.befriend("alice", name)
    alice = await fresh(small, "alice")
    with pytest.raises(ServerRefusedError) as too_big:
        await groups.create(alice, "big", ["bill", "carol", "dave"])
    assert too_big.value.code == "group_change_rejected"
    assert "full" in too_big.value.message
    assert groups.groups(alice) == []

    ops = await groups.create(alice, "ops", ["bill", "carol"])
    with pytest.raises(ServerRefusedError) as full:
        await groups.add_member(alice, ops, "dave")
    assert full.value.code == "group_change_rejected"
    assert sorted(groups.resolve(alice, "ops").members) == ["alice", "bill", "carol"]
    # Room is made by someone leaving; then the add goes through.
    ops = await groups.change(alice, ops, chain.RemoveMember(user="carol"))
    ops = await groups.add_member(alice, ops, "dave")
    assert sorted(ops.members) == ["alice", "bill", "dave"]


async def test_group_creation_is_rate_limited_per_user(small: Profiles) -> None:
    alice = await fresh(small, "alice")
    await groups.create(alice, "one", [])
    await groups.create(alice, "two", [])
    with pytest.raises(ServerRefusedError) as limited:
        await groups.create(alice, "three", [])
    assert limited.value.code == "rate_limited"
    assert [g.name for g in groups.groups(alice)] == ["one", "two"]
    # Others are not held back by alice's limit.
    bill = await fresh(small, "bill")
    assert (await groups.create(bill, "bills", [])).name == "bills"


@pytest.fixture
async def tight(tmp_path: Path) -> AsyncIterator[Profiles]:
    """A server with a 3-change chain cap, 600-byte changes, 6 changes per account."""
    servers = ConfiguredServers(tmp_path / "servers")
    server = servers.start(
        group_max_chain_changes=3,
        group_max_change_bytes=600,
        group_changes_per_account_burst=6,
        group_changes_per_account_per_hour=0.001,
    )
    profiles = Profiles(tmp_path, server)
    try:
        yield profiles
    finally:
        await profiles.close()
        for started in servers.started:
            started.kill()


async def test_chain_length_change_size_and_change_rate_are_capped(tight: Profiles) -> None:
    alice = await fresh(tight, "alice")
    ops = await groups.create(alice, "ops", [])
    for name in ("a", "b"):
        ops = await groups.change(alice, ops, chain.Rename(name=name))
    with pytest.raises(ServerRefusedError) as full:
        await groups.change(alice, ops, chain.Rename(name="c"))
    assert full.value.code == "group_change_rejected"
    assert "chain is full" in full.value.message
    with pytest.raises(ServerRefusedError) as big:
        await groups.create(alice, "é" * 256, [])
    assert big.value.code == "group_change_rejected"
    assert "at most 600 bytes" in big.value.message

    # Per account: alice has made 3 changes; 3 more go through, the next is refused.
    two = await groups.create(alice, "two", [])
    three = await groups.create(alice, "three", [])
    two = await groups.change(alice, two, chain.Rename(name="two-a"))
    with pytest.raises(ServerRefusedError) as tired:
        await groups.change(alice, three, chain.Rename(name="three-a"))
    assert tired.value.code == "rate_limited"


async def test_a_group_takes_a_bounded_number_of_changes_whoever_posts(
    tmp_path: Path,
) -> None:
    servers = ConfiguredServers(tmp_path / "servers")
    server = servers.start(group_changes_per_group_burst=2, group_changes_per_group_per_hour=0.001)
    profiles = Profiles(tmp_path, server)
    try:
        await profiles.befriend("bob", "carol")
        bob = await fresh(profiles, "bob")
        shared = await groups.create(bob, "shared", ["carol"])
        shared = await groups.change(bob, shared, chain.Promote(user="carol"))
        carol = await fresh(profiles, "carol")
        await groups.sync(carol, shared.group_id)
        current = groups.state_of(carol, shared.group_id)
        assert current is not None
        with pytest.raises(ServerRefusedError) as busy:
            await groups.change(carol, current, chain.Rename(name="s2"))
        assert busy.value.code == "rate_limited"
        # Another group is not held back.
        assert (await groups.create(carol, "carols", [])).name == "carols"
    finally:
        await profiles.close()
        for started in servers.started:
            started.kill()
