"""A server that adds a ghost member or a ghost device gets no room key, and members are warned."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bastion.client import group_keys, groups
from tests.conftest import Profiles, ServerProcess
from tests.group_chat.ghost_member_server import GHOST_ENV
from tests.group_chat.test_group_chat import fresh, group_texts, group_warnings
from tests.helpers import drain
from tests.malicious_server import SCRIPT, TAMPER_ENV

pytestmark = pytest.mark.network

GHOST_SCRIPT = [sys.executable, str(Path(__file__).resolve().parent / "ghost_member_server.py")]


async def test_ghost_member_gets_nothing_and_members_are_warned(
    tmp_path: Path,
    server_factory: Callable[..., ServerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(GHOST_ENV, "mallory")
    profiles = Profiles(tmp_path, server_factory(script=GHOST_SCRIPT))
    try:
        await profiles.register("bill")
        await profiles.befriend("alice", "bill")
        mallory = await fresh(profiles, "mallory")
        alice = await fresh(profiles, "alice")
        ops = await groups.create(alice, "ops", ["bill"])
        await groups.send_text(alice, ops, "secret plans")
        warned = group_warnings(alice.notices)
        assert any("mallory" in w and "no signed change" in w for w in warned)
        out = alice.profile.get("group-out:" + ops.group_id.hex(), group_keys.OutboundSession)
        assert out is not None
        assert "mallory" not in out.shared

        mallory_events = await drain(await profiles.online("mallory"))
        assert group_texts(mallory_events) == []
        assert (
            mallory.profile.get(
                "group-in:" + ops.group_id.hex() + ":alice:" + alice.account.device_id,
                groups.InboundSessions,
            )
            is None
        )
        bill = await fresh(profiles, "bill")
        assert [r.text for r in groups.history(bill, ops)] == ["secret plans"]
    finally:
        await profiles.close()


async def test_ghost_device_gets_no_room_key_and_members_are_warned(
    tmp_path: Path,
    server_factory: Callable[..., ServerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TAMPER_ENV, "ghost-device")
    profiles = Profiles(tmp_path, server_factory(script=SCRIPT))
    try:
        await profiles.register("bill")
        await profiles.befriend("alice", "bill")
        alice = await fresh(profiles, "alice")
        ops = await groups.create(alice, "ops", ["bill"])
        await groups.send_text(alice, ops, "secret plans")
        assert any("no valid certificate" in w for w in group_warnings(alice.notices))
        out = alice.profile.get("group-out:" + ops.group_id.hex(), group_keys.OutboundSession)
        assert out is not None
        bill = await fresh(profiles, "bill")
        assert out.shared["bill"] == [bill.account.device_id]
        assert [r.text for r in groups.history(bill, ops)] == ["secret plans"]
    finally:
        await profiles.close()
