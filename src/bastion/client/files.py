"""Sending and receiving files: encrypt, upload, offer; download, verify, quarantine, scan, save.

Sending: the file is encrypted under a fresh key into a temporary file in the
profile (constant memory, :mod:`bastion.files.cipher`), the ciphertext is
uploaded as a blob (:mod:`bastion.server.handlers.blobs`), and a signed end-to-end
``file.offer`` payload tells the recipient the blob id, key, ciphertext hash
and size, the name and the claimed type.

Receiving: an offer is only recorded (never downloaded or opened on its own).
:func:`get_file` downloads the blob (resuming a partial download), checks its
size and SHA-256, keeps the ciphertext sealed in the quarantine folder inside
the profile (its key is only in the encrypted profile), decrypts it there for
the scan (:mod:`bastion.files.scan`, plus clamd when a socket is configured),
copies it to the folder the user chose only when the verdict is clean, and
deletes the plaintext whatever the verdict: a blocked, unscanned or failed file
stays only as ciphertext. The verdict is kept with the offer. ``allow_blocked``
decrypts the sealed file again and saves it anyway (mode 0600, never
executable); the front end must have asked the user first, and the decision is
logged in the profile.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import hashlib
import hmac
import logging
import mimetypes
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from bastion.client import group_messages
from bastion.client._util import check_username, now_ms
from bastion.client.events import Event, FeatureEvent
from bastion.client.feature import ClientCore, FeatureSpec, Hooks
from bastion.client.group_keys import GroupPlaintext
from bastion.client.records import DeviceEntry
from bastion.client.transport import ServerConnection
from bastion.crypto.payload import Payload
from bastion.errors import RejectedMessageError, ServerRefusedError, StorageError
from bastion.files.cipher import (
    HEADER_BYTES,
    TAG_BYTES,
    FileKey,
    encrypt_file,
)
from bastion.files.errors import FileIntegrityError
from bastion.files.names import extension_of, sanitize_filename
from bastion.files.quarantine import SEALED_PREFIX, Quarantine
from bastion.files.scan import Verdict, VerdictKind, scan_file
from bastion.groups.chain import GroupState
from bastion.protocol import frames

log = logging.getLogger("bastion.client.files")

OFFER_KIND = "file.offer"
CLAMD_SOCKET_ENV = "BASTION_CLAMD_SOCKET"
DEFAULT_WINDOW = 16
MAX_NAME_CHARS = 1024
MAX_TYPE_CHARS = 255
_INDEX = "files:index"
_OVERRIDES = "files:overrides"
_HASH_PIECE = 1024 * 1024

Progress = Callable[[int, int], None]

REFUSAL_SENTENCES = {
    "file_transfer_off": (
        "Your organisation has turned file transfer off on this server, so the file was not sent."
    ),
    "quota_exceeded": (
        "Your files waiting on the server would exceed your quota; the file was not sent. "
        "Try again once your recipients have downloaded earlier files."
    ),
}


class OfferBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The JSON body of a ``file.offer`` payload (inside the signed, encrypted message)."""

    v: Annotated[int, Meta(ge=1, le=1)] = 1
    blob: Annotated[str, Meta(pattern=r"^[0-9a-f]{32}\Z")]
    key: Annotated[bytes, Meta(min_length=32, max_length=32)]
    sha256: Annotated[bytes, Meta(min_length=32, max_length=32)]
    size: Annotated[int, Meta(ge=HEADER_BYTES + TAG_BYTES, le=frames.MAX_BLOB_BYTES)]
    plaintext_size: Annotated[int, Meta(ge=0, le=frames.MAX_BLOB_BYTES)]
    name: Annotated[str, Meta(max_length=MAX_NAME_CHARS)]
    type: Annotated[str, Meta(max_length=MAX_TYPE_CHARS)] | None = None


class FileRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A received file offer and what became of it, kept in the encrypted profile."""

    id: str
    sender: str
    device: str
    received_at: int
    blob: str
    key: bytes
    sha256: bytes
    size: int
    plaintext_size: int
    claimed_name: str
    name: str
    content_type: str | None
    state: str = "offered"  # offered | saved | saved_anyway | blocked | error | failed
    verdict: str | None = None
    reasons: list[str] = msgspec.field(default_factory=list)
    quarantined: str | None = None
    saved_to: str | None = None


class OverrideEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A blocked file the user chose to save anyway."""

    id: str
    at: int
    verdict: str
    reasons: list[str]


@dataclass(frozen=True, slots=True)
class FileEvent(FeatureEvent):
    """Someone offered a file; nothing is downloaded until the user asks."""

    id: str
    sender: str
    name: str
    size: int
    content_type: str | None
    at: int

    def to_json(self) -> dict[str, Any]:
        """``{"type": "file", "id", "from", "name", "size", "content_type", "at"}``."""
        return {
            "type": "file",
            "id": self.id,
            "from": self.sender,
            "name": self.name,
            "size": self.size,
            "content_type": self.content_type,
            "at": iso_time(self.at),
        }

    def describe(self) -> str:
        """One sentence for a person."""
        return (
            f"{self.sender} offers the file {self.name!r} ({human_size(self.size)}); "
            f"to download and check it: bastion file get {self.id}"
        )


@dataclass(frozen=True, slots=True)
class SentFile:
    """A file that was uploaded and offered."""

    offer_id: str
    blob: str
    name: str
    size: int


@dataclass(frozen=True, slots=True)
class FileResult:
    """The outcome of :func:`get_file`."""

    record: FileRecord
    verdict: Verdict
    saved_to: Path | None


