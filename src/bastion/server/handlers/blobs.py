"""File blobs on the server: streamed upload and resumable download over the signed-in connection.

A blob is ciphertext made by the sending client (see :mod:`bastion.files.cipher`);
the key never reaches the server, which only ever stores and serves bytes it
cannot read. The flow, every step on an authenticated connection:

* ``BlobBegin{size, sha256, recipients}`` -> ``BlobStarted{blob_id}``: refused
  when the organisation turned file transfer off, when ``size`` is over the
  policy's ``max_file_mb``, or when the owner's quota would be exceeded;
* ``BlobChunk{blob_id, offset, data}`` -> ``Ok``: pieces of at most 64 KiB, in
  order; the declared size is enforced while streaming;
* ``BlobEnd{blob_id}`` -> ``Ok``: the size and SHA-256 must be the declared
  ones; then the blob can be read by its owner and its recipients only;
* ``BlobGet{blob_id, offset}`` -> ``BlobData``: any offset, so downloads resume;
* ``BlobDone{blob_id}`` -> ``Ok``: once every recipient said so, it is deleted.

An account has at most 8 uploads in progress on a node, a node at most
``blob_uploads_max``, and each blob counts at least 64 KiB against its quota.
An upload in progress is a file ``DATA/blobs/<id>.part`` (0600), open on the
node receiving it, and belongs to the connection that began it: when that
connection closes, or no piece arrives for ``blob_upload_idle_s``, the upload is
dropped with its file, descriptor and record (so its quota is free again). A finished blob is
the file ``DATA/blobs/<id>`` on a single server (:class:`LocalBlobFiles`), and
1 MiB pieces in PostgreSQL in a cluster (:class:`PgBlobContent`), so that every
node can serve it. A periodic sweep deletes blobs older than
``blob_expiry_days`` and uploads unfinished after ``blob_upload_ttl_s``.
Refusals are audited (``upload.blocked``), never with content.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from bastion.errors import StorageError
from bastion.protocol import frames
from bastion.protocol.codes import ErrorCode
from bastion.server.config import Limits
from bastion.server.handlers._context import Request, Route, Services
from bastion.server.storage.blob_content import BlobContent
from bastion.server.storage.blobs import (
    BlobRecord,
    BlobStore,
    QuotaExceededError,
)

log = logging.getLogger("bastion.server.handlers.blobs")

ON_CLOSE_KEY = "files"
MIB = 1024 * 1024
DAY_MS = 86_400_000
MIN_CHARGE_BYTES = 64 * 1024
MAX_UPLOADS_PER_ACCOUNT = 8
_RECORD_CACHE_S = 5.0
_RECORD_CACHE_MAX = 1024

REFUSAL_MESSAGES = {
    ErrorCode.FILE_TRANSFER_OFF: "file transfer is turned off on this server",
    ErrorCode.QUOTA_EXCEEDED: "your stored files would exceed your quota on this server",
}


def ciphertext_cap(max_file_mb: int) -> int:
    """The largest blob accepted for a policy of ``max_file_mb``: the file plus its tags."""
    plain = max_file_mb * MIB
    return plain + plain // 1024 + 4096


@dataclass
class _Upload:
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
        self.uploads: dict[str, _Upload] = {}
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


def _refuse_upload(
    request: Request, req: int, user: str, code: ErrorCode, message: str, *, services: Services
) -> None:
    services.audit.event("upload.blocked", reason=code, user=user, address=request.address)
    request.refuse(req, code, message)


async def blob_begin(request: Request, services: Services, frame: frames.BlobBegin) -> None:
    """Accept (or refuse) a new upload."""
    username, _ = request.signed_in()
    policy = services.admin.policy
    if not policy.file_transfer:
        _refuse_upload(
            request,
            frame.req,
            username,
            ErrorCode.FILE_TRANSFER_OFF,
            REFUSAL_MESSAGES[ErrorCode.FILE_TRANSFER_OFF],
            services=services,
        )
        return
    if frame.size > ciphertext_cap(policy.max_file_mb):
        _refuse_upload(
            request,
            frame.req,
            username,
            ErrorCode.FILE_TOO_LARGE,
            f"files larger than {policy.max_file_mb} MB are not accepted on this server",
            services=services,
        )
        return
    recipients = sorted({user for user in frame.recipients if user != username})
    if not recipients:
        request.refuse(
            frame.req, ErrorCode.BAD_RECIPIENT, "a file needs a recipient other than you"
        )
        return
    for user in recipients:
        if await services.storage.relay.get_account(user) is None:
            request.refuse(frame.req, ErrorCode.UNKNOWN_USER, f"there is no user named {user}")
            return
    service = services.blobs
    if service.in_progress(username) >= MAX_UPLOADS_PER_ACCOUNT:
        services.limit_log.hit("uploads_per_account", username)
        request.refuse(
            frame.req, ErrorCode.RATE_LIMITED, "too many uploads at once; finish one first"
        )
        return
    if service.in_progress() >= services.limits.blob_uploads_max:
        services.limit_log.hit("uploads_in_progress", username)
        request.refuse(
            frame.req,
            ErrorCode.RATE_LIMITED,
            "the server has too many uploads in progress; try later",
        )
        return
    service.starting[username] = service.starting.get(username, 0) + 1
    try:
        await _start_upload(request, services, frame, username, recipients)
    finally:
        left = service.starting.pop(username) - 1
        if left:
            service.starting[username] = left


async def _start_upload(
    request: Request,
    services: Services,
    frame: frames.BlobBegin,
    username: str,
    recipients: list[str],
) -> None:
    """Create the upload's record (charging the quota) and its partial file."""
    service = services.blobs
    blob_id = secrets.token_hex(16)
    record = BlobRecord(
        blob_id=blob_id,
        owner=username,
        size=frame.size,
        sha256=frame.sha256,
        created_at=services.clock.now_ms(),
        complete=False,
        recipients=tuple(recipients),
    )
    try:
        await service.store.create(
            record,
            quota_bytes=services.limits.blob_quota_mb * MIB,
            min_charge_bytes=MIN_CHARGE_BYTES,
        )
    except QuotaExceededError:
        _refuse_upload(
            request,
            frame.req,
            username,
            ErrorCode.QUOTA_EXCEEDED,
            REFUSAL_MESSAGES[ErrorCode.QUOTA_EXCEEDED],
            services=services,
        )
        return
    partial = service.folder / f"{blob_id}.part"
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        await service.store.delete(blob_id)
        raise StorageError(f"cannot store the file: {exc.strerror}") from None
    service.uploads[blob_id] = _Upload(
        owner=username,
        size=frame.size,
        sha256=frame.sha256,
        fd=fd,
        path=partial,
        connection=request,
        active_at=services.clock.monotonic(),
    )
    # An upload is not resumed from another connection: one that closes lets go of its
    # uploads at once (descriptor, partial file, quota), not after blob_upload_ttl_s.
    request.on_close(ON_CLOSE_KEY, functools.partial(service.release_connection, request))
    if request.closed:  # it closed while the record was being written
        service.release_connection(request)
        return
    request.reply(frames.BlobStarted(req=frame.req, blob_id=blob_id))


