"""The history bundle of a link: what is sent, and every altered or foreign transfer refused."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from bastion.client import Client, ContactRecord, HistoryRecord, link_history
from bastion.client.link_history import HistoryBundle, HistorySummary, TrustEntry
from bastion.client.profile import Profile
from bastion.client.records import AccountInfo
from bastion.crypto import linking
from bastion.crypto.payload import direct_conversation
from bastion.errors import AuthenticationError
from tests.client.test_front_end_api import FAST
from tests.conftest import PASSPHRASE

NOW = 1_800_000_000_000
DAY = link_history.DAY_MS
BOB_KEY = b"\x0b" * 32
CAROL_KEY = b"\x0c" * 32


def offline_client(folder: Path, device_id: str) -> Client:
    """alice on a new profile that never connects."""
    profile = Profile.create(folder, PASSPHRASE, params=FAST)
    account = AccountInfo(
        username="alice",
        server_url="wss://127.0.0.1:9",
        fingerprint="SHA256:" + "00" * 32,
        server_name="bastion.test",
        device_id=device_id,
        created_at=1,
    )
    return Client(profile, account)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Client, Client]]:
    """alice's existing device, with history and contacts, and her new one."""
    old = offline_client(tmp_path / "old", "abcdefghijklmnop")
    new = offline_client(tmp_path / "new", "qrstuvwxyzabcdef")
    with old.profile.transaction():
        old.profile.put(
            "contact:bob", ContactRecord(user="bob", identity_key=BOB_KEY, trust="verified")
        )
        old.profile.put("contact:carol", ContactRecord(user="carol", identity_key=CAROL_KEY))
        for record in (
            message("bob", "out", "ten days ago", NOW - 10 * DAY),
            message("bob", "in", "yesterday", NOW - DAY),
            message("carol", "in", "an hour ago", NOW - 3_600_000),
            message("carol", "out", "still in the outbox", NOW, state="pending"),
        ):
            old.profile.add_message(record.conversation, record.id, record)
        old.profile.add_message("group:" + "00" * 32, b"\x01" * 16, group_message())
    yield old, new
    old.profile.close()
    new.profile.close()


def message(peer: str, direction: str, text: str, at: int, *, state: str = "") -> HistoryRecord:
    return HistoryRecord(
        id=secrets.token_bytes(16),
        sender="alice" if direction == "out" else peer,
        device="abcdefghijklmnop" if direction == "out" else "zzzzzzzzzzzzzzzz",
        peer=peer,
        conversation=direct_conversation("alice", peer),
        text=text,
        sent_at=at,
        server_ts=at,
        direction=direction,
        state=state or ("sent" if direction == "out" else "received"),
    )


def group_message() -> HistoryRecord:
    return HistoryRecord(
        id=b"\x01" * 16,
        sender="bob",
        device="zzzzzzzzzzzzzzzz",
        peer="group:" + "00" * 32,
        conversation="group:" + "00" * 32,
        text="in a group",
        sent_at=NOW,
        server_ts=NOW,
        direction="in",
        state="received",
    )


def transfer(old: Client, new: Client, choice: link_history.HistoryChoice) -> HistorySummary:
    raw, sent = link_history.build(old, choice, now=NOW)
    bundle = link_history.open_bundle(raw, link_history.digest(raw), "alice")
    kept = link_history.store(new, bundle)
    assert kept.messages <= sent.messages
    return kept


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("all", link_history.ALL_HISTORY),
        (" None ", link_history.NO_HISTORY),
        ("30", link_history.HistoryChoice(send=True, days=30)),
        ("36500", link_history.HistoryChoice(send=True, days=36500)),
    ],
)
def test_choices(text: str, expected: link_history.HistoryChoice) -> None:
    assert link_history.parse_choice(text) == expected


@pytest.mark.parametrize("text", ["", "0", "-3", "36501", "7d", "some", "٣"])
def test_a_choice_that_means_nothing_is_refused_with_a_sentence(text: str) -> None:
    with pytest.raises(ValueError, match="'all', 'none' or a number of days"):
        link_history.parse_choice(text)


def test_all_sends_the_direct_conversations_and_the_trust(pair: tuple[Client, Client]) -> None:
    old, new = pair
    kept = transfer(old, new, link_history.ALL_HISTORY)
    assert kept == HistorySummary(messages=3, conversations=2, verified=1)
    assert link_history.build(old, link_history.ALL_HISTORY, now=NOW)[1] == kept
    assert [r.text for r in new.history("bob")] == ["ten days ago", "yesterday"]
    assert [r.text for r in new.history("carol")] == ["an hour ago"]  # not the pending one
    assert new.profile.history("group:" + "00" * 32, HistoryRecord) == []
    bob, carol = new.contact("bob"), new.contact("carol")
    assert bob is not None
    assert (bob.identity_key, bob.trust) == (BOB_KEY, "verified")
    assert carol is not None
    assert (carol.identity_key, carol.trust) == (CAROL_KEY, "unverified")
    # Sent twice (a retry), nothing is doubled.
    assert transfer(old, new, link_history.ALL_HISTORY).messages == 0
    assert len(new.history("bob")) == 2


