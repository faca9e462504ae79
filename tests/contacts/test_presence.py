"""Presence through a real server: only accepted contacts learn anything, status stays E2E."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bastion.client import Client, contacts, presence
from bastion.client.presence import PresenceEvent
from bastion.protocol import frames
from tests.conftest import Profiles, ServerProcess
from tests.contacts.support import events_within, next_of, watching
from tests.malicious_server import RECORD_ENV, SCRIPT, TAMPER_ENV, read_record
from tests.test_canary import find_in_bytes, find_in_files, new_canary
from tests.test_devices import link_second_device

pytestmark = pytest.mark.network


async def presence_of(client: Client, user: str) -> tuple[str, str | None]:
    event = await next_of(client, PresenceEvent)
    assert isinstance(event, PresenceEvent)
    assert event.user == user
    return event.state, event.status


async def test_bill_sees_alice_online_away_invisible_and_offline(profiles: Profiles) -> None:
    await profiles.befriend("alice", "bill")
    bill = await profiles.online("bill")
    snapshot = await presence.watch(bill)
    assert [(e.user, e.state) for e in snapshot] == [("alice", "offline")]

    alice = await profiles.online("alice")  # a receiving connection: online
    assert await presence_of(bill, "alice") == ("online", None)

    assert await presence.set_presence(alice, "away", "at lunch until 2") == []
    assert await presence_of(bill, "alice") == ("away", "at lunch until 2")
    event = next(e for e in presence.current(bill) if e.user == "alice")
    assert event.to_json()["state"] == "away"
    assert event.to_json()["status"] == "at lunch until 2"

    await presence.set_presence(alice, "invisible")
    assert await presence_of(bill, "alice") == ("offline", None)
    await presence.set_presence(alice, "busy", "in a meeting")
    # Visible again: the server says online (with the last status heard), then the E2E update.
    assert await presence_of(bill, "alice") == ("away", "at lunch until 2")
    assert await presence_of(bill, "alice") == ("busy", "in a meeting")

    await alice.close()
    assert await presence_of(bill, "alice") == ("offline", None)
    assert [(c.user, c.presence) for c in contacts.local_contacts(bill)] == [("alice", "offline")]


async def test_online_while_any_device_is_connected(profiles: Profiles) -> None:
    await profiles.befriend("alice", "bill")
    bill = await watching(profiles, "bill")
    first = await profiles.online("alice")
    assert await presence_of(bill, "alice") == ("online", None)
    laptop = await link_second_device(profiles, "alice", "alice-laptop")
    await laptop.connect()
    await first.close()
    assert await events_within(bill, 1.0) == []  # the laptop keeps Alice online
    await laptop.close()
    assert await presence_of(bill, "alice") == ("offline", None)


async def test_a_stranger_and_a_removed_contact_learn_nothing(profiles: Profiles) -> None:
    await profiles.befriend("alice", "bill")
    await profiles.befriend("alice", "dave")
    stranger = await watching(profiles, "mallory")
    dave = await watching(profiles, "dave")
    alice = await profiles.online("alice", receive=False)
    assert await contacts.act(alice, "dave", "remove") == "none"
    await alice.close()

    alice = await profiles.online("alice")
    await presence.set_presence(alice, "away", "do not tell dave")
    await presence.set_presence(alice, "online")
    await alice.close()

    for outsider in (stranger, dave):
        events = await events_within(outsider, 1.5)
        assert [e for e in events if isinstance(e, PresenceEvent)] == []
        assert [c.user for c in await contacts.sync(outsider)] == []
        assert [e.user for e in await presence.watch(outsider)] == []


async def test_status_text_never_reaches_the_server(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path
    monkeypatch.setenv(TAMPER_ENV, "record")
    monkeypatch.setenv(RECORD_ENV, str(root / "frames.txt"))
    server = server_factory("server", script=SCRIPT)
    profiles = Profiles(root, server)
    try:
        canary, note = new_canary(), new_canary()
        bill = await watching(profiles, "bill")
        alice = await profiles.online("alice")
        await contacts.request(alice, "bill", f"note {note}")
        await contacts.act(bill, "alice", "accept")
        await presence.set_presence(alice, "busy", f"status {canary}")
        while (await presence_of(bill, "alice"))[1] != f"status {canary}":
            pass
        record = read_record(root / "frames.txt")
        sent = [frames.decode_client_frame(d) for way, d in record if way == "in"]
        assert any(isinstance(f, frames.PresenceVisibility) for f in sent), "not recorded"
        wire = b"".join(data for _, data in record)
        await profiles.close()
        assert server.stop() == 0
        server.proc = None
        for secret in (canary, note):
            assert find_in_bytes(wire, secret) == []
            assert find_in_files([server.data_dir, server.log_path], secret) == []
            assert find_in_bytes(server.stdout, secret) == []
    finally:
        await profiles.close()
