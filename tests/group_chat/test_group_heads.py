"""A lying server cannot get a room key, hide a removal, fork a chain or stall a sync unnoticed."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from bastion.client import Client, WarningEvent, group_keys, groups
from bastion.errors import StateError
from bastion.groups import chain
from bastion.protocol import frames
from tests.conftest import Profiles, ServerProcess
from tests.group_chat.lying_chain_server import (
    ENDLESS_ENV,
    FORK_FILE_ENV,
    FORK_USERS_ENV,
    WITHHOLD_ENV,
)
from tests.group_chat.test_group_chat import fresh, group_texts, group_warnings
from tests.helpers import drain
from tests.malicious_server import LIE_ABOUT_ENV, RECORD_ENV, SCRIPT, TAMPER_ENV, read_record

pytestmark = pytest.mark.network

LYING_CHAIN = [sys.executable, str(Path(__file__).resolve().parent / "lying_chain_server.py")]


def _inbound(client: Client, group: chain.GroupState, sender: Client) -> int:
    held = client.profile.get(
        f"group-in:{group.group_id.hex()}:{sender.account.username}:{sender.account.device_id}",
        groups.InboundSessions,
    )
    return 0 if held is None else len(held.sessions)


async def test_a_second_key_directory_answer_gets_no_room_key(
    tmp_path: Path,
    server_factory: Callable[..., ServerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = tmp_path / "frames.log"
    monkeypatch.setenv(TAMPER_ENV, "second-key-answer")
    monkeypatch.setenv(LIE_ABOUT_ENV, "bob")
    monkeypatch.setenv(RECORD_ENV, str(record))
    profiles = Profiles(tmp_path, server_factory(script=SCRIPT))
    try:
        bob = await profiles.register("bob")
        for name in ("alice", "bob"):
            await profiles.befriend("carol", name)  # contacts: they join at once
        alice = await fresh(profiles, "alice")
        carol = await fresh(profiles, "carol")
        # Carol adds Alice and Bob: Alice has never looked Bob up before she sends.
        ops = await groups.create(carol, "ops", ["alice", "bob"])
        await groups.send_text(alice, ops, "secret plans")
        real = {c.account.device_id for c in (alice, bob, carol)}
        for direction, data in read_record(record):
            if direction != "in":
                continue
            frame = frames.decode_client_frame(data)
            if isinstance(frame, frames.Send):
                assert {c.device_id for c in frame.ciphertexts} <= real, "a key left for a ghost"
        bob_rx = await fresh(profiles, "bob")
        assert [r.text for r in groups.history(bob_rx, ops)] == ["secret plans"]

        # The next send sees the server's other key for Bob: a warning, and Bob is held as changed.
        alice.notices.clear()
        await groups.send_text(alice, ops, "more plans")
        assert any("another account key for bob" in w for w in group_warnings(alice.notices))
        pinned = alice.contact("bob")
        assert pinned is not None
        assert (pinned.identity_key, pinned.trust) == (bob.identity().public_bytes, "changed")
    finally:
        await profiles.close()


async def test_a_withheld_removal_stops_sending_before_a_key_is_shared(
    tmp_path: Path,
    server_factory: Callable[..., ServerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(WITHHOLD_ENV, "bob:1")  # Bob never learns of change 1 onwards
    profiles = Profiles(tmp_path, server_factory(script=LYING_CHAIN))
    try:
        await profiles.register("bob")
        await profiles.register("xavier")
        for name in ("bob", "xavier"):
            await profiles.befriend("alice", name)  # contacts: they join at once
        alice = await fresh(profiles, "alice")
        ops = await groups.create(alice, "ops", ["bob", "xavier"])
        bob = await fresh(profiles, "bob")
        await groups.send_text(bob, ops, "before")
        xavier = await fresh(profiles, "xavier")
        assert _inbound(xavier, ops, bob) == 1

        ops = await groups.change(alice, ops, chain.RemoveMember(user="xavier"))
        await groups.send_text(alice, ops, "xavier is out")
        bob = await profiles.online("bob")
        events = await drain(bob)
        assert group_texts(events) == []
        refused = [e.reason for e in events if isinstance(e, WarningEvent)]
        assert any("position 1" in r and "could not verify" in r for r in refused)
        with pytest.raises(StateError, match="alice named position 1"):
            await groups.send_text(bob, ops, "after")
        await drain(await profiles.online("xavier"))
        assert _inbound(xavier, ops, bob) == 1  # no new key from Bob reached Xavier
    finally:
        await profiles.close()


async def test_a_fork_by_a_removed_admin_is_reported_and_refused_until_settled(
    tmp_path: Path,
    server_factory: Callable[..., ServerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fork_file = tmp_path / "fork.bin"
    monkeypatch.setenv(FORK_FILE_ENV, str(fork_file))
    monkeypatch.setenv(FORK_USERS_ENV, "carol")
    profiles = Profiles(tmp_path, server_factory(script=LYING_CHAIN))
    try:
        for name in ("bob", "carol", "mallory"):
            await profiles.register(name)
            await profiles.befriend("alice", name)  # contacts: they join at once
        eve = await profiles.register("eve")
        alice = await fresh(profiles, "alice")
        ops = await groups.create(alice, "ops", ["bob", "carol", "mallory"])
        ops = await groups.change(alice, ops, chain.Promote(user="mallory"))
        carol = await fresh(profiles, "carol")
        mallory = await fresh(profiles, "mallory")
        at_one = groups.state_of(mallory, ops.group_id)
        assert at_one is not None
        assert at_one.seq == 1
        # Mallory signs a change at the position where Alice removes her; the server shows it
        # to Carol instead of the removal.
        forged = chain.make_change(
            mallory.identity(),
            at_one,
            "mallory",
            chain.AddMember(user="eve", key=eve.identity().public_bytes),
            now=1_800_000_000,
        )
        fork_file.write_bytes(chain.encode_change(forged))
        ops = await groups.change(alice, ops, chain.RemoveMember(user="mallory"))
        await groups.send_text(alice, ops, "mallory is out")

        carol = await profiles.online("carol")
        events = await drain(carol)
        assert group_texts(events) == []
        assert any("fork" in w for w in group_warnings(events))
        with pytest.raises(StateError, match="forked at position 2"):
            await groups.send_text(carol, ops, "hello")

        # Once the server shows Carol the real change, the rule settles the fork: Mallory signed
        # at the position of her own removal, so her change is void and Eve is no member.
        fork_file.unlink()
        carol.notices.clear()
        await groups.send_text(carol, ops, "hello")
        assert any("fork settled" in w for w in group_warnings(carol.notices))
        settled = groups.state_of(carol, ops.group_id)
        assert settled is not None
        assert sorted(settled.members) == ["alice", "bob", "carol"]
        assert settled.state_hash == ops.state_hash
        eve_rx = await fresh(profiles, "eve")
        assert groups.state_of(eve_rx, ops.group_id) is None
    finally:
        await profiles.close()


async def test_a_sync_that_never_ends_is_bounded_and_stops_sending(
    tmp_path: Path,
    server_factory: Callable[..., ServerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENDLESS_ENV, "1")
    profiles = Profiles(tmp_path, server_factory(script=LYING_CHAIN))
    try:
        await profiles.register("bob")
        await profiles.befriend("alice", "bob")
        alice = await fresh(profiles, "alice")
        ops = await groups.create(alice, "ops", ["bob"])
        with pytest.raises(StateError, match="goes on but sends no further change"):
            await asyncio.wait_for(groups.send_text(alice, ops, "hello"), 60)
    finally:
        await profiles.close()


async def test_room_keys_for_unknown_groups_are_capped(profiles: Profiles) -> None:
    await profiles.befriend("alice", "bob")
    alice = await fresh(profiles, "alice")
    sent = []
    for n in range(groups.MAX_UNKNOWN_GROUP_KEYS_PER_SENDER + 2):
        out = group_keys.new_outbound(bytes([n]) * 32, alice.profile.pickle_key, 1)
        key = group_keys.room_key(out, alice.profile.pickle_key, chain_seq=0, chain_hash=bytes(32))
        await alice.send_payload(
            "bob", group_keys.ROOM_KEY_KIND, msgspec.json.encode(key).decode(), history=False
        )
        sent.append(out.group_id)
    bob = await profiles.online("bob")
    events = await drain(bob)
    refused = [
        e for e in events if isinstance(e, WarningEvent) and "too many room keys" in e.reason
    ]
    assert len(refused) == 2
    held = [
        group_id
        for group_id in sent
        if bob.profile.get(
            f"group-in:{group_id.hex()}:alice:{alice.account.device_id}", groups.InboundSessions
        )
        is not None
    ]
    assert held == sent[: groups.MAX_UNKNOWN_GROUP_KEYS_PER_SENDER]


async def test_a_rejected_change_stops_sending_with_the_reason(
    tmp_path: Path,
    server_factory: Callable[..., ServerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fork_file = tmp_path / "forged.bin"
    monkeypatch.setenv(FORK_FILE_ENV, str(fork_file))
    monkeypatch.setenv(FORK_USERS_ENV, "carol")
    profiles = Profiles(tmp_path, server_factory(script=LYING_CHAIN))
    try:
        await profiles.register("carol")
        bob = await profiles.register("bob")
        for name in ("bob", "carol"):
            await profiles.befriend("alice", name)  # contacts: they join at once
        alice = await fresh(profiles, "alice")
        ops = await groups.create(alice, "ops", ["bob", "carol"])
        # Bob is no admin: the change the server shows Carol breaks the rules.
        forged = chain.make_change(
            bob.identity(), ops, "bob", chain.Rename(name="bob's now"), now=1_800_000_000
        )
        fork_file.write_bytes(chain.encode_change(forged))
        ops = await groups.change(alice, ops, chain.Rename(name="ops-2"))
        carol = await fresh(profiles, "carol")
        with pytest.raises(StateError, match=r"could not be verified .*only an admin"):
            await groups.send_text(carol, ops, "hello")
        fork_file.unlink()
        await groups.send_text(carol, ops, "hello")
        state = groups.state_of(carol, ops.group_id)
        assert state is not None
        assert state.name == "ops-2"
    finally:
        await profiles.close()