def test_days_keep_only_the_recent_messages(pair: tuple[Client, Client]) -> None:
    old, new = pair
    kept = transfer(old, new, link_history.parse_choice("2"))
    assert kept.messages == 2
    assert [r.text for r in new.history("bob")] == ["yesterday"]


def test_none_sends_nothing(pair: tuple[Client, Client]) -> None:
    old, _ = pair
    assert link_history.build(old, link_history.NO_HISTORY, now=NOW) == (b"", HistorySummary())


def test_verified_only_for_the_same_pinned_key(pair: tuple[Client, Client]) -> None:
    old, new = pair
    other = ContactRecord(user="bob", identity_key=b"\x0f" * 32)
    with new.profile.transaction():
        new.profile.put("contact:bob", other)
    kept = transfer(old, new, link_history.ALL_HISTORY)
    assert kept.verified == 0
    assert new.contact("bob") == other  # neither re-pinned nor verified


def encoded(bundle: HistoryBundle) -> bytes:
    return msgspec.msgpack.encode(bundle)


def refused(raw: bytes, digest: bytes | None = None) -> None:
    with pytest.raises(AuthenticationError):
        link_history.open_bundle(
            raw, link_history.digest(raw) if digest is None else digest, "alice"
        )


def test_a_bundle_not_matching_the_grant_is_refused(pair: tuple[Client, Client]) -> None:
    old, _ = pair
    raw, _ = link_history.build(old, link_history.ALL_HISTORY, now=NOW)
    refused(raw, digest=link_history.digest(raw + b"x"))
    refused(raw[:-1])
    refused(b"not a bundle")


@pytest.mark.parametrize(
    "change",
    [
        {"sender": "bob"},  # an outgoing message claiming another sender
        {"conversation": direct_conversation("bob", "carol")},  # someone else's conversation
        {"peer": "alice", "conversation": direct_conversation("alice", "alice")},
        {"direction": "sideways"},
        {"state": "pending"},
        {"text": "x" * 16_001},
        {"id": b"short"},
        {"peer": "Not A Name"},
    ],
)
def test_a_record_that_is_not_this_accounts_is_refused(change: dict[str, object]) -> None:
    record = msgspec.structs.replace(message("bob", "out", "hello", NOW), **change)
    refused(encoded(HistoryBundle(v=1, messages=[record], contacts=[])))


@pytest.mark.parametrize(
    "entry",
    [
        TrustEntry("alice", BOB_KEY, verified=True),  # itself
        TrustEntry("bob", b"\x0b" * 31, verified=True),
        TrustEntry("B0B!", BOB_KEY, verified=True),
    ],
)
def test_a_contact_entry_that_makes_no_sense_is_refused(entry: TrustEntry) -> None:
    refused(encoded(HistoryBundle(v=1, messages=[], contacts=[entry])))


def test_an_unknown_version_is_refused() -> None:
    refused(encoded(HistoryBundle(v=2, messages=[], contacts=[])))


def test_a_piece_opens_only_in_its_place_on_its_link() -> None:
    code = os.urandom(linking.CODE_BYTES)
    slot, key = linking.slot_and_key(code)
    blob = linking.seal_piece(key, slot, 1, 3, b"the middle")
    piece = linking.open_piece(key, slot, 1, blob)
    assert (piece.index, piece.total, piece.data) == (1, 3, b"the middle")
    other_slot, other_key = linking.slot_and_key(os.urandom(linking.CODE_BYTES))
    for args in ((key, slot, 0), (key, slot, 2), (other_key, slot, 1), (key, other_slot, 1)):
        with pytest.raises(AuthenticationError, match="not sealed for this link"):
            linking.open_piece(*args, blob)
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(AuthenticationError):
        linking.open_piece(key, slot, 1, bytes(tampered))
    # A piece is not a grant, nor a grant a piece.
    with pytest.raises(AuthenticationError):
        linking.open_grant(key, slot, blob)
    grant = linking.seal_grant(key, slot, linking.LinkGrant("alice", b"k" * 32, "bastion.test"))
    with pytest.raises(AuthenticationError):
        linking.open_piece(key, slot, 0, grant)
