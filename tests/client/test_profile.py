"""The encrypted-at-rest profile, on real files: locking, permissions, no plaintext, integrity."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from bastion.client import Client, ContactRecord, HistoryRecord, MessageEvent, WarningEvent
from bastion.client.client import _envelope_key
from bastion.client.profile import DB_FILE, HEADER_FILE, Profile
from bastion.client.records import AccountInfo, DeviceEntry, Stats
from bastion.crypto.atrest import KdfParams
from bastion.crypto.device import DeviceCertificate
from bastion.crypto.olm import PRE_KEY, OlmDevice
from bastion.crypto.payload import Payload, direct_conversation, seal
from bastion.crypto.signing import AccountIdentity
from bastion.errors import ProfileError
from bastion.protocol import frames

PASSPHRASE = "correct horse battery staple"
# The weakest cost the profile accepts: keeps the tests fast, still Argon2id.
FAST = KdfParams(memory_kib=19 * 1024, iterations=2, lanes=1)
CANARY = "qzcanary42x"  # valid as a username, so it can also be a contact's name
TABLES = ("kv", "sessions", "messages", "seen", "outbox")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "profile"


@pytest.fixture
def profile(folder: Path) -> Iterator[Profile]:
    opened = Profile.create(folder, PASSPHRASE, params=FAST)
    yield opened
    opened.close()


def history_record(message_id: bytes, text: str, *, peer: str = "bob") -> HistoryRecord:
    return HistoryRecord(
        id=message_id,
        sender="alice",
        device="abcdefghijklmnop",
        peer=peer,
        conversation=direct_conversation("alice", peer),
        text=text,
        sent_at=1,
        server_ts=2,
        direction="out",
        state="sent",
    )


def rows(folder: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table, read with a separate connection."""
    with closing(sqlite3.connect(folder / DB_FILE)) as db:
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall()) for t in TABLES}


# --- creating and unlocking --------------------------------------------------------------------


def test_create_then_unlock_with_the_passphrase(folder: Path) -> None:
    created = Profile.create(folder, PASSPHRASE, params=FAST)
    with created.transaction():
        created.put("note", "remember the milk")
    created.close()
    assert Profile.exists(folder)

    unlocked = Profile.unlock(folder, PASSPHRASE)
    try:
        assert unlocked.get("note", str) == "remember the milk"
        assert unlocked.get("absent", str) is None
    finally:
        unlocked.close()


@pytest.mark.parametrize(
    "wrong", ["correct horse battery stapl", "", "CORRECT HORSE BATTERY STAPLE"]
)
def test_wrong_passphrase_is_refused(profile: Profile, folder: Path, wrong: str) -> None:
    with pytest.raises(ProfileError):
        Profile.unlock(folder, wrong)


def test_missing_profile_is_a_profile_error(tmp_path: Path) -> None:
    assert not Profile.exists(tmp_path / "nothing")
    with pytest.raises(ProfileError, match="no profile"):
        Profile.unlock(tmp_path / "nothing", PASSPHRASE)


def test_create_refuses_an_empty_passphrase_and_an_existing_profile(
    profile: Profile, folder: Path, tmp_path: Path
) -> None:
    with pytest.raises(ProfileError):
        Profile.create(tmp_path / "other", "", params=FAST)
    with pytest.raises(ProfileError, match="already exists"):
        Profile.create(folder, PASSPHRASE, params=FAST)


def test_header_holds_no_secret_and_default_cost_is_strong(tmp_path: Path) -> None:
    made = Profile.create(tmp_path / "p", PASSPHRASE)
    made.close()
    header = json.loads((tmp_path / "p" / HEADER_FILE).read_text())
    assert header["kdf"] == {
        "algorithm": "argon2id",
        "memory_kib": 64 * 1024,
        "iterations": 3,
        "lanes": 4,
    }
    assert PASSPHRASE not in json.dumps(header)


@pytest.mark.parametrize(
    ("field", "value"),
    [("memory_kib", 8), ("iterations", 1), ("lanes", 0), ("algorithm", "pbkdf2")],
)
def test_weakened_header_is_refused(
    profile: Profile, folder: Path, field: str, value: object
) -> None:
    # Someone with access to the folder lowers the cost to make guessing cheap.
    header = json.loads((folder / HEADER_FILE).read_text())
    header["kdf"][field] = value
    (folder / HEADER_FILE).write_text(json.dumps(header))
    with pytest.raises(ProfileError):
        Profile.unlock(folder, PASSPHRASE)


