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
