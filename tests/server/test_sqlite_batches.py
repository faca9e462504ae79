"""The SQLite store's group commit and device-id cache, under the conditions that stress them.

A batch runs without a savepoint per operation; a failing operation must still
leave no partial write and must not take the other operations of its batch down.
The recipient, contact and queue checks of every message read caches; they
must follow every change, including one committed by another process.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bastion.errors import StorageError
from bastion.server.storage.interfaces import (
    AccountRecord,
    Copy,
    DeviceMismatchError,
    DeviceRecord,
    KeyRecord,
    NotContactsError,
    QueueFullError,
    StoredMessage,
)
from bastion.server.storage.sqlite.relay import SQLiteStore

FALLBACK = KeyRecord(b"f" * 32, b"s" * 64)


def device(username: str, device_id: str) -> DeviceRecord:
    return DeviceRecord(username, device_id, b"e" * 32, b"c" * 32, 1, b"x" * 64)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "bastion.db")
    for name in ("alice", "bob"):
        await opened.create_account(
            AccountRecord(name, b"k" * 32, 1), device(name, f"{name}-1"), [], FALLBACK
        )
    yield opened
    await opened.close()


async def send(store: SQLiteStore, msg_id: bytes, *devices: str, ts: int = 1000) -> StoredMessage:
    return await store.submit_message(
        sender="alice",
        sender_device="alice-1",
        client_msg_id=msg_id,
        recipient="bob",
        server_ts=ts,
        copies=[Copy("bob", d, 1, b"ciphertext") for d in devices],
    )


async def test_a_failing_operation_leaves_no_write_and_its_batch_neighbours_commit(
    store: SQLiteStore,
) -> None:
    await store.ensure_tables(["CREATE TABLE IF NOT EXISTS notes (n INTEGER)"])
    gate = threading.Event()
    # Hold the database thread so that everything below lands in one batch.
    holding = asyncio.ensure_future(store.run(lambda conn: gate.wait(5)))
    await asyncio.sleep(0.05)

    def write(n: int, *, fail: bool) -> Callable[[sqlite3.Connection], None]:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO notes (n) VALUES (?)", (n,))
            if fail:
                raise StorageError("refused after writing")

        return op

    first = asyncio.ensure_future(store.run(write(1, fail=False)))
    failing = asyncio.ensure_future(store.run(write(2, fail=True)))
    message = asyncio.ensure_future(send(store, b"m1", "bob-1"))
    mismatch = asyncio.ensure_future(send(store, b"m2", "bob-1", "bob-9"))
    last = asyncio.ensure_future(store.run(write(3, fail=False)))
    await asyncio.sleep(0.05)
    gate.set()
    await holding
    await first
    await last
    with pytest.raises(StorageError, match="refused after writing"):
        await failing
    with pytest.raises(DeviceMismatchError):
        await mismatch
    assert len((await message).envelopes) == 1
    rows = await store.run(lambda conn: conn.execute("SELECT n FROM notes ORDER BY n").fetchall())
    assert rows == [(1,), (3,)]
    # The refused message left no trace: its id can be used again, and nothing is queued for it.
    assert len((await send(store, b"m2", "bob-1")).envelopes) == 1
    assert len(await store.fetch_queue("bob", "bob-1", 0, 10)) == 2


async def test_the_recipient_check_follows_added_and_revoked_devices(store: SQLiteStore) -> None:
    await send(store, b"a", "bob-1")  # bob's device list is now cached
    await store.add_device(device("bob", "bob-2"), [], FALLBACK, max_devices=10)
    with pytest.raises(DeviceMismatchError) as missing:
        await send(store, b"b", "bob-1")
    assert missing.value.missing == ["bob/bob-2"]
    await send(store, b"c", "bob-1", "bob-2")
    assert await store.revoke_device("bob", "bob-2")
    with pytest.raises(DeviceMismatchError) as extra:
        await send(store, b"d", "bob-1", "bob-2")
    assert extra.value.extra == ["bob/bob-2"]
    assert await store.fetch_queue("bob", "bob-2", 0, 10) == []


async def test_the_recipient_check_follows_a_change_made_by_another_process(
    store: SQLiteStore, tmp_path: Path
) -> None:
    await send(store, b"a", "bob-1")  # cached
    other = sqlite3.connect(tmp_path / "bastion.db", isolation_level=None)
    try:
        other.execute("DELETE FROM devices WHERE username = 'bob' AND device_id = 'bob-1'")
        other.execute(
            "INSERT INTO devices (username, device_id, ed25519, curve25519, created_at,"
            " certificate) VALUES ('bob', 'bob-3', x'00', x'00', 1, x'00')"
        )
    finally:
        other.close()
    with pytest.raises(DeviceMismatchError) as refused:
        await send(store, b"b", "bob-1")
    assert refused.value.missing == ["bob/bob-3"]
    assert refused.value.extra == ["bob/bob-1"]
    await send(store, b"c", "bob-3")


async def test_old_message_ids_are_forgotten_by_the_periodic_sweep(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "b.db", sent_retention_ms=1000, prune_every_ms=500)
    try:
        for name in ("alice", "bob"):
            await store.create_account(
                AccountRecord(name, b"k" * 32, 1), device(name, f"{name}-1"), [], FALLBACK
            )
        assert len((await send(store, b"old", "bob-1", ts=10_000)).envelopes) == 1
        # Within retention a retry is recognised; once swept, the id is new again.
        assert (await send(store, b"old", "bob-1", ts=10_400)).envelopes == []
        await send(store, b"later", "bob-1", ts=12_000)  # sweeps what is older than 11,000
        assert len((await send(store, b"old", "bob-1", ts=12_001)).envelopes) == 1
    finally:
        await store.close()


async def contact_message(
    store: SQLiteStore, msg_id: bytes, *, queue_max: int | None = None
) -> int:
    stored = await store.submit_message(
        sender="alice",
        sender_device="alice-1",
        client_msg_id=msg_id,
        recipient="bob",
        server_ts=1000,
        copies=[Copy("bob", "bob-1", 1, b"ciphertext")],
        queue_max=queue_max,
        contacts_only=queue_max is None,
    )
    return len(stored.envelopes)


async def test_the_contact_check_follows_a_change_made_by_another_process(
    store: SQLiteStore, tmp_path: Path
) -> None:
    await store.run(
        lambda conn: conn.executemany(
            "INSERT INTO contacts (owner, peer, state, updated_at) VALUES (?, ?, 'accepted', 1)",
            [("alice", "bob"), ("bob", "alice")],
        )
    )
    assert await contact_message(store, b"a") == 1  # the pair is now cached as accepted
    other = sqlite3.connect(tmp_path / "bastion.db", isolation_level=None)
    try:
        other.execute("UPDATE contacts SET state = 'blocked' WHERE owner = 'bob'")
    finally:
        other.close()
    with pytest.raises(NotContactsError):
        await contact_message(store, b"b")
    assert [e.body for e in await store.fetch_queue("bob", "bob-1", 0, 10)] == [b"ciphertext"]


async def test_the_queue_limit_counts_envelopes_a_feature_queued(store: SQLiteStore) -> None:
    assert await contact_message(store, b"a", queue_max=3) == 1  # bob's count is now kept
    assert await contact_message(store, b"b", queue_max=3) == 1
    await store.run(
        lambda conn: conn.execute(
            "INSERT INTO queue (username, device_id, sender, sender_device, server_ts, kind,"
            " body) VALUES ('bob', 'bob-1', 'carol', 'carol-1', 1, 1, x'00')"
        )
    )
    with pytest.raises(QueueFullError):
        await contact_message(store, b"c", queue_max=3)


async def test_the_write_ahead_log_is_reused_while_messages_keep_coming(
    store: SQLiteStore, tmp_path: Path
) -> None:
    """Checkpoints run beside the writer, so the WAL file stops growing under steady traffic."""
    wal = tmp_path / "bastion.db-wal"
    body = bytes(2000)

    async def burst(round_: int) -> None:
        await asyncio.gather(
            *(
                store.submit_message(
                    sender="alice",
                    sender_device="alice-1",
                    client_msg_id=b"%03d-%03d" % (round_, i),
                    recipient="bob",
                    server_ts=1000,
                    copies=[Copy("bob", "bob-1", 1, body)],
                )
                for i in range(200)
            )
        )

    sizes = []
    for round_ in range(8):
        await burst(round_)
        sizes.append(wal.stat().st_size)
        await asyncio.sleep(0.7)  # longer than one checkpoint period
    one_round = sizes[0]
    assert one_round > 200 * len(body)  # the round really went through the WAL
    assert max(sizes) < 4 * one_round, sizes  # without checkpoints: 8 rounds' worth
    assert len(await store.fetch_queue("bob", "bob-1", 0, 5000)) == 8 * 200


async def test_an_acknowledgement_commits_with_the_next_work_or_alone_soon_after(
    store: SQLiteStore,
) -> None:
    seqs = [(await send(store, b"m%d" % i, "bob-1")).envelopes[0].seq for i in range(3)]
    # Alone, it still commits, well within a second.
    assert await asyncio.wait_for(store.ack("bob", "bob-1", seqs[:1]), 1.0) == 1
    # Followed at once by a read on the same store: the read sees the deletion.
    acking = asyncio.ensure_future(store.ack("bob", "bob-1", seqs[1:2]))
    await asyncio.sleep(0)  # the acknowledgement is handed over first
    left = await store.fetch_queue("bob", "bob-1", 0, 10)
    assert [e.seq for e in left] == seqs[2:]
    assert await acking == 1


async def test_closing_commits_an_acknowledgement_still_waiting(tmp_path: Path) -> None:
    path = tmp_path / "bastion.db"
    first = SQLiteStore(path)
    for name in ("alice", "bob"):
        await first.create_account(
            AccountRecord(name, b"k" * 32, 1), device(name, f"{name}-1"), [], FALLBACK
        )
    seq = (await send(first, b"m1", "bob-1")).envelopes[0].seq
    acking = asyncio.ensure_future(first.ack("bob", "bob-1", [seq]))
    await asyncio.sleep(0)  # handed to the database thread, not yet committed
    await first.close()
    assert await asyncio.wait_for(acking, 5) == 1
    again = SQLiteStore(path)
    try:
        assert await again.fetch_queue("bob", "bob-1", 0, 10) == []
    finally:
        await again.close()
