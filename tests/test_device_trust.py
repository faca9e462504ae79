"""What a user is told about devices and keys, and what a lying server cannot slip past.

Real server processes and real profiles; the ``bastion`` command runs as a user runs it.
A hostile server is played by editing the server's database between runs (what an
operator who wants to keep a revoked device, or roll back a device list, would do)
and by a TLS interceptor with its own certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import sqlite3
import ssl
from pathlib import Path

import msgspec
import pytest

from bastion.cli._common import event_json
from bastion.client import Client, DevicesChangedEvent, devices, trust
from bastion.crypto.device import SignedDeviceList
from bastion.crypto.safety import safety_number
from bastion.crypto.signing import AccountIdentity
from bastion.errors import BastionError, ServerRefusedError
from bastion.protocol import frames
from bastion.server.net.tls import ensure_certificate, server_context
from bastion.tlsprofile import pinning_client_context
from tests.conftest import PASSPHRASE, Profiles, ServerProcess, free_port
from tests.helpers import next_events, texts
from tests.test_cli import bastion, befriend, register
from tests.test_devices import link_second_device, replace_account_on_server

pytestmark = pytest.mark.network

DB = "bastion.db"


def _import_with_stolen_key(profile: Path, tmp_path: Path, name: str) -> Client:
    """Someone who holds the account key (here: an export of it) adds their own device."""
    export = tmp_path / f"{name}.export"

    async def run() -> Client:
        owner = Client.open(profile, PASSPHRASE)
        try:
            devices.export_account(owner, export, "stolen")
        finally:
            await owner.close()
        return await devices.import_account(export, "stolen", tmp_path / name, PASSPHRASE)

    return asyncio.run(run())


def test_device_added_with_the_account_key_is_announced_on_the_next_send(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = register(server, "alice", tmp_path)
    bob = register(server, "bob", tmp_path)
    befriend(alice, "alice", bob, "bob")
    quiet = bastion("send", "bob", "first", "--profile", str(alice))
    assert "device" not in quiet.stderr

    thief = _import_with_stolen_key(alice, tmp_path, "thief")
    stolen_device = thief.account.device_id
    asyncio.run(thief.close())

    sent = bastion("send", "bob", "second", "--profile", str(alice))
    assert "a new device was added to YOUR account" in sent.stderr
    assert stolen_device in sent.stderr
    assert "(certified 20" in sent.stderr
    assert f"bastion devices revoke {stolen_device}" in sent.stderr
    assert f"bastion register NEW_NAME --server {server.url}" in sent.stderr
    # Said once: the next command has nothing new to report.
    again = bastion("send", "bob", "third", "--profile", str(alice))
    assert stolen_device not in again.stderr


def test_a_contacts_new_device_is_printed_on_the_next_send_to_them(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = register(server, "alice", tmp_path)
    bob = register(server, "bob", tmp_path)
    befriend(alice, "alice", bob, "bob")
    bastion("send", "bob", "before", "--profile", str(alice))

    laptop = _import_with_stolen_key(bob, tmp_path, "bob-laptop")
    new_device = laptop.account.device_id
    asyncio.run(laptop.close())

    sent = bastion("send", "bob", "after", "--profile", str(alice))
    [line] = [x for x in sent.stderr.splitlines() if new_device in x]
    assert line.startswith("warning: bob's devices changed: new device " + new_device)
    assert "(certified 20" in line
    assert "YOUR account" not in sent.stderr

    as_json = bastion("send", "alice", "json", "--profile", str(bob), "--json")
    [event] = [json.loads(x) for x in as_json.stderr.splitlines() if "devices_changed" in x]
    assert event["own_account"] is True
    assert event["added"] == [new_device]
    assert len(event["certified_at"]) == 1


async def test_a_linked_device_is_reported_to_contacts_not_to_the_linking_device(
    profiles: Profiles,
) -> None:
    alice = await profiles.online("alice", receive=False)
    bob = await profiles.online("bob", receive=False)
    await profiles.befriend("alice", "bob")
    await bob.send_text("alice", "hello")
    await link_second_device(profiles, "alice", "alice-laptop")
    await bob.send_text("alice", "hello again")
    [change] = [e for e in bob.notices if isinstance(e, DevicesChangedEvent)]
    assert change.user == "alice"
    assert len(change.added) == len(change.certified_at) == 1
    assert change.own_account is False
    # The device that linked the new one knows about it and is not alarmed.
    await alice.send_text("bob", "from the phone")
    assert not [e for e in alice.notices if isinstance(e, DevicesChangedEvent)]


def test_a_changed_key_shows_its_safety_number_and_only_that_key_is_accepted(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = register(server, "alice", tmp_path)
    bob = register(server, "bob", tmp_path)
    befriend(alice, "alice", bob, "bob")
    bastion("send", "bob", "before", "--profile", str(alice))
    bastion("inbox", "--profile", str(bob))
    old_number = json.loads(bastion("verify", "alice", "--json", "--profile", str(bob)).stdout)

    server.stop()
    replace_account_on_server(server, "alice")
    server.start()
    new_alice = register(server, "alice", tmp_path / "reinstalled")
    refused = bastion("send", "alice", "who are you?", "--profile", str(bob), check=False)
    assert refused.returncode == 1
    assert "bastion verify alice" in refused.stderr

    async def keys() -> tuple[bytes, bytes]:
        b = Client.open(bob, PASSPHRASE)
        a = Client.open(new_alice, PASSPHRASE)
        try:
            return b.identity().public_bytes, a.identity().public_bytes
        finally:
            await a.close()
            await b.close()

    bob_key, new_alice_key = asyncio.run(keys())
    expected = safety_number("bob", bob_key, "alice", new_alice_key)
    shown = bastion("verify", "alice", "--profile", str(bob))
    assert "CHANGED" in shown.stdout
    assert str(expected) in shown.stdout
    fingerprint = trust.key_fingerprint(new_alice_key)
    assert f"--accept-new-key {fingerprint}" in shown.stdout
    shown_json = json.loads(bastion("verify", "alice", "--json", "--profile", str(bob)).stdout)
    assert shown_json["safety_number"] == " ".join(expected.groups)
    assert shown_json["safety_number"] != old_number["safety_number"]
    assert shown_json["trust"] == "changed"

    # A number for another key (the old one, or one digit off) is refused; nothing changes.
    wrong_digit = expected.digits[:-1] + str((int(expected.digits[-1]) + 1) % 10)
    for wrong in (old_number["safety_number"], wrong_digit, "0000-0000-0000-0000-0000"):
        no = bastion(
            "trust", "alice", "--accept-new-key", wrong, "--profile", str(bob), check=False
        )
        assert no.returncode == 1
        assert "nothing was accepted" in no.stderr
    still = json.loads(bastion("verify", "alice", "--json", "--profile", str(bob)).stdout)
    assert still["trust"] == "changed"

    ok = bastion("trust", "alice", "--accept-new-key", *expected.groups, "--profile", str(bob))
    assert "accepted alice's new account key" in ok.stdout
    now = json.loads(bastion("verify", "alice", "--json", "--profile", str(bob)).stdout)
    assert (now["trust"], now["safety_number"]) == ("unverified", " ".join(expected.groups))


async def test_accepting_refuses_a_key_other_than_the_one_displayed(
    profiles: Profiles, server: ServerProcess, tmp_path: Path
) -> None:
    """The server swaps the key again after the user compared: the compared number fails."""
    bob = await profiles.online("bob", receive=False)
    await profiles.register("alice")
    await profiles.befriend("alice", "bob")
    await bob.devices_of("alice")
    await bob.close()
    shown = None
    for round_ in range(2):
        server.stop()
        replace_account_on_server(server, "alice")
        server.start()
        impostor = await Client.register(
            tmp_path / f"alice-{round_}",
            PASSPHRASE,
            username="alice",
            server_url=server.url,
            fingerprint=server.fingerprint,
        )
        await impostor.close()
        bob = await profiles.online("bob", receive=False)
        with contextlib.suppress(BastionError):
            await bob.devices_of("alice")
        if shown is None:
            shown = trust.pending_safety_number(bob, "alice")
            await bob.close()
    assert shown is not None
    with pytest.raises(BastionError, match="nothing was accepted"):
        trust.accept_new_key(bob, "alice", shown.digits)
    contact = bob.contact("alice")
    assert contact is not None
    assert contact.trust == "changed"
    current = trust.pending_safety_number(bob, "alice")
    trust.accept_new_key(bob, "alice", str(current))
    contact = bob.contact("alice")
    assert contact is not None
    assert contact.trust == "unverified"


def _device_row(server: ServerProcess, device_id: str) -> tuple[object, ...]:
    with contextlib.closing(sqlite3.connect(server.data_dir / DB)) as db:
        row = db.execute(
            "SELECT username, device_id, ed25519, curve25519, created_at, certificate"
            " FROM devices WHERE device_id = ?",
            (device_id,),
        ).fetchone()
    assert row is not None
    return tuple(row)


async def _refusal(client: Client, user: str) -> tuple[list[str], str]:
    """What ``client`` accepts as ``user``'s devices now, or the sentence it refused with."""
    try:
        return [d.device_id for d in await client.devices_of(user)], ""
    except BastionError as exc:
        return [], str(exc)