@pytest.mark.parametrize("content", ["", "{", "[]", '{"version": 1}', '{"version": 2, "kdf": {}}'])
def test_damaged_header_is_a_profile_error(profile: Profile, folder: Path, content: str) -> None:
    (folder / HEADER_FILE).write_text(content)
    with pytest.raises(ProfileError):
        Profile.unlock(folder, PASSPHRASE)


# --- permissions and plaintext -----------------------------------------------------------------


def modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}


def test_folder_is_0700_and_files_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    folder = tmp_path / "profile"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    old = os.umask(0)
    try:
        made = Profile.create(folder, PASSPHRASE, params=FAST)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        with made.transaction():
            made.put("note", "x")
            files = modes(folder)
            assert f"{DB_FILE}-journal" in files  # the journal exists during a write
        assert set(files) >= {DB_FILE, HEADER_FILE}
        assert files == dict.fromkeys(files, 0o600)
    finally:
        made.close()


def occurrences(folder: Path, needles: list[str]) -> set[tuple[str, str]]:
    """(needle, file name) for each needle found in UTF-8 or UTF-16 (either byte order)."""
    found = set()
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        for needle in needles:
            for encoding in ("utf-8", "utf-16-le", "utf-16-be"):
                if needle.encode(encoding) in data:
                    found.add((needle, path.name))
    return found


def test_the_scanner_finds_a_canary(tmp_path: Path) -> None:
    (tmp_path / "wide").write_bytes(b"\0\1" + CANARY.encode("utf-16-be"))
    (tmp_path / "narrow").write_bytes(CANARY.encode())
    (tmp_path / "clean").write_bytes(CANARY[:-1].encode())
    assert occurrences(tmp_path, [CANARY]) == {(CANARY, "wide"), (CANARY, "narrow")}


def test_no_plaintext_on_disk(profile: Profile, folder: Path) -> None:
    needles = [CANARY, PASSPHRASE, "dm:alice,"]
    contact = ContactRecord(user=CANARY, identity_key=bytes(32))
    with profile.transaction():
        profile.put("note", CANARY)
        profile.put("contact:" + CANARY, contact)
        profile.add_message(
            direct_conversation("alice", CANARY), b"m" * 16, history_record(b"m" * 16, CANARY)
        )
        profile.queue_outgoing(b"o" * 16, CANARY.encode())
        profile.save_session(CANARY.encode(), "session-1", CANARY, 1)
        profile.mark_seen("msg", CANARY)
        # Mid-transaction, with the journal on disk.
        assert (folder / f"{DB_FILE}-journal").exists()
        assert occurrences(folder, needles) == set()
    with profile.transaction():  # replace and delete, so old values land in freed pages
        profile.put("note", "something else")
        profile.update_message(b"m" * 16, history_record(b"m" * 16, "edited"))
        profile.sent(b"o" * 16)
    assert occurrences(folder, needles) == set()
    # ...and it was all really stored.
    assert profile.get("contact:" + CANARY, ContactRecord) == contact
    assert profile.sessions(CANARY.encode()) == [("session-1", CANARY)]
    assert profile.seen("msg", CANARY)


# --- integrity: rows cannot be moved -----------------------------------------------------------


def reopen(profile: Profile, folder: Path, sql: str, params: tuple[object, ...]) -> Profile:
    """Close, change the database behind the profile's back, and unlock again."""
    profile.close()
    with closing(sqlite3.connect(folder / DB_FILE)) as db:
        assert db.execute(sql, params).rowcount >= 1
        db.commit()
    return Profile.unlock(folder, PASSPHRASE)


def value_of(folder: Path, table: str, tag: bytes) -> bytes:
    with closing(sqlite3.connect(folder / DB_FILE)) as db:
        row = db.execute(f"SELECT value FROM {table} WHERE tag = ?", (tag,)).fetchone()
    assert row is not None
    return bytes(row[0])


def test_kv_values_swapped_between_names_are_detected(profile: Profile, folder: Path) -> None:
    with profile.transaction():
        profile.put("trust:bob", "verified")
        profile.put("trust:mallory", "blocked")
    bob, mallory = profile.tag("kv", "trust:bob"), profile.tag("kv", "trust:mallory")
    bob_value, mallory_value = value_of(folder, "kv", bob), value_of(folder, "kv", mallory)
    swapped = reopen(
        profile,
        folder,
        "UPDATE kv SET value = CASE tag WHEN ?1 THEN ?4 ELSE ?3 END WHERE tag IN (?1, ?2)",
        (bob, mallory, bob_value, mallory_value),
    )
    try:
        with pytest.raises(ProfileError):
            swapped.get("trust:bob", str)
        with pytest.raises(ProfileError):
            swapped.get("trust:mallory", str)
    finally:
        swapped.close()