async def blob_chunk(request: Request, services: Services, frame: frames.BlobChunk) -> None:
    """Append one piece to an upload. Runs to the end without awaiting, so pieces keep order."""
    username, _ = request.signed_in()
    service = services.blobs
    upload = service.uploads.get(frame.blob_id)
    if upload is None or upload.owner != username:
        request.refuse(frame.req, ErrorCode.UNKNOWN_BLOB, "no such upload in progress")
        return
    if not services.admin.policy.file_transfer:
        service.abort_upload(frame.blob_id)
        _refuse_upload(
            request,
            frame.req,
            username,
            ErrorCode.FILE_TRANSFER_OFF,
            REFUSAL_MESSAGES[ErrorCode.FILE_TRANSFER_OFF],
            services=services,
        )
        return
    if frame.offset != upload.written:
        request.refuse(
            frame.req, ErrorCode.BAD_OFFSET, f"the upload continues at byte {upload.written}"
        )
        return
    if upload.written + len(frame.data) > upload.size:
        service.abort_upload(frame.blob_id)
        _refuse_upload(
            request,
            frame.req,
            username,
            ErrorCode.FILE_TOO_LARGE,
            "the upload is longer than announced",
            services=services,
        )
        return
    try:
        view = memoryview(frame.data)
        while view:
            view = view[os.write(upload.fd, view) :]
    except OSError as exc:
        service.abort_upload(frame.blob_id)
        raise StorageError(f"cannot store the file: {exc.strerror}") from None
    upload.digest.update(frame.data)
    upload.written += len(frame.data)
    upload.active_at = services.clock.monotonic()
    request.reply(frames.Ok(req=frame.req))


