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

import contextlib
import functools
import hmac
import logging
import os
import secrets

from bastion.errors import StorageError
from bastion.protocol import frames
from bastion.protocol.codes import ErrorCode
from bastion.server.handlers._context import Route, Services
from bastion.server.handlers._request import Request
from bastion.server.handlers._services import BlobService, Upload
from bastion.server.storage.blobs import (
    BlobRecord,
    QuotaExceededError,
)

log = logging.getLogger("bastion.server.handlers.blobs")

ON_CLOSE_KEY = "files"
MIB = 1024 * 1024
MIN_CHARGE_BYTES = 64 * 1024
MAX_UPLOADS_PER_ACCOUNT = 8

REFUSAL_MESSAGES = {
    ErrorCode.FILE_TRANSFER_OFF: "file transfer is turned off on this server",
    ErrorCode.QUOTA_EXCEEDED: "your stored files would exceed your quota on this server",
}


def ciphertext_cap(max_file_mb: int) -> int:
    """The largest blob accepted for a policy of ``max_file_mb``: the file plus its tags."""
    plain = max_file_mb * MIB
    return plain + plain // 1024 + 4096


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
    service.uploads[blob_id] = Upload(
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
