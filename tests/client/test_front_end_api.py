"""The small client API the front ends use instead of reaching into the connection or profile."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.client import Client, ContactRecord, receiving
from bastion.client.profile import Profile
from bastion.client.records import AccountInfo
from bastion.crypto.atrest import KdfParams
from tests.conftest import PASSPHRASE, Profiles, ServerProcess

# The weakest cost the profile accepts: keeps the tests fast, still Argon2id.
FAST = KdfParams(memory_kib=19 * 1024, iterations=2, lanes=1)


@pytest.fixture
def offline(tmp_path: Path) -> Iterator[Client]:
    """A client on a new profile that never connects."""
    profile = Profile.create(tmp_path / "profile", PASSPHRASE, params=FAST)
    account = AccountInfo(
        username="alice",
        server_url="wss://127.0.0.1:9",
        fingerprint="SHA256:" + "00" * 32,
        server_name="bastion.test",
        device_id="abcdefghijklmnop",
        created_at=1,
    )
    client = Client(profile, account)
    yield client
    profile.close()


def test_profile_exists_only_where_a_profile_was_made(offline: Client, tmp_path: Path) -> None:
    assert Client.profile_exists(tmp_path / "profile")
    assert not Client.profile_exists(tmp_path / "elsewhere")
    assert not Client.profile_exists(tmp_path)


def test_a_front_end_record_is_none_until_saved_then_reads_back(offline: Client) -> None:
    assert offline.front_end_record("chat:conversations", list[str]) is None
    offline.save_front_end_record("chat:conversations", ["bob", "carol"])
    assert offline.front_end_record("chat:conversations", list[str]) == ["bob", "carol"]


@pytest.mark.parametrize(
    "name", ["contact:bob", "stats", "chat", "chat:", ":conversations", "web:conversations"]
)
def test_a_front_end_cannot_name_a_record_of_the_library(offline: Client, name: str) -> None:
    bob = ContactRecord(user="bob", identity_key=b"\x01" * 32)
    with offline.profile.transaction():
        offline.profile.put("contact:bob", bob)
    with pytest.raises(ValueError, match="not a front end's record name"):
        offline.save_front_end_record(name, ContactRecord(user="bob", identity_key=b"\x02" * 32))
    with pytest.raises(ValueError, match="not a front end's record name"):
        offline.front_end_record(name, ContactRecord)
    assert offline.contact("bob") == bob


def test_receiving_elsewhere_while_another_holder_has_the_profile(offline: Client) -> None:
    assert not offline.receiving_elsewhere()
    held = receiving.hold(offline.profile.path)  # as a `bastion listen` in another process would
    assert held is not None
    try:
        assert offline.receiving_elsewhere()
    finally:
        os.close(held)
    assert not offline.receiving_elsewhere()


async def test_disconnect_on_a_client_that_never_connected_does_nothing(offline: Client) -> None:
    assert not offline.connected
    assert offline.close_reason is None
    await offline.disconnect()
    assert not offline.connected


# --- with a server -------------------------------------------------------------------------------


@pytest.mark.network
async def test_server_fingerprint_is_the_certificate_the_server_shows(
    server: ServerProcess,
) -> None:
    assert await Client.server_fingerprint(server.url) == server.fingerprint


@pytest.mark.network
async def test_disconnect_keeps_the_profile_open_for_the_next_connect(profiles: Profiles) -> None:
    alice = await profiles.online("alice", receive=False)
    assert alice.connected
    await alice.disconnect()
    assert not alice.connected
    assert alice.history("bob") == []  # the profile is still open
    await alice.connect(receive=False)
    assert alice.connected
    await alice.disconnect()
    await alice.disconnect()
    assert not alice.connected


@pytest.mark.network
async def test_message_is_the_stored_state_of_a_sent_message(profiles: Profiles) -> None:
    await profiles.befriend("alice", "bob")
    alice = await profiles.online("alice", receive=False)
    sent = await alice.send_text("bob", "hello")
    assert alice.message(sent.id) == sent
    assert alice.message(bytes(len(sent.id))) is None


@pytest.mark.network
async def test_close_reason_says_why_the_server_closed(
    profiles: Profiles, server: ServerProcess
) -> None:
    alice = await profiles.online("alice", receive=True)
    assert alice.close_reason is None
    server.stop()
    for _ in range(100):
        if alice.close_reason is not None:
            break
        await asyncio.sleep(0.05)
    assert alice.close_reason == "server shutting down"
    await alice.disconnect()
    assert alice.close_reason is None