def iso_time(ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC (as the other ``--json`` events)."""
    moment = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def human_size(size: int) -> str:
    """A byte count as a person reads it (``1.5 MB``)."""
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"


def install(client: ClientCore, hooks: Hooks) -> None:
    """Register the ``file.offer`` handlers for ``client``: sent directly, and in a group."""

    def on_offer(payload: Payload, sender: DeviceEntry, deliver: frames.Deliver) -> Event | None:
        return _record_offer(client, payload, deliver)

    def on_group_offer(plaintext: GroupPlaintext, deliver: frames.Deliver) -> Event | None:
        # None for our own offer seen on another of our devices.
        return record_offer(
            client,
            sender=plaintext.sender,
            device=plaintext.sender_device,
            message_id=plaintext.message_id,
            body=plaintext.body,
            at=deliver.server_ts,
        )

    hooks.payloads.add(OFFER_KIND, on_offer)
    hooks.group_payloads.add(OFFER_KIND, on_group_offer)


FEATURE = FeatureSpec("files", install)


def parse_offer(text: str) -> OfferBody:
    """Decode the body of a ``file.offer`` payload; raises :class:`RejectedMessageError`."""
    try:
        return msgspec.json.decode(text, type=OfferBody)
    except msgspec.MsgspecError:
        raise RejectedMessageError("malformed file offer") from None


def _record_offer(client: ClientCore, payload: Payload, deliver: frames.Deliver) -> Event | None:
    return record_offer(
        client,
        sender=payload.sender,
        device=payload.sender_device,
        message_id=payload.message_id,
        body=payload.body,
        at=deliver.server_ts,
    )


def record_offer(
    client: ClientCore, *, sender: str, device: str, message_id: bytes, body: str, at: int
) -> FileEvent | None:
    """Record a checked offer (from a 1:1 or a group message); None if ours or seen before.

    Raises :class:`RejectedMessageError` for a malformed offer. Must run inside
    the profile transaction of the message that carried it.
    """
    offer = parse_offer(body)
    if sender == client.account.username:
        return None  # our own offer, copied to this device: nothing to fetch
    offer_id = message_id.hex()
    if client.profile.get("file:" + offer_id, FileRecord) is not None:
        return None
    record = FileRecord(
        id=offer_id,
        sender=sender,
        device=device,
        received_at=at,
        blob=offer.blob,
        key=offer.key,
        sha256=offer.sha256,
        size=offer.size,
        plaintext_size=offer.plaintext_size,
        claimed_name=offer.name,
        name=sanitize_filename(offer.name).name,
        content_type=offer.type,
    )
    index = client.profile.get(_INDEX, list[str]) or []
    client.profile.put(_INDEX, [*index, offer_id])
    client.profile.put("file:" + offer_id, record)
    return FileEvent(
        id=offer_id,
        sender=record.sender,
        name=record.name,
        size=record.plaintext_size,
        content_type=record.content_type,
        at=at,
    )


# --- sending ---------------------------------------------------------------------------------


def _private_dir(path: Path) -> Path:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.chmod(0o700)
    except OSError as exc:
        raise StorageError(f"could not prepare {path.name}: {exc.strerror}") from None
    return path


def _refusal(exc: ServerRefusedError) -> ServerRefusedError:
    if exc.code == "file_too_large":
        return ServerRefusedError(
            exc.code, f"The file is too large for this server ({exc.message}); it was not sent."
        )
    sentence = REFUSAL_SENTENCES.get(exc.code)
    return exc if sentence is None else ServerRefusedError(exc.code, sentence)


async def send_file(
    client: ClientCore,
    to: str | GroupState,
    path: Path,
    *,
    progress: Progress | None = None,
    content_type: str | None = None,
    window: int = DEFAULT_WINDOW,
) -> SentFile:
    """Encrypt the file at ``path``, upload it and offer it to ``to`` (a user or a group).

    A group offer travels inside one group message (Megolm), and every current
    member may download the blob. ``progress(done, total)`` is called as
    ciphertext bytes are acknowledged. Raises ValueError if ``path`` is not a
    readable file or ``to`` is invalid, ServerRefusedError with a sentence a user
    understands (file transfer off, too large, quota), KeyChangedError, StorageError.
    """
    if isinstance(to, str):
        check_username(to)
        recipients = [to]
    else:
        recipients = sorted(u for u in to.members if u != client.account.username)
        if not recipients:
            raise ValueError("the group has no other members")
    if not await asyncio.to_thread(path.is_file):
        raise ValueError(f"{path} is not a file")
    name = sanitize_filename(path.name).name
    claimed = content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
    conn = client.connection()
    folder = _private_dir(client.profile.path / "outgoing")
    temp = folder / f"upload-{secrets.token_hex(12)}"
    try:
        encrypted = await asyncio.to_thread(encrypt_file, path, temp)
        try:
            blob = await upload_blob(
                conn,
                temp,
                encrypted.size,
                encrypted.sha256,
                recipients,
                progress=progress,
                window=window,
            )
        except ServerRefusedError as exc:
            raise _refusal(exc) from None
    finally:
        temp.unlink(missing_ok=True)
    body = OfferBody(
        blob=blob,
        key=encrypted.key.to_bytes(),
        sha256=encrypted.sha256,
        size=encrypted.size,
        plaintext_size=encrypted.plaintext_size,
        name=name,
        type=claimed,
    )
    text = msgspec.json.encode(body).decode()
    if isinstance(to, str):
        record = await client.send_payload(to, OFFER_KIND, text, history=False)
    else:
        record = await group_messages.send_body(client, to, text, kind=OFFER_KIND)
    return SentFile(offer_id=record.id.hex(), blob=blob, name=name, size=encrypted.plaintext_size)


async def _settle(tasks: collections.deque[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    tasks.clear()


async def upload_blob(
    conn: ServerConnection,
    source: Path,
    size: int,
    sha256: bytes,
    recipients: list[str],
    *,
    progress: Progress | None = None,
    window: int = DEFAULT_WINDOW,
) -> str:
    """Upload the ciphertext file ``source`` as a blob, ``window`` chunks in flight.

    Returns the blob id. Raises ServerRefusedError (as the server says it) and
    StorageError if ``source`` cannot be read.
    """
    req = conn.next_req()
    reply = await conn.request(
        frames.BlobBegin(req=req, size=size, sha256=sha256, recipients=recipients), req
    )
    if not isinstance(reply, frames.BlobStarted):
        raise ServerRefusedError("bad_reply", "the server answered the upload with something else")
    blob_id = reply.blob_id
    in_flight: collections.deque[asyncio.Task[Any]] = collections.deque()
    ends: collections.deque[int] = collections.deque()
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise StorageError(f"could not read the encrypted file: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "rb") as src:
            offset = 0
            while data := src.read(frames.MAX_BLOB_CHUNK_BYTES):
                r = conn.next_req()
                chunk = frames.BlobChunk(req=r, blob_id=blob_id, offset=offset, data=data)
                in_flight.append(asyncio.ensure_future(conn.request(chunk, r)))
                offset += len(data)
                ends.append(offset)
                while len(in_flight) >= max(1, window):
                    await in_flight.popleft()
                    if progress is not None:
                        progress(ends.popleft(), size)
            while in_flight:
                await in_flight.popleft()
                if progress is not None:
                    progress(ends.popleft(), size)
    except OSError as exc:
        raise StorageError(f"could not read the encrypted file: {exc.strerror}") from None
    finally:
        await _settle(in_flight)
    req = conn.next_req()
    await conn.request(frames.BlobEnd(req=req, blob_id=blob_id), req)
    if progress is not None and size == 0:
        progress(0, 0)
    return blob_id


# --- receiving -------------------------------------------------------------------------------


def list_files(client: ClientCore) -> list[FileRecord]:
    """Every file offered to this device, oldest first."""
    out = []
    for offer_id in client.profile.get(_INDEX, list[str]) or []:
        record = client.profile.get("file:" + offer_id, FileRecord)
        if record is not None:
            out.append(record)
    return out


def find_file(client: ClientCore, offer_id: str) -> FileRecord:
    """The offer whose id is (or starts with, if unambiguous) ``offer_id``.

    Raises ValueError if there is none or several.
    """
    wanted = offer_id.strip().lower()
    matches = [r for r in list_files(client) if r.id == wanted] or [
        r for r in list_files(client) if wanted and r.id.startswith(wanted)
    ]
    if not matches:
        raise ValueError(f"no file offer with id {offer_id!r} (see: bastion file list)")
    if len(matches) > 1:
        raise ValueError(f"{offer_id!r} matches several offers; give more of the id")
    return matches[0]


def _save(client: ClientCore, record: FileRecord) -> None:
    with client.profile.transaction():
        client.profile.put("file:" + record.id, record)


async def download_blob(
    conn: ServerConnection, blob_id: str, size: int, part: Path, *, window: int = DEFAULT_WINDOW
) -> None:
    """Download a blob into ``part``, continuing after the bytes already there.

    Raises FileIntegrityError if the server's blob does not have the offered
    size, ServerRefusedError, StorageError.
    """
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise StorageError(f"could not write the download: {exc.strerror}") from None
    in_flight: collections.deque[asyncio.Task[Any]] = collections.deque()
    try:
        have = os.fstat(fd).st_size
        if have > size:
            raise FileIntegrityError("the partial download is longer than the file")
        next_offset = have
        while have < size or in_flight:
            while next_offset < size and len(in_flight) < max(1, window):
                r = conn.next_req()
                get = frames.BlobGet(req=r, blob_id=blob_id, offset=next_offset)
                in_flight.append(asyncio.ensure_future(conn.request(get, r)))
                next_offset += frames.MAX_BLOB_CHUNK_BYTES
            if not in_flight:
                break
            reply = await in_flight.popleft()
            if (
                not isinstance(reply, frames.BlobData)
                or reply.blob_id != blob_id
                or reply.offset != have
                or reply.size != size
            ):
                raise FileIntegrityError("the server's file is not the one that was offered")
            expected = min(frames.MAX_BLOB_CHUNK_BYTES, size - have)
            if len(reply.data) != expected:
                raise FileIntegrityError("the server's file is shorter than the one offered")
            view = memoryview(reply.data)
            while view:
                view = view[os.write(fd, view) :]
            have += len(reply.data)
        os.fsync(fd)
    except OSError as exc:
        raise StorageError(f"could not write the download: {exc.strerror}") from None
    finally:
        await _settle(in_flight)
        os.close(fd)


def _file_sha256(path: Path) -> tuple[bytes, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as src:
        while piece := src.read(_HASH_PIECE):
            digest.update(piece)
            size += len(piece)
    return digest.digest(), size


def clamd_socket_from_env() -> Path | None:
    """The clamd socket named by ``BASTION_CLAMD_SOCKET``, if set."""
    value = os.environ.get(CLAMD_SOCKET_ENV, "").strip()
    return Path(value) if value else None


async def _fetch_into_quarantine(
    client: ClientCore, record: FileRecord, quarantine: Quarantine, window: int
) -> tuple[Path, Path]:
    """Download, check and seal the blob; return the sealed file and a decrypted copy."""
    conn = client.connection()
    part = _private_dir(client.profile.path / "downloads") / f"{record.id}.blob"
    try:
        await download_blob(conn, record.blob, record.size, part, window=window)
        digest, size = await asyncio.to_thread(_file_sha256, part)
        if size != record.size or not hmac.compare_digest(digest, record.sha256):
            raise FileIntegrityError("the downloaded file's hash is not the one the sender sent")
    except FileIntegrityError:
        part.unlink(missing_ok=True)
        raise
    sealed = await asyncio.to_thread(quarantine.hold, part)
    try:
        plaintext = await asyncio.to_thread(_open_sealed, quarantine, sealed, record)
    except FileIntegrityError:
        quarantine.discard(sealed)
        raise
    req = conn.next_req()
    try:
        await conn.request(frames.BlobDone(req=req, blob_id=record.blob), req)
    except ServerRefusedError as exc:
        log.info("file.done_refused", extra={"code": exc.code})
    return sealed, plaintext


def _open_sealed(quarantine: Quarantine, sealed: Path, record: FileRecord) -> Path:
    return quarantine.open_sealed(
        sealed, FileKey(record.key), expected_sha256=record.sha256, expected_size=record.size
    )


async def _sealed_and_plaintext(
    client: ClientCore, record: FileRecord, quarantine: Quarantine, window: int
) -> tuple[FileRecord, Path, Path]:
    """The offer's sealed file in quarantine (downloaded if needed) and a decrypted copy.

    Raises FileIntegrityError (the offer is then marked failed and nothing of it
    is kept), ServerRefusedError, StorageError.
    """
    held = quarantine.folder / record.quarantined if record.quarantined else None
    if held is not None and not held.name.startswith(SEALED_PREFIX):
        quarantine.discard(held)  # plaintext kept by an earlier version: never again
        held = None
    try:
        if held is not None and held.is_file():
            try:
                plaintext = await asyncio.to_thread(_open_sealed, quarantine, held, record)
            except FileIntegrityError:
                quarantine.discard(held)
                raise
            return record, held, plaintext
        held, plaintext = await _fetch_into_quarantine(client, record, quarantine, window)
    except FileIntegrityError as exc:
        failed = msgspec.structs.replace(
            record, state="failed", reasons=[str(exc)], quarantined=None
        )
        _save(client, failed)
        raise
    record = msgspec.structs.replace(record, quarantined=held.name)
    _save(client, record)
    return record, held, plaintext


async def get_file(
    client: ClientCore,
    offer_id: str,
    to_dir: Path,
    *,
    allow_blocked: bool = False,
    clamd_socket: Path | None = None,
    window: int = DEFAULT_WINDOW,
) -> FileResult:
    """Download, verify, decrypt into quarantine, scan, and save to ``to_dir`` if clean.

    ``clamd_socket`` defaults to ``BASTION_CLAMD_SOCKET``. With ``allow_blocked``
    (which the user must have confirmed) a blocked file is saved anyway, mode
    0600, and the decision is logged in the profile. Returns the verdict and
    where the file went. Raises ValueError for an unknown offer or folder,
    FileIntegrityError if the download does not check out (nothing is saved;
    the offer is marked failed), ServerRefusedError, StorageError.
    """
    record = find_file(client, offer_id)
    if not await asyncio.to_thread(to_dir.is_dir):
        raise ValueError(f"{to_dir} is not a folder")
    quarantine = Quarantine(client.profile.path / "quarantine")
    await asyncio.to_thread(quarantine.sweep_plaintext)
    record, sealed, plaintext = await _sealed_and_plaintext(client, record, quarantine, window)
    socket = clamd_socket if clamd_socket is not None else clamd_socket_from_env()
    saved: Path | None = None
    try:
        verdict = await asyncio.to_thread(
            scan_file,
            plaintext,
            record.claimed_name,
            record.content_type,
            clamd_socket=socket,
        )
        state = str(verdict.kind)
        if verdict.is_clean:
            saved = await asyncio.to_thread(
                quarantine.release, plaintext, verdict, to_dir, record.claimed_name
            )
            state = "saved"
        elif allow_blocked:
            saved = await asyncio.to_thread(_release_anyway, plaintext, to_dir, record.claimed_name)
            state = "saved_anyway"
            _log_override(client, record, verdict)
    finally:
        plaintext.unlink(missing_ok=True)  # blocked or not, no plaintext stays in quarantine
    if saved is not None:
        quarantine.discard(sealed)
    record = msgspec.structs.replace(
        record,
        state=state,
        verdict=str(verdict.kind),
        reasons=list(verdict.reasons),
        quarantined=None if saved is not None else sealed.name,
        saved_to=str(saved) if saved is not None else None,
    )
    _save(client, record)
    return FileResult(record=record, verdict=verdict, saved_to=saved)


def _log_override(client: ClientCore, record: FileRecord, verdict: Verdict) -> None:
    log.warning("file.saved_despite_verdict", extra={"verdict": str(verdict.kind)})
    entry = OverrideEntry(
        id=record.id, at=now_ms(), verdict=str(verdict.kind), reasons=list(verdict.reasons)
    )
    with client.profile.transaction():
        entries = client.profile.get(_OVERRIDES, list[OverrideEntry]) or []
        client.profile.put(_OVERRIDES, [*entries, entry])


def overrides(client: ClientCore) -> list[OverrideEntry]:
    """Every blocked file the user saved anyway (the local log of ``--allow-blocked``)."""
    return client.profile.get(_OVERRIDES, list[OverrideEntry]) or []


def _release_anyway(quarantined: Path, folder: Path, claimed_name: str) -> Path:
    """Copy a quarantined file the user insists on, never executable, never over a file."""
    name = sanitize_filename(claimed_name).name
    ext = extension_of(name)
    stem, suffix = (name[: -len(ext) - 1], name[-len(ext) - 1 :]) if ext else (name, "")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        for attempt in range(1000):
            target = folder / (name if attempt == 0 else f"{stem} ({attempt}){suffix}")
            try:
                fd = os.open(target, flags, 0o600)
            except FileExistsError:
                continue
            with open(quarantined, "rb") as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst)
                os.fchmod(dst.fileno(), 0o600)
            quarantined.unlink(missing_ok=True)
            return target
    except OSError as exc:
        raise StorageError(f"could not save the file: {exc.strerror}") from None
    raise StorageError("too many files with that name already exist in the folder")


def verdict_kind(record: FileRecord) -> VerdictKind | None:
    """The stored verdict of an offer, if it was scanned."""
    return VerdictKind(record.verdict) if record.verdict else None
