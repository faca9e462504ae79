"""The per-node state of the handler features, built once by ``server/app.py``.

Each lives in :class:`~bastion.server.handlers._context.Services` and is shared
by every connection of the node: who is online here (contacts), the group
creation limit and departures (groups), uploads in progress and the sweep
(blobs). Connections appear only as :class:`Request`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from bastion.errors import StorageError
from bastion.ratelimit import RateLimiter
from bastion.server.config import Limits
from bastion.server.handlers._request import Request
from bastion.server.storage.blob_content import BlobContent
from bastion.server.storage.blobs import BlobRecord, BlobStore
from bastion.server.storage.contacts import ContactStore
from bastion.server.storage.groups import GroupStore

log = logging.getLogger("bastion.server.handlers.blobs")

DAY_MS = 86_400_000
_RECORD_CACHE_S = 5.0
_RECORD_CACHE_MAX = 1024


@dataclass
class ContactService:
    """Per-server state: the store, and who is connected here."""

    store: ContactStore
    online: dict[str, set[Request]] = field(default_factory=dict)  # on this node
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


@dataclass
class GroupService:
    """Per-server state of the group feature: its store, the creation rate limit, and
    where each recently asking former member left (so a fetch does not scan the chain)."""

    store: GroupStore
    creations: RateLimiter[str]
    # (group id, user) -> (head seq when looked up, seq of the change that ended membership)
    departures: dict[tuple[bytes, str], tuple[int, int]] = field(default_factory=dict)


@dataclass
class Upload:
    owner: str
    size: int
    sha256: bytes
    fd: int
    path: Path
    connection: Request  # the upload lives and dies with it
    active_at: float  # monotonic time of the last piece (or of the start)
    written: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)


class BlobService:
    """This node's uploads in progress, where finished blobs are kept, and the sweep."""

    def __init__(
        self, limits: Limits, store: BlobStore, folder: Path, content: BlobContent
    ) -> None:
        self.limits = limits
        self.store = store
        self.folder = folder
        self.content = content
        self.uploads: dict[str, Upload] = {}
        self.starting: dict[str, int] = {}  # owner -> uploads between their checks and start
        self._records: dict[str, tuple[float, BlobRecord]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._deletions: set[asyncio.Task[None]] = set()

    def in_progress(self, owner: str | None = None) -> int:
        """Uploads in progress or starting on this node: all of them, or ``owner``'s."""
        if owner is None:
            return len(self.uploads) + sum(self.starting.values())
        mine = sum(u.owner == owner for u in self.uploads.values())
        return mine + self.starting.get(owner, 0)

    def drop_upload(self, blob_id: str) -> None:
        """Abort an upload in progress and delete its record, freeing its quota (in a task)."""
        if blob_id not in self.uploads:
            return
        self.abort_upload(blob_id)
        self._records.pop(blob_id, None)
        task = asyncio.get_running_loop().create_task(self._delete_record(blob_id))
        self._deletions.add(task)
        task.add_done_callback(self._deletions.discard)

    async def _delete_record(self, blob_id: str) -> None:
        try:
            await self.store.delete(blob_id)
        except StorageError as exc:  # the sweep deletes it after blob_upload_ttl_s
            log.warning("blobs.delete_failed", extra={"error": str(exc)})

    def release_connection(self, request: Request) -> None:
        """Drop every upload of a connection that closed: its descriptors, files and quota."""
        for blob_id in [b for b, u in self.uploads.items() if u.connection is request]:
            self.drop_upload(blob_id)

    def reap_idle(self, now: float) -> int:
        """Drop uploads that received nothing for ``blob_upload_idle_s``; returns how many."""
        idle_s = self.limits.blob_upload_idle_s
        stale = [b for b, u in self.uploads.items() if now - u.active_at > idle_s]
        for blob_id in stale:
            self.drop_upload(blob_id)
        if stale:
            log.info("blobs.idle_uploads_dropped", extra={"count": len(stale)})
        return len(stale)

    async def record(self, blob_id: str) -> BlobRecord | None:
        """A complete blob's record, cached a few seconds (downloads ask once per chunk)."""
        now = time.monotonic()
        cached = self._records.get(blob_id)
        if cached is not None and now - cached[0] < _RECORD_CACHE_S:
            return cached[1]
        record = await self.store.get(blob_id)
        if record is not None and record.complete:
            if len(self._records) >= _RECORD_CACHE_MAX:
                self._records.clear()
            self._records[blob_id] = (now, record)
        return record

    def abort_upload(self, blob_id: str) -> None:
        """Drop an upload in progress and its partial file (its record goes in the sweep)."""
        upload = self.uploads.pop(blob_id, None)
        if upload is not None:
            with contextlib.suppress(OSError):
                os.close(upload.fd)
            upload.path.unlink(missing_ok=True)

    async def delete(self, blob_id: str) -> None:
        """Delete a blob's content and record."""
        self.abort_upload(blob_id)
        self._records.pop(blob_id, None)
        await self.content.remove(blob_id)
        await self.store.delete(blob_id)

    async def sweep(self, *, now_ms: int) -> int:
        """Delete expired blobs and stale uploads; returns how many were deleted."""
        limits = self.limits
        expired = await self.store.expired(
            complete_before_ms=now_ms - int(limits.blob_expiry_days * DAY_MS),
            incomplete_before_ms=now_ms - int(limits.blob_upload_ttl_s * 1000),
        )
        for blob_id in expired:
            await self.delete(blob_id)
        if expired:
            log.info("blobs.expired", extra={"count": len(expired)})
        return len(expired)

    def start_sweeping(self) -> None:
        """Run :meth:`sweep` every ``blob_sweep_s`` seconds while the server runs."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def close(self) -> None:
        """Stop the sweep and drop uploads in progress."""
        for blob_id in list(self.uploads):
            self.abort_upload(blob_id)
        for task in (self._sweeper, self._reaper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._sweeper = self._reaper = None

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, self.limits.blob_upload_idle_s / 4))
            self.reap_idle(time.monotonic())

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep(now_ms=time.time_ns() // 1_000_000)
            except StorageError as exc:
                log.warning("blobs.sweep_failed", extra={"error": str(exc)})
            await asyncio.sleep(self.limits.blob_sweep_s)