async def test_a_revoked_device_the_server_keeps_listing_is_refused(
    profiles: Profiles, server: ServerProcess
) -> None:
    alice = await profiles.online("alice", receive=False)
    bob = await profiles.online("bob", receive=False)
    await profiles.befriend("alice", "bob")
    laptop = await link_second_device(profiles, "alice", "alice-laptop")
    revoked = laptop.account.device_id
    await bob.send_text("alice", "to both")
    row = _device_row(server, revoked)
    await devices.revoke_device(alice, revoked)
    await bob.send_text("alice", "to one")

    # The operator puts the revoked device back: its certificate is still valid.
    await asyncio.gather(*(c.close() for c in (alice, bob, laptop)))
    server.stop()
    with contextlib.closing(sqlite3.connect(server.data_dir / DB)) as db, db:
        db.execute(
            "INSERT INTO devices (username, device_id, ed25519, curve25519, created_at,"
            " certificate) VALUES (?, ?, ?, ?, ?, ?)",
            row,
        )
    server.start()

    bob = await profiles.online("bob", receive=False)
    accepted, refused = await _refusal(bob, "alice")
    assert revoked not in accepted
    assert f"lists device {revoked} for alice" in refused
    assert "signed device list" in refused
    with pytest.raises(BastionError, match="revoked device"):
        await bob.send_text("alice", "is the laptop listening?")
    # Alice's own device refuses it too.
    alice = await profiles.online("alice", receive=False)
    with pytest.raises(BastionError, match="signed device list"):
        await alice.send_text("bob", "hi")