async def blob_end(request: Request, services: Services, frame: frames.BlobEnd) -> None:
    """Check a finished upload and make it available."""
    username, _ = request.signed_in()
    service = services.blobs
    upload = service.uploads.get(frame.blob_id)
    if upload is None or upload.owner != username:
        request.refuse(frame.req, ErrorCode.UNKNOWN_BLOB, "no such upload in progress")
        return
    del service.uploads[frame.blob_id]
    if upload.written != upload.size or not hmac.compare_digest(
        upload.digest.digest(), upload.sha256
    ):
        with contextlib.suppress(OSError):
            os.close(upload.fd)
        upload.path.unlink(missing_ok=True)
        await service.store.delete(frame.blob_id)
        request.refuse(
            frame.req, ErrorCode.BLOB_MISMATCH, "the upload's size or hash is not the announced one"
        )
        return
    try:
        await service.content.publish(frame.blob_id, upload.path, upload.fd)
    except StorageError:
        await service.store.delete(frame.blob_id)
        raise
    await service.store.mark_complete(frame.blob_id)
    request.reply(frames.Ok(req=frame.req))


async def _readable(
    request: Request, services: Services, blob_id: str
) -> tuple[BlobService, BlobRecord] | None:
    username, _ = request.signed_in()
    service = services.blobs
    record = await service.record(blob_id)
    if (
        record is None
        or not record.complete
        or (username != record.owner and username not in record.recipients)
    ):
        return None
    return service, record


async def blob_get(request: Request, services: Services, frame: frames.BlobGet) -> None:
    """Serve up to 64 KiB of a blob from any offset (to its owner and recipients only)."""
    found = await _readable(request, services, frame.blob_id)
    if found is None:
        request.refuse(frame.req, ErrorCode.UNKNOWN_BLOB, "no such file, or it has expired")
        return
    service, record = found
    if frame.offset > record.size:
        request.refuse(frame.req, ErrorCode.BAD_OFFSET, "the offset is past the end of the file")
        return
    length = min(frames.MAX_BLOB_CHUNK_BYTES, record.size - frame.offset)
    data = await service.content.read(frame.blob_id, frame.offset, length)
    if data is None:
        request.refuse(frame.req, ErrorCode.UNKNOWN_BLOB, "no such file, or it has expired")
        return
    request.reply(
        frames.BlobData(
            req=frame.req,
            blob_id=frame.blob_id,
            offset=frame.offset,
            size=record.size,
            data=data,
        )
    )


async def blob_done(request: Request, services: Services, frame: frames.BlobDone) -> None:
    """A recipient has the blob; the last one to say so deletes it."""
    username, _ = request.signed_in()
    found = await _readable(request, services, frame.blob_id)
    if found is None:
        request.refuse(frame.req, ErrorCode.UNKNOWN_BLOB, "no such file, or it has expired")
        return
    service, record = found
    if username in record.recipients and await service.store.mark_downloaded(
        frame.blob_id, username
    ):
        await service.delete(frame.blob_id)
    request.reply(frames.Ok(req=frame.req))


ROUTES = (
    Route(frames.BlobBegin, blob_begin),
    Route(frames.BlobChunk, blob_chunk),
    Route(frames.BlobEnd, blob_end),
    Route(frames.BlobGet, blob_get),
    Route(frames.BlobDone, blob_done),
)
