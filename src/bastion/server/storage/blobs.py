"""Where the server keeps what it knows about file blobs: owner, size, hash, recipients.

The ciphertext itself lives in files under the data folder (see
:mod:`bastion.server.handlers.blobs`); this store holds the metadata that decides who may
read a blob, how much of an owner's quota it uses and when it expires. Two
implementations behind one :class:`BlobStore` protocol: SQLite (inside the
relay's own database file, in its group commit) and PostgreSQL (migration
``0004_blobs.sql``).

The quota check and the insert run in one transaction, so two uploads started
at once cannot both slip under the quota. Each blob counts at least
``min_charge_bytes`` against it, so the quota also bounds how many blobs (rows
and files) one account can leave on the server.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from bastion.errors import StorageError

if TYPE_CHECKING:
    from bastion.server.storage.postgres.relay import PgStore
    from bastion.server.storage.sqlite.relay import SQLiteStore

SQLITE_TABLES = (
    "CREATE TABLE IF NOT EXISTS blobs ("
    " blob_id TEXT PRIMARY KEY, owner TEXT NOT NULL, size INTEGER NOT NULL,"
    " sha256 BLOB NOT NULL, created_at INTEGER NOT NULL, complete INTEGER NOT NULL DEFAULT 0)",
    "CREATE INDEX IF NOT EXISTS blobs_by_owner ON blobs (owner)",
    "CREATE INDEX IF NOT EXISTS blobs_by_age ON blobs (created_at)",
    "CREATE TABLE IF NOT EXISTS blob_recipients ("
    " blob_id TEXT NOT NULL, username TEXT NOT NULL, downloaded INTEGER NOT NULL DEFAULT 0,"
    " PRIMARY KEY (blob_id, username))",
)


class QuotaExceededError(StorageError):
    """The owner's stored blobs plus the new one would exceed the quota."""


@dataclass(frozen=True, slots=True)
class BlobRecord:
    """One blob as the server knows it (never its content's meaning: it is ciphertext)."""

    blob_id: str
    owner: str
    size: int
    sha256: bytes
    created_at: int
    complete: bool
    recipients: tuple[str, ...]


class BlobStore(Protocol):
    """Metadata of blobs; every method raises :class:`StorageError` on database failure."""

    async def create(
        self, blob: BlobRecord, *, quota_bytes: int, min_charge_bytes: int = 0
    ) -> None:
        """Record a new (incomplete) blob; raises :class:`QuotaExceededError`.

        Every blob of the owner, this one included, counts as at least
        ``min_charge_bytes``.
        """

    async def get(self, blob_id: str) -> BlobRecord | None:
        """The blob, or None."""

    async def mark_complete(self, blob_id: str) -> None:
        """The upload finished and checked out: the blob may be downloaded."""

    async def mark_downloaded(self, blob_id: str, username: str) -> bool:
        """Record that a recipient has the blob; True once every recipient has it."""

    async def delete(self, blob_id: str) -> None:
        """Forget a blob (its file is removed by the caller)."""

    async def expired(self, *, complete_before_ms: int, incomplete_before_ms: int) -> list[str]:
        """Ids of complete blobs created before the first time, incomplete before the second."""

    async def used_bytes(self, owner: str) -> int:
        """Bytes of the owner's blobs counted against the quota."""


def _record(row: Sequence[object], recipients: Sequence[str]) -> BlobRecord:
    blob_id, owner, size, sha256, created_at, complete = row
    return BlobRecord(
        blob_id=str(blob_id),
        owner=str(owner),
        size=int(str(size)),
        sha256=bytes(sha256),  # type: ignore[call-overload]
        created_at=int(str(created_at)),
        complete=bool(complete),
        recipients=tuple(recipients),
    )


_COLUMNS = "blob_id, owner, size, sha256, created_at, complete"


