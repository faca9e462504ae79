"""Several devices per account, trust states and key changes, through a real server."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.client import (
    Client,
    DevicesChangedEvent,
    KeyChangedEvent,
    MessageEvent,
    devices,
    trust,
)
from bastion.errors import KeyChangedError, ServerRefusedError, StateError
from tests.conftest import PASSPHRASE, Profiles, ServerProcess
from tests.helpers import drain, next_events, texts

pytestmark = pytest.mark.network


async def link_second_device(profiles: Profiles, username: str, name: str) -> Client:
    """Link a new device to ``username`` (which must be online) and return it connected."""
    existing = await profiles.online(username, receive=False)
    codes: asyncio.Queue[str] = asyncio.Queue()
    offer = asyncio.create_task(devices.offer_link(existing, codes.put_nowait))
    code = await asyncio.wait_for(codes.get(), 10)
    new = await devices.join_with_code(
        profiles.path(name),
        PASSPHRASE,
        code=code,
        server_url=profiles.server.url,
        fingerprint=profiles.server.fingerprint,
    )
    linked = await asyncio.wait_for(offer, 10)
    assert linked.device_id == new.account.device_id
    profiles.clients.append(new)
    await new.connect()
    return new


async def test_linked_device_gets_messages_and_sent_copies_then_is_revoked(
    profiles: Profiles,
) -> None:
    bob = await profiles.online("bob", receive=False)
    alice1 = await profiles.online("alice", receive=False)
    await profiles.befriend("alice", "bob")
    alice2 = await link_second_device(profiles, "alice", "alice-laptop")
    assert alice2.account.username == "alice"
    listed = {d.device_id for d in await devices.list_devices(alice1)}
    assert listed == {alice1.account.device_id, alice2.account.device_id}

    assert texts(await drain(alice2)) == []
    await bob.send_text("alice", "to both of you")
    await alice2.send_text("bob", "from the laptop")

    assert texts(await next_events(alice2, 1)) == ["to both of you"]
    alice1_rx = await profiles.online("alice")
    events = await drain(alice1_rx)
    messages = [e for e in events if isinstance(e, MessageEvent)]
    assert [(m.record.sender, m.record.direction, m.record.text) for m in messages] == [
        ("bob", "in", "to both of you"),
        ("alice", "out", "from the laptop"),
    ]
    assert [r.text for r in alice1_rx.history("bob")] == ["to both of you", "from the laptop"]

    await devices.revoke_device(alice1, alice2.account.device_id)
    await asyncio.wait_for(alice2.connection().disconnected.wait(), 5)
    with pytest.raises(ServerRefusedError) as refused:
        await alice2.connect()
    assert refused.value.code == "auth_failed"

    audit = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bastion", "admin", "--data", str(profiles.server.data_dir),
         "audit", "show", "--json"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    records = [json.loads(line) for line in audit.stdout.splitlines()]
    added = [r for r in records if r["event"] == "device.added"]
    revoked = [r for r in records if r["event"] == "device.revoked"]
    assert [e["fields"]["device"] for e in added] == [alice2.account.device_id]
    assert [e["fields"]["device"] for e in revoked] == [alice2.account.device_id]

    await bob.send_text("alice", "only one device now")
    notices = [e for e in bob.notices if isinstance(e, DevicesChangedEvent)]
    assert notices
    assert notices[-1].removed == (alice2.account.device_id,)
    assert texts(await drain(await profiles.online("alice"))) == ["only one device now"]


async def test_link_code_is_single_use_and_sealed(profiles: Profiles) -> None:
    await profiles.online("alice", receive=False)
    with pytest.raises(ServerRefusedError) as unknown:
        await devices.join_with_code(
            profiles.path("stranger"),
            PASSPHRASE,
            code="AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AA",
            server_url=profiles.server.url,
            fingerprint=profiles.server.fingerprint,
        )
    assert unknown.value.code == "link_failed"
    with pytest.raises(ValueError, match="not valid"):
        await devices.join_with_code(
            profiles.path("stranger"),
            PASSPHRASE,
            code="not a code",
            server_url=profiles.server.url,
        )
    assert not (profiles.path("stranger") / "profile.json").exists()


async def test_safety_numbers_match_and_verification_shows_on_messages(
    profiles: Profiles,
) -> None:
    alice = await profiles.online("alice", receive=False)
    bob = await profiles.online("bob")
    await profiles.befriend("alice", "bob")
    ab = await trust.safety_number_with(alice, "bob")
    ba = await trust.safety_number_with(bob, "alice")
    assert ab.digits == ba.digits
    assert len(ab.digits) == 60

    trust.mark_verified(bob, "alice", ba)
    assert texts(await drain(bob)) == []
    await alice.send_text("bob", "verified hello")
    [event] = await next_events(bob, 1)
    assert isinstance(event, MessageEvent)
    assert event.verified is True


def replace_account_on_server(server: ServerProcess, username: str) -> None:
    """What a reinstall looks like to the server: the account is gone, the name is free."""
    with sqlite3.connect(server.data_dir / "bastion.db") as db:
        for table in ("one_time_keys", "queue", "devices", "accounts"):
            db.execute(f"DELETE FROM {table} WHERE username = ?", (username,))


async def test_changed_account_key_blocks_sending_until_accepted(
    profiles: Profiles, server: ServerProcess, tmp_path: Path
) -> None:
    alice = await profiles.online("alice", receive=False)
    bob = await profiles.online("bob", receive=False)
    await profiles.befriend("alice", "bob")
    await alice.send_text("bob", "before")
    number = await trust.safety_number_with(bob, "alice")
    trust.mark_verified(bob, "alice", number)
    await alice.close()

    server.stop()
    replace_account_on_server(server, "alice")
    server.start()
    await bob.close()

    new_alice = await Client.register(
        tmp_path / "alice-reinstalled",
        PASSPHRASE,
        username="alice",
        server_url=server.url,
        fingerprint=server.fingerprint,
    )
    profiles.clients.append(new_alice)
    await new_alice.connect(receive=False)
    await new_alice.send_text("bob", "after reinstall")

    bob = await profiles.online("bob")
    events = await drain(bob)
    assert [e for e in events if isinstance(e, KeyChangedEvent)] == [
        KeyChangedEvent(user="alice", at=events[-1].at)  # type: ignore[union-attr]
    ]
    assert texts(events) == ["before"] or texts(events) == []
    contact = bob.contact("alice")
    assert contact is not None
    assert contact.trust == "changed"
    with pytest.raises(KeyChangedError):
        await bob.send_text("alice", "are you really alice?")
    with pytest.raises(KeyChangedError):
        await trust.safety_number_with(bob, "alice")

    with pytest.raises(StateError, match="nothing was accepted"):
        trust.accept_new_key(bob, "alice", number.digits)  # the old key's number
    trust.accept_new_key(bob, "alice", trust.pending_safety_number(bob, "alice").digits)
    contact = bob.contact("alice")
    assert contact is not None
    assert contact.trust == "unverified"
    with pytest.raises(StateError):
        trust.accept_new_key(bob, "alice", number.digits)
    await bob.close()

    # The message that waited on the server is delivered now, unverified.
    bob = await profiles.online("bob")
    received = [e for e in await drain(bob) if isinstance(e, MessageEvent)]
    assert [(e.record.text, e.verified) for e in received] == [("after reinstall", False)]
    await bob.send_text("alice", "welcome back")


async def test_export_and_import_make_a_new_device_of_the_same_account(
    profiles: Profiles, tmp_path: Path
) -> None:
    alice = await profiles.online("alice", receive=False)
    bob = await profiles.online("bob", receive=False)
    await profiles.befriend("alice", "bob")
    export = tmp_path / "alice.export"
    devices.export_account(alice, export, "export secret")
    assert export.stat().st_mode & 0o777 == 0o600
    assert b"alice" not in export.read_bytes().replace(b"bastion_account_export", b"")

    with pytest.raises(Exception, match="wrong passphrase"):
        await devices.import_account(export, "guess", tmp_path / "nope", PASSPHRASE)
    imported = await devices.import_account(
        export, "export secret", tmp_path / "alice-new", PASSPHRASE
    )
    profiles.clients.append(imported)
    assert imported.account.username == "alice"
    assert imported.account.device_id != alice.account.device_id
    assert imported.identity().public_bytes == alice.identity().public_bytes

    await bob.send_text("alice", "hello both")
    await imported.connect()
    assert texts(await drain(imported)) == ["hello both"]


async def test_queued_message_is_never_re_encrypted_to_a_new_key(
    profiles: Profiles, server: ServerProcess, tmp_path: Path
) -> None:
    alice = await profiles.online("alice", receive=False)
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    await alice.send_text("bob", "hello")
    # A message encrypted for bob's current device sits in alice's outbox, unsent.
    old_devices = await alice.devices_of("bob")
    record = alice.history("bob")[-1]
    frame, _ = alice._encrypt(
        b"q" * 16, "bob", "text", "for the old bob", [("bob", d) for d in old_devices]
    )
    await alice.close()

    server.stop()
    replace_account_on_server(server, "bob")
    server.start()
    new_bob = await Client.register(
        tmp_path / "bob-reinstalled",
        PASSPHRASE,
        username="bob",
        server_url=server.url,
        fingerprint=server.fingerprint,
    )
    profiles.clients.append(new_bob)

    alice = await profiles.online("alice", receive=False)
    assert [r.text for r in alice.failed] == ["for the old bob"]
    assert alice.profile.outgoing() == []
    states = {r.text: r.state for r in alice.history("bob")}
    assert states == {"hello": "sent", "for the old bob": "failed"}
    await new_bob.connect()
    assert texts(await drain(new_bob)) == []
    del frame, record
