"""The blob metadata store on SQLite and PostgreSQL, and the expiry sweep."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bastion.server.config import Limits, Settings
from bastion.server.handlers._services import DAY_MS, BlobService
from bastion.server.storage import open_storage
from bastion.server.storage.blob_content import (
    PIECE_BYTES,
    BlobContent,
    LocalBlobFiles,
    PgBlobContent,
)
from bastion.server.storage.blobs import (
    BlobRecord,
    BlobStore,
    PgBlobStore,
    QuotaExceededError,
    SQLiteBlobStore,
)
from bastion.server.storage.postgres.relay import PgStore
from bastion.server.storage.sqlite.relay import SQLiteStore
from tests.server.test_store_contract import (
    POSTGRES_URL,
    drop_schema,
    fresh_schema,
    postgres_or_skip,
)


def blob(blob_id: str, *, owner: str = "alice", size: int = 100, at: int = 1000) -> BlobRecord:
    return BlobRecord(
        blob_id=blob_id.ljust(32, "0"),
        owner=owner,
        size=size,
        sha256=bytes(32),
        created_at=at,
        complete=False,
        recipients=("bob", "carol"),
    )


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "sqlite":
        sqlite = SQLiteStore(tmp_path / "bastion.db")
        yield await SQLiteBlobStore.open(sqlite)
        await sqlite.close()
        return
    await postgres_or_skip()
    schema = fresh_schema()
    pg = await PgStore.connect(f"{POSTGRES_URL}?schema={schema}")
    try:
        yield PgBlobStore(pg)
    finally:
        await pg.close()
        await drop_schema(schema)


async def test_a_blob_round_trips_and_completes(store: BlobStore) -> None:
    await store.create(blob("a1"), quota_bytes=1000)
    got = await store.get("a1".ljust(32, "0"))
    assert got == blob("a1")
    await store.mark_complete(got.blob_id)
    done = await store.get(got.blob_id)
    assert done is not None
    assert done.complete
    assert await store.get("ff".ljust(32, "0")) is None


async def test_quota_counts_every_blob_of_the_owner(store: BlobStore) -> None:
    await store.create(blob("a1", size=600), quota_bytes=1000)
    await store.create(blob("b1", owner="bob", size=600), quota_bytes=1000)
    with pytest.raises(QuotaExceededError):
        await store.create(blob("a2", size=500), quota_bytes=1000)
    assert await store.used_bytes("alice") == 600
    await store.delete(blob("a1").blob_id)
    await store.create(blob("a2", size=500), quota_bytes=1000)


async def test_every_blob_counts_at_least_the_minimum_charge(store: BlobStore) -> None:
    for name in ("t1", "t2"):
        await store.create(blob(name, size=0), quota_bytes=1000, min_charge_bytes=400)
    with pytest.raises(QuotaExceededError):
        await store.create(blob("t3", size=0), quota_bytes=1000, min_charge_bytes=400)
    assert await store.used_bytes("alice") == 0


async def test_concurrent_uploads_cannot_both_slip_under_the_quota(store: BlobStore) -> None:
    results = await asyncio.gather(
        *(store.create(blob(f"c{i}", size=400), quota_bytes=1000) for i in range(5)),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 2
    assert all(isinstance(r, QuotaExceededError) for r in results if r is not None)


async def test_blob_is_done_when_every_recipient_has_it(store: BlobStore) -> None:
    await store.create(blob("a1"), quota_bytes=1000)
    blob_id = blob("a1").blob_id
    assert not await store.mark_downloaded(blob_id, "bob")
    assert not await store.mark_downloaded(blob_id, "mallory")  # not a recipient: no effect
    assert await store.mark_downloaded(blob_id, "carol")


async def test_expiry_picks_old_complete_blobs_and_stale_uploads(store: BlobStore) -> None:
    for name, at, complete in (("old", 100, True), ("new", 900, True), ("stale", 500, False)):
        await store.create(blob(name, at=at), quota_bytes=10_000)
        if complete:
            await store.mark_complete(blob(name).blob_id)
    expired = await store.expired(complete_before_ms=200, incomplete_before_ms=600)
    assert sorted(expired) == sorted([blob("old").blob_id, blob("stale").blob_id])


async def test_the_sweep_deletes_expired_blobs_and_their_files(tmp_path: Path) -> None:
    limits = Limits(blob_expiry_days=7.0, blob_upload_ttl_s=3600.0)
    storage = await open_storage(Settings(limits=limits), tmp_path)
    service = BlobService(limits, storage.blobs, storage.blob_folder, storage.blob_content)
    try:
        now = 100 * DAY_MS
        for name, age_ms in (("old", 8 * DAY_MS), ("young", 6 * DAY_MS)):
            record = blob(name, at=now - age_ms)
            await service.store.create(record, quota_bytes=10_000)
            await service.store.mark_complete(record.blob_id)
            (service.folder / record.blob_id).write_bytes(b"ciphertext")
        assert await service.sweep(now_ms=now) == 1
        assert not (service.folder / blob("old").blob_id).exists()
        assert (service.folder / blob("young").blob_id).exists()
        assert await service.store.get(blob("old").blob_id) is None
        assert await service.sweep(now_ms=now + 2 * DAY_MS) == 1
        assert list(service.folder.iterdir()) == []
    finally:
        await service.close()
        await storage.admin.close()
        await storage.close()


@pytest.fixture(params=["files", "postgres"])
async def content(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[BlobContent, BlobStore]]:
    """Where finished blobs live: a single server's files, or a cluster's PostgreSQL."""
    if request.param == "files":
        sqlite = SQLiteStore(tmp_path / "bastion.db")
        yield LocalBlobFiles(tmp_path), await SQLiteBlobStore.open(sqlite)
        await sqlite.close()
        return
    await postgres_or_skip()
    schema = fresh_schema()
    pg = await PgStore.connect(f"{POSTGRES_URL}?schema={schema}")
    try:
        yield PgBlobContent(pg), PgBlobStore(pg)
    finally:
        await pg.close()
        await drop_schema(schema)


async def _published(
    content: BlobContent, store: BlobStore, folder: Path, name: str, data: bytes
) -> str:
    record = blob(name, size=len(data))
    await store.create(record, quota_bytes=100 * PIECE_BYTES)
    partial = folder / f"{record.blob_id}.part"
    partial.write_bytes(data)
    fd = os.open(partial, os.O_RDWR)
    await content.publish(record.blob_id, partial, fd)
    assert not partial.exists()  # the upload's file is consumed
    with pytest.raises(OSError):
        os.fstat(fd)  # and closed
    await store.mark_complete(record.blob_id)
    return record.blob_id


async def test_any_range_of_a_published_blob_reads_back_exactly(
    content: tuple[BlobContent, BlobStore], tmp_path: Path
) -> None:
    files, store = content
    data = os.urandom(2 * PIECE_BYTES + PIECE_BYTES // 2 + 3)
    blob_id = await _published(files, store, tmp_path, "big", data)
    chunk = 64 * 1024
    for offset in (0, 1, PIECE_BYTES - 100, 2 * PIECE_BYTES - 1, len(data) - 10, len(data)):
        assert await files.read(blob_id, offset, chunk) == data[offset : offset + chunk]
    # Straight through, as a download does, and resumed from the middle.
    got = b"".join([await files.read(blob_id, o, chunk) or b"" for o in range(0, len(data), chunk)])
    assert got == data
    empty = await _published(files, store, tmp_path, "empty", b"")
    assert await files.read(empty, 0, 0) == b""
    await files.remove(blob_id)
    assert await files.read(blob_id, 0, chunk) is None
    assert await files.read(blob("never").blob_id, 0, chunk) is None


async def test_a_deleted_blob_takes_its_content_with_it(
    content: tuple[BlobContent, BlobStore], tmp_path: Path
) -> None:
    files, store = content
    blob_id = await _published(files, store, tmp_path, "gone", os.urandom(1000))
    if isinstance(files, LocalBlobFiles):
        await files.remove(blob_id)  # a file is not in the database: the service removes both
    await store.delete(blob_id)  # in PostgreSQL the pieces go with the record
    assert await files.read(blob_id, 0, 1000) is None
    assert await store.get(blob_id) is None


async def test_uploads_cut_off_by_a_stop_are_removed_when_the_node_starts(tmp_path: Path) -> None:
    folder = tmp_path / "blobs"
    folder.mkdir()
    (folder / f"{blob('cut').blob_id}.part").write_bytes(b"half an upload")
    (folder / blob("kept").blob_id).write_bytes(b"a finished blob")
    storage = await open_storage(Settings(), tmp_path)
    try:
        assert sorted(p.name for p in folder.iterdir()) == [blob("kept").blob_id]
    finally:
        await storage.admin.close()
        await storage.close()