def test_message_moved_to_another_id_is_detected(profile: Profile, folder: Path) -> None:
    with profile.transaction():
        profile.add_message("dm:alice,bob", b"1" * 16, history_record(b"1" * 16, "first"))
        profile.add_message("dm:alice,bob", b"2" * 16, history_record(b"2" * 16, "second"))
    copied = reopen(
        profile,
        folder,
        "UPDATE messages SET value = ? WHERE tag = ?",
        (
            value_of(folder, "messages", profile.tag("msg", b"1" * 16)),
            profile.tag("msg", b"2" * 16),
        ),
    )
    try:
        with pytest.raises(ProfileError):
            copied.history("dm:alice,bob", HistoryRecord)
    finally:
        copied.close()


def test_message_moved_to_another_conversation_is_detected(profile: Profile, folder: Path) -> None:
    carol = direct_conversation("alice", "carol")
    with profile.transaction():
        profile.add_message(carol, b"c" * 16, history_record(b"c" * 16, "for carol", peer="carol"))
    moved = reopen(
        profile,
        folder,
        "UPDATE messages SET conv = ?",
        (profile.tag("conv", direct_conversation("alice", "bob")),),
    )
    try:
        with pytest.raises(ProfileError):
            moved.history(direct_conversation("alice", "bob"), HistoryRecord)
    finally:
        moved.close()


def test_session_moved_to_another_peer_is_detected(profile: Profile, folder: Path) -> None:
    with profile.transaction():
        profile.save_session(b"A" * 32, "sid", "pickle for A", 1)
    moved = reopen(
        profile, folder, "UPDATE sessions SET peer = ?", (profile.tag("peer", b"M" * 32),)
    )
    try:
        with pytest.raises(ProfileError):
            moved.sessions(b"M" * 32)
    finally:
        moved.close()


# --- transactions ------------------------------------------------------------------------------


def write_everything_then_fail(profile: Profile) -> None:
    with profile.transaction():
        profile.put("note", "lost")
        profile.put("other", "lost")
        profile.add_message("dm:alice,bob", b"x" * 16, history_record(b"x" * 16, "lost"))
        profile.update_message(b"k" * 16, history_record(b"k" * 16, "changed"))
        profile.save_session(b"A" * 32, "sid", "pickle", 1)
        profile.mark_seen("env", "1")
        profile.queue_outgoing(b"x" * 16, b"frame")
        assert profile.get("note", str) == "lost"  # written, inside the transaction
        raise RuntimeError("power cut")


def test_rollback_leaves_the_database_byte_identical(profile: Profile, folder: Path) -> None:
    with profile.transaction():
        profile.put("note", "kept")
        profile.add_message("dm:alice,bob", b"k" * 16, history_record(b"k" * 16, "kept"))
    before_rows, before_bytes = rows(folder), (folder / DB_FILE).read_bytes()

    with pytest.raises(RuntimeError, match="power cut"):
        write_everything_then_fail(profile)

    assert rows(folder) == before_rows
    assert (folder / DB_FILE).read_bytes() == before_bytes
    assert profile.get("note", str) == "kept"


# --- a failed decryption changes nothing (Client.process on a real profile) --------------------