async def test_an_older_signed_device_list_is_refused_as_a_rollback(
    profiles: Profiles, server: ServerProcess
) -> None:
    alice = await profiles.online("alice", receive=False)
    bob = await profiles.online("bob", receive=False)
    await profiles.befriend("alice", "bob")
    laptop = await link_second_device(profiles, "alice", "alice-laptop")
    revoked = laptop.account.device_id
    await bob.send_text("alice", "to both")  # bob pins the list that names the laptop
    with contextlib.closing(sqlite3.connect(server.data_dir / DB)) as db:
        old_list = db.execute(
            "SELECT version, device_ids, signature FROM device_lists WHERE username = 'alice'"
        ).fetchone()
        row = _device_row(server, revoked)
    assert revoked in old_list[1]
    await devices.revoke_device(alice, revoked)
    await bob.send_text("alice", "to one")  # bob pins the newer list

    # The operator restores the older list (it names the laptop) and the laptop itself.
    await asyncio.gather(*(c.close() for c in (alice, bob, laptop)))
    server.stop()
    with contextlib.closing(sqlite3.connect(server.data_dir / DB)) as db, db:
        db.execute(
            "UPDATE device_lists SET version = ?, device_ids = ?, signature = ?"
            " WHERE username = 'alice'",
            old_list,
        )
        db.execute(
            "INSERT INTO devices (username, device_id, ed25519, curve25519, created_at,"
            " certificate) VALUES (?, ?, ?, ?, ?, ?)",
            row,
        )
    server.start()

    bob = await profiles.online("bob", receive=False)
    accepted, refused = await _refusal(bob, "alice")
    assert revoked not in accepted
    assert f"older device list for alice (version {old_list[0]}" in refused
    assert "rollback" in refused

    # Withholding the list altogether is refused as well, once a list was seen.
    await bob.close()
    server.stop()
    with contextlib.closing(sqlite3.connect(server.data_dir / DB)) as db, db:
        db.execute("DELETE FROM device_lists WHERE username = 'alice'")
    server.start()
    bob = await profiles.online("bob", receive=False)
    _, withheld = await _refusal(bob, "alice")
    assert "withholds alice's signed device list" in withheld