class SQLiteBlobStore:
    """:class:`BlobStore` in the relay's SQLite file, run on its database thread."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    @classmethod
    async def open(cls, store: SQLiteStore) -> SQLiteBlobStore:
        """Create the tables if needed."""
        await store.ensure_tables(SQLITE_TABLES)
        return cls(store)

    async def create(
        self, blob: BlobRecord, *, quota_bytes: int, min_charge_bytes: int = 0
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            used = conn.execute(
                "SELECT COALESCE(SUM(MAX(size, ?)), 0) FROM blobs WHERE owner = ?",
                (min_charge_bytes, blob.owner),
            ).fetchone()[0]
            if used + max(blob.size, min_charge_bytes) > quota_bytes:
                raise QuotaExceededError("the upload would exceed the quota")
            conn.execute(
                f"INSERT INTO blobs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",  # noqa: S608
                (blob.blob_id, blob.owner, blob.size, blob.sha256, blob.created_at, 0),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO blob_recipients (blob_id, username) VALUES (?, ?)",
                [(blob.blob_id, user) for user in blob.recipients],
            )

        await self._store.run(op)

    async def get(self, blob_id: str) -> BlobRecord | None:
        def op(conn: sqlite3.Connection) -> BlobRecord | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM blobs WHERE blob_id = ?",  # noqa: S608
                (blob_id,),
            ).fetchone()
            if row is None:
                return None
            users = conn.execute(
                "SELECT username FROM blob_recipients WHERE blob_id = ? ORDER BY username",
                (blob_id,),
            ).fetchall()
            return _record(row, [u[0] for u in users])

        return await self._store.run(op)

    async def mark_complete(self, blob_id: str) -> None:
        await self._store.run(
            lambda conn: conn.execute("UPDATE blobs SET complete = 1 WHERE blob_id = ?", (blob_id,))
        )

    async def mark_downloaded(self, blob_id: str, username: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            conn.execute(
                "UPDATE blob_recipients SET downloaded = 1 WHERE blob_id = ? AND username = ?",
                (blob_id, username),
            )
            left = conn.execute(
                "SELECT count(*) FROM blob_recipients WHERE blob_id = ? AND downloaded = 0",
                (blob_id,),
            ).fetchone()[0]
            return int(left) == 0

        return await self._store.run(op)

    async def delete(self, blob_id: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM blob_recipients WHERE blob_id = ?", (blob_id,))
            conn.execute("DELETE FROM blobs WHERE blob_id = ?", (blob_id,))

        await self._store.run(op)

    async def expired(self, *, complete_before_ms: int, incomplete_before_ms: int) -> list[str]:
        def op(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT blob_id FROM blobs WHERE (complete = 1 AND created_at < ?)"
                " OR (complete = 0 AND created_at < ?)",
                (complete_before_ms, incomplete_before_ms),
            ).fetchall()
            return [str(r[0]) for r in rows]

        return await self._store.run(op)

    async def used_bytes(self, owner: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT COALESCE(SUM(size), 0) FROM blobs WHERE owner = ?", (owner,)
            ).fetchone()
            return int(row[0])

        return await self._store.run(op)


class PgBlobStore:
    """:class:`BlobStore` in the cluster's PostgreSQL schema (tables from migration 0004)."""

    def __init__(self, store: PgStore) -> None:
        self._store = store

    async def create(
        self, blob: BlobRecord, *, quota_bytes: int, min_charge_bytes: int = 0
    ) -> None:
        async with self._store.connection() as conn, conn.transaction():
            # One owner's uploads are serialised so the quota holds across nodes.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", "blobs:" + blob.owner)
            used = await conn.fetchval(
                "SELECT COALESCE(SUM(GREATEST(size, $2)), 0) FROM blobs WHERE owner = $1",
                blob.owner,
                min_charge_bytes,
            )
            if int(used) + max(blob.size, min_charge_bytes) > quota_bytes:
                raise QuotaExceededError("the upload would exceed the quota")
            await conn.execute(
                f"INSERT INTO blobs ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, false)",  # noqa: S608
                blob.blob_id,
                blob.owner,
                blob.size,
                blob.sha256,
                blob.created_at,
            )
            await conn.executemany(
                "INSERT INTO blob_recipients (blob_id, username) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING",
                [(blob.blob_id, user) for user in blob.recipients],
            )

    async def get(self, blob_id: str) -> BlobRecord | None:
        async with self._store.connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM blobs WHERE blob_id = $1",  # noqa: S608
                blob_id,
            )
            if row is None:
                return None
            users = await conn.fetch(
                "SELECT username FROM blob_recipients WHERE blob_id = $1 ORDER BY username",
                blob_id,
            )
        return _record(tuple(row), [str(u["username"]) for u in users])

    async def mark_complete(self, blob_id: str) -> None:
        async with self._store.connection() as conn:
            await conn.execute("UPDATE blobs SET complete = true WHERE blob_id = $1", blob_id)

    async def mark_downloaded(self, blob_id: str, username: str) -> bool:
        async with self._store.connection() as conn, conn.transaction():
            await conn.execute(
                "UPDATE blob_recipients SET downloaded = true WHERE blob_id = $1 AND username = $2",
                blob_id,
                username,
            )
            left = await conn.fetchval(
                "SELECT count(*) FROM blob_recipients WHERE blob_id = $1 AND NOT downloaded",
                blob_id,
            )
        return int(left) == 0

    async def delete(self, blob_id: str) -> None:
        async with self._store.connection() as conn, conn.transaction():
            await conn.execute("DELETE FROM blob_recipients WHERE blob_id = $1", blob_id)
            await conn.execute("DELETE FROM blobs WHERE blob_id = $1", blob_id)

    async def expired(self, *, complete_before_ms: int, incomplete_before_ms: int) -> list[str]:
        async with self._store.connection() as conn:
            rows = await conn.fetch(
                "SELECT blob_id FROM blobs WHERE (complete AND created_at < $1)"
                " OR (NOT complete AND created_at < $2)",
                complete_before_ms,
                incomplete_before_ms,
            )
        return [str(r["blob_id"]) for r in rows]

    async def used_bytes(self, owner: str) -> int:
        async with self._store.connection() as conn:
            used = await conn.fetchval(
                "SELECT COALESCE(SUM(size), 0) FROM blobs WHERE owner = $1", owner
            )
        return int(used)
