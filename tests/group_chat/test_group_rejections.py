"""A rejected group message counts as a rejected message, as a rejected direct one does."""

from __future__ import annotations

import asyncio
import json

import pytest

from bastion.client import WarningEvent, groups
from bastion.protocol import frames
from tests.conftest import Profiles
from tests.group_chat.test_group_chat import fresh
from tests.test_cli import bastion

pytestmark = pytest.mark.network


async def test_rejected_group_messages_are_counted_in_rejected_messages(
    profiles: Profiles,
) -> None:
    await profiles.register("carol")
    await profiles.register("mallory")
    await profiles.befriend("alice", "carol")
    alice = await fresh(profiles, "alice")
    ops = await groups.create(alice, "ops", ["carol"])
    carol = await fresh(profiles, "carol")
    assert carol.stats().rejected == 0
    malformed = frames.Deliver(
        seq=10**12,
        sender="alice",
        sender_device=alice.account.device_id,
        server_ts=1,
        kind=frames.GROUP_KIND,
        body=b"\xc1",
    )
    outsider = frames.Deliver(
        seq=10**12 + 1,
        sender="mallory",
        sender_device="a" * 16,
        server_ts=2,
        kind=frames.GROUP_KIND,
        body=frames.encode_item(
            frames.GroupMessageItem(group_id=ops.group_id, ciphertext=b"not a member's")
        ),
    )
    for forged in (malformed, outsider):
        assert isinstance(await carol.process(forged), WarningEvent)
    assert carol.stats().rejected == 2
    await carol.close()
    shown = await asyncio.to_thread(
        bastion, "whoami", "--json", "--profile", str(profiles.path("carol"))
    )
    assert json.loads(shown.stdout)["rejected_messages"] == 2