async def test_an_account_without_a_list_publishes_one_on_its_next_look(
    profiles: Profiles, server: ServerProcess
) -> None:
    """Accounts from before signed lists: used as before, and listed from then on."""
    alice = await profiles.online("alice", receive=False)
    bob = await profiles.online("bob", receive=False)
    await profiles.befriend("alice", "bob")
    await asyncio.gather(alice.close(), bob.close())
    server.stop()
    with contextlib.closing(sqlite3.connect(server.data_dir / DB)) as db, db:
        db.execute("DELETE FROM device_lists")
    server.start()
    bob = await profiles.online("bob", receive=False)
    alice = await profiles.online("alice", receive=False)
    for client in (alice, bob):  # profiles from before lists pinned no version
        for name in ("alice", "bob"):
            record = client.contact(name)
            if record is not None:
                with client.profile.transaction():
                    client.profile.put(
                        "contact:" + name,
                        msgspec.structs.replace(record, device_list_version=0, listed_devices=[]),
                    )
    await bob.send_text("alice", "still works")  # alice has no list yet: used as before
    record = bob.contact("alice")
    assert record is not None
    assert record.device_list_version == 0
    await alice.send_text("bob", "and now listed")  # alice's own look publishes version 1
    await bob.devices_of("alice")
    record = bob.contact("alice")
    assert record is not None
    assert record.device_list_version == 1
    assert record.listed_devices == [alice.account.device_id]


async def test_an_invalid_name_fails_at_once_instead_of_waiting(profiles: Profiles) -> None:
    alice = await profiles.online("alice", receive=False)
    with pytest.raises(ValueError, match="not a valid username"):
        await asyncio.wait_for(alice.devices_of("Not A Name"), 5)
    with pytest.raises(ValueError, match="not a valid username"):
        await asyncio.wait_for(trust.safety_number_with(alice, "x"), 5)
    # Any request the strict schema refuses fails unsent, with the reason.
    conn = alice.connection()
    req = conn.next_req()
    with pytest.raises(ValueError, match="the server would refuse it: invalid frame"):
        await asyncio.wait_for(conn.request(frames.ClaimKeys(req=req, user="B@D"), req), 5)
    assert [d.device_id for d in await alice.devices_of("alice")] == [alice.account.device_id]


