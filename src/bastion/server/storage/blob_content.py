"""Where finished blobs' ciphertext is kept: a file each on a single server, pieces in PostgreSQL.

Both hold only the ciphertext the sending client made; the server cannot read it.
See :mod:`bastion.server.handlers.blobs` for the upload and download flow.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from bastion.errors import StorageError

if TYPE_CHECKING:
    from bastion.server.storage.postgres.relay import PgStore

MIB = 1024 * 1024
PIECE_BYTES = MIB  # a cluster's blobs are stored in pieces of this size


def discard(path: Path) -> None:
    """Remove a file if it is there (one metadata operation; fine on the event loop)."""
    path.unlink(missing_ok=True)


class BlobContent(Protocol):
    """Where finished blobs' ciphertext is kept. Methods raise :class:`StorageError`."""

    async def publish(self, blob_id: str, partial: Path, fd: int) -> None:
        """Make a finished upload durable as the blob's content.

        ``fd`` is the upload's file, open on ``partial``; both are consumed
        (closed and removed) whether or not this succeeds.
        """
        ...

    async def read(self, blob_id: str, offset: int, length: int) -> bytes | None:
        """Up to ``length`` bytes from ``offset``; None if the blob has no content (any more)."""
        ...

    async def remove(self, blob_id: str) -> None:
        """Delete the blob's content (nothing if there is none)."""
        ...


class LocalBlobFiles:
    """A single server's blobs: one file each in its data folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, blob_id: str) -> Path:
        """Where a complete blob's ciphertext is kept."""
        return self.folder / blob_id

    async def publish(self, blob_id: str, partial: Path, fd: int) -> None:
        """fsync the upload and rename it into place."""
        try:
            try:
                await asyncio.to_thread(os.fsync, fd)
            finally:
                os.close(fd)
            os.replace(partial, self.path(blob_id))
        except OSError as exc:
            discard(partial)
            raise StorageError(f"cannot store the file: {exc.strerror}") from None

    async def read(self, blob_id: str, offset: int, length: int) -> bytes | None:
        """Read from the blob's file."""
        try:
            fd = os.open(self.path(blob_id), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read the file: {exc.strerror}") from None
        try:
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise StorageError(f"cannot read the file: {exc.strerror}") from None
        finally:
            os.close(fd)

    async def remove(self, blob_id: str) -> None:
        """Delete the blob's file."""
        discard(self.path(blob_id))


class PgBlobContent:
    """A cluster's blobs: pieces of :data:`PIECE_BYTES` in PostgreSQL, readable from every node.

    A blob's pieces are written in one transaction before it is marked
    complete, so no node ever serves half of one; they go with the blob's record.
    """

    def __init__(self, store: PgStore) -> None:
        self._store = store

    async def publish(self, blob_id: str, partial: Path, fd: int) -> None:
        """Copy the upload into PostgreSQL piece by piece (durable at commit), drop the file."""
        try:
            os.close(fd)  # opened for writing; the copy reads through its own descriptor
            reader = os.open(partial, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            discard(partial)
            raise StorageError(f"cannot store the file: {exc.strerror}") from None
        try:
            async with self._store.connection() as conn, conn.transaction():
                piece = 0
                while data := await asyncio.to_thread(
                    os.pread, reader, PIECE_BYTES, piece * PIECE_BYTES
                ):
                    await conn.execute(
                        "INSERT INTO blob_pieces (blob_id, piece, data) VALUES ($1, $2, $3)",
                        blob_id,
                        piece,
                        data,
                    )
                    piece += 1
        finally:
            os.close(reader)
            discard(partial)

    async def read(self, blob_id: str, offset: int, length: int) -> bytes | None:
        """Read the slices of the pieces that hold the range (only those slices leave the disk)."""
        if length <= 0:
            return b""  # the end of the blob (an empty blob has no pieces at all)
        first, last = offset // PIECE_BYTES, (offset + length - 1) // PIECE_BYTES
        async with self._store.connection() as conn:
            rows = await conn.fetch(
                "SELECT substring(data FROM greatest($3::bigint - piece::bigint * $5, 0)::int + 1"
                " FOR $4) AS part FROM blob_pieces"
                " WHERE blob_id = $1 AND piece BETWEEN $2 AND $6 ORDER BY piece",
                blob_id,
                first,
                offset,
                length,
                PIECE_BYTES,
                last,
            )
        if not rows:
            return None
        return b"".join(row["part"] for row in rows)[:length]

    async def remove(self, blob_id: str) -> None:
        """Delete the blob's pieces."""
        async with self._store.connection() as conn:
            await conn.execute("DELETE FROM blob_pieces WHERE blob_id = $1", blob_id)
