"""A newly linked device of a member gets the current room key with that member's next message."""

from __future__ import annotations

import pytest

from bastion.client import groups
from tests.conftest import Profiles
from tests.group_chat.test_group_chat import fresh
from tests.helpers import drain
from tests.test_devices import link_second_device

pytestmark = pytest.mark.network


async def test_a_newly_linked_device_reads_the_next_message_of_its_own_account(
    profiles: Profiles,
) -> None:
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    alice = await fresh(profiles, "alice")
    ops = await groups.create(alice, "ops", ["bob"])
    await groups.send_text(alice, ops, "before the link")
    second = await link_second_device(profiles, "alice", "alice-laptop")
    await drain(second)

    await groups.send_text(alice, ops, "after the link")
    laptop = await profiles.online("alice-laptop")
    await drain(laptop)
    assert [r.text for r in groups.history(laptop, ops)] == ["after the link"]
    bob = await fresh(profiles, "bob")
    assert [r.text for r in groups.history(bob, ops)] == ["before the link", "after the link"]