async def test_listening_reports_a_new_device_before_its_first_message(
    profiles: Profiles,
) -> None:
    await profiles.online("alice", receive=False)
    bob = await profiles.online("bob", receive=False)
    await profiles.befriend("alice", "bob")
    await bob.send_text("alice", "hello")
    laptop = await link_second_device(profiles, "alice", "alice-laptop")
    await laptop.send_text("bob", "from my new laptop")
    await bob.close()
    bob = await profiles.online("bob")
    events = await next_events(bob, 2)
    change, message = events
    assert isinstance(change, DevicesChangedEvent)
    assert (change.user, change.added) == ("alice", (laptop.account.device_id,))
    assert texts([message]) == ["from my new laptop"]
    as_json = event_json(change)
    assert as_json["type"] == "devices_changed"
    assert as_json["added"] == [laptop.account.device_id]
    assert as_json["own_account"] is False
    assert len(as_json["certified_at"]) == 1


class TlsInterceptor:
    """A machine in the middle with its own certificate, passing bytes to the real server."""

    def __init__(self, data_dir: Path, upstream_port: int) -> None:
        data_dir.mkdir(parents=True)
        ensure_certificate(data_dir, ["127.0.0.1"], now=datetime.datetime.now(datetime.UTC))
        self.context = server_context(data_dir)
        self.upstream_port = upstream_port
        self.port = free_port()
        self.url = f"wss://127.0.0.1:{self.port}"
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> TlsInterceptor:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, ssl=self.context
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        upstream: ssl.SSLContext = pinning_client_context()
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", self.upstream_port, ssl=upstream
        )
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            dst.close()


async def _link(profiles: Profiles, name: str, url: str) -> Client:
    existing = await profiles.online("alice", receive=False)
    codes: asyncio.Queue[str] = asyncio.Queue()
    offer = asyncio.create_task(devices.offer_link(existing, codes.put_nowait))
    code = await asyncio.wait_for(codes.get(), 10)
    try:
        return await devices.join_with_code(
            profiles.path(name), PASSPHRASE, code=code, server_url=url
        )
    finally:
        offer.cancel()
        with contextlib.suppress(BaseException):
            await offer


async def test_link_without_fingerprint_pins_the_server_of_the_other_device(
    profiles: Profiles, server: ServerProcess, tmp_path: Path
) -> None:
    await profiles.online("alice", receive=False)
    async with TlsInterceptor(tmp_path / "mitm", server.port) as mitm:
        with pytest.raises(BastionError, match="someone may be intercepting") as refused:
            await _link(profiles, "alice-intercepted", mitm.url)
        assert mitm.connections == 1
    assert server.fingerprint in str(refused.value)
    assert not (profiles.path("alice-intercepted") / "profile.json").exists()

    laptop = await _link(profiles, "alice-laptop", server.url)
    profiles.clients.append(laptop)
    assert laptop.account.fingerprint == server.fingerprint
    await laptop.connect()


async def test_the_server_stores_only_newer_lists_signed_by_the_account(
    profiles: Profiles,
) -> None:
    alice = await profiles.online("alice", receive=False)
    conn = alice.connection()
    me = alice.account.device_id

    async def publish(identity: AccountIdentity, version: int) -> str:
        signed = SignedDeviceList.issue(
            identity, username="alice", version=version, device_ids=[me]
        )
        req = conn.next_req()
        wire = frames.DeviceList(
            version=version, device_ids=list(signed.device_ids), signature=signed.signature
        )
        try:
            await conn.request(frames.PublishDeviceList(req=req, device_list=wire), req)
        except ServerRefusedError as exc:
            return exc.code
        return "ok"

    assert await publish(AccountIdentity.generate(), 9) == "bad_device_list"
    assert await publish(alice.identity(), 1) == "stale_device_list"  # registration made 1
    assert await publish(alice.identity(), 2) == "ok"
    await alice.devices_of("alice")
    record = alice.contact("alice")
    assert record is not None
    assert (record.device_list_version, record.listed_devices) == (2, [me])