class Scene:
    """Bob's registered-looking profile (no server needed) that already knows alice's device."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.alice = OlmDevice.create()
        self.mallory = OlmDevice.create()
        alice_account = AccountIdentity.generate()
        cert = DeviceCertificate.issue(
            alice_account,
            username="alice",
            ed25519=self.alice.ed25519,
            curve25519=self.alice.curve25519,
            created_at=1,
        )
        cert.verify(alice_account.public_bytes)
        bob_device = OlmDevice.create()
        self.bob_keys = bob_device.new_one_time_keys(3)
        profile = Profile.create(folder, PASSPHRASE, params=FAST)
        account = AccountInfo(
            username="bob",
            server_url="wss://127.0.0.1:9",
            fingerprint="SHA256:" + "00" * 32,
            server_name="bastion.test",
            device_id=bob_device.device_id,
            created_at=1,
        )
        bob_account = AccountIdentity.generate()
        with profile.transaction():
            profile.put("account", account)
            profile.put("identity", bob_account.private_bytes())
            profile.put("device", bob_device.pickle(profile.pickle_key))
            profile.put(
                "contact:bob",
                ContactRecord(user="bob", identity_key=bob_account.public_bytes, trust="self"),
            )
            profile.put(
                "contact:alice",
                ContactRecord(
                    user="alice",
                    identity_key=alice_account.public_bytes,
                    devices=[
                        DeviceEntry(
                            device_id=cert.device_id,
                            ed25519=cert.ed25519,
                            curve25519=cert.curve25519,
                            created_at=cert.created_at,
                        )
                    ],
                ),
            )
        self.bob = Client(profile, account)
        self.bob_curve = bob_device.curve25519
        self.seq = 0
        self.delivered: dict[int, frames.Deliver] = {}

    def sealed(self, text: str, *, signer: OlmDevice | None = None) -> bytes:
        return seal(
            Payload(
                kind="text",
                sender="alice",
                sender_device=self.alice.device_id,
                recipient="bob",
                to="bob",
                to_device=self.bob.account.device_id,
                conversation=direct_conversation("alice", "bob"),
                message_id=os.urandom(16),
                sent_at=1,
                body=text,
            ),
            (signer or self.alice).sign,
        )

    def deliver(self, kind: int, body: bytes) -> frames.Deliver:
        self.seq += 1
        frame = frames.Deliver(
            seq=self.seq,
            sender="alice",
            sender_device=self.alice.device_id,
            server_ts=1000 + self.seq,
            kind=kind,
            body=body,
        )
        self.delivered[self.seq] = frame
        return frame

    def rows(self) -> dict[str, list[tuple[object, ...]]]:
        return rows(self.folder)

    def stats_tag(self) -> bytes:
        return self.bob.profile.tag("kv", "stats")

    def seen_tag(self, seq: int) -> bytes:
        return self.bob.profile.tag("seen:env", _envelope_key(self.delivered[seq]))


@pytest.fixture
def scene(folder: Path) -> Iterator[Scene]:
    made = Scene(folder)
    yield made
    made.bob.profile.close()


def assert_only_the_rejection_was_recorded(
    scene: Scene, before: dict[str, list[tuple[object, ...]]], seq: int
) -> None:
    after = scene.rows()
    for table in ("sessions", "messages", "outbox"):
        assert after[table] == before[table], table
    stats = scene.stats_tag()
    assert [r for r in after["kv"] if r[0] != stats] == [r for r in before["kv"] if r[0] != stats]
    assert sorted(after["seen"]) == sorted([*before["seen"], (scene.seen_tag(seq),)])
    assert scene.bob.stats().rejected == 1  # each test makes exactly one rejection


async def test_garbage_deliver_leaves_the_stores_as_they_were(scene: Scene) -> None:
    before = scene.rows()
    deliver = scene.deliver(PRE_KEY, os.urandom(300))
    event = await scene.bob.process(deliver)
    assert isinstance(event, WarningEvent)
    assert (event.sender, event.device) == ("alice", scene.alice.device_id)
    assert_only_the_rejection_was_recorded(scene, before, deliver.seq)
    assert scene.bob.history("alice") == []


async def test_decrypted_but_badly_signed_message_changes_nothing(scene: Scene) -> None:
    [otk, *_] = scene.bob_keys
    forged = scene.sealed("send me your password", signer=scene.mallory)
    session = scene.alice.outbound_session(scene.bob_curve, otk.key)
    kind, body = session.encrypt(forged)
    before = scene.rows()

    event = await scene.bob.process(scene.deliver(kind, body))
    assert isinstance(event, WarningEvent)
    assert event.reason == "bad signature"
    # The pre-key message did decrypt (a new session, a one-time key used up) but nothing of
    # that was kept: no session, the device account unchanged, no history.
    assert_only_the_rejection_was_recorded(scene, before, scene.seq)
    assert scene.bob.history("alice") == []

    # Since the one-time key was not consumed, a genuine message over it still gets through.
    honest = scene.alice.outbound_session(scene.bob_curve, otk.key)
    kind, body = honest.encrypt(scene.sealed("hello bob"))
    event = await scene.bob.process(scene.deliver(kind, body))
    assert isinstance(event, MessageEvent)
    assert event.record.text == "hello bob"
    assert [r.text for r in scene.bob.history("alice")] == ["hello bob"]


async def test_bad_message_on_an_established_session_changes_nothing(scene: Scene) -> None:
    session = scene.alice.outbound_session(scene.bob_curve, scene.bob_keys[0].key)
    event = await scene.bob.process(scene.deliver(*session.encrypt(scene.sealed("one"))))
    assert isinstance(event, MessageEvent)
    before = scene.rows()
    assert scene.bob.stats() == Stats()

    event = await scene.bob.process(
        scene.deliver(*session.encrypt(scene.sealed("two", signer=scene.mallory)))
    )
    assert isinstance(event, WarningEvent)
    assert_only_the_rejection_was_recorded(scene, before, scene.seq)

    event = await scene.bob.process(scene.deliver(*session.encrypt(scene.sealed("three"))))
    assert isinstance(event, MessageEvent)
    assert [r.text for r in scene.bob.history("alice")] == ["one", "three"]
