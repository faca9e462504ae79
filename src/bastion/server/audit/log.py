"""The server's tamper-evident audit log of security events.

The log is a directory holding two files, both mode 0600:

``audit.log``
    JSON lines, one record each: ``seq`` (1, 2, 3...), ``time`` (ISO 8601 UTC),
    ``event`` (from :data:`EVENTS`), ``fields`` (a few short str/int/bool values,
    never message content), ``prev`` (the previous record's ``hash``; 64 zeros for
    the first) and ``hash``: SHA-256 over :func:`signing_input` with context
    ``bastion/v1/audit-record`` of seq, time, event, the fields and prev.
``audit.head``
    A copy of the latest checkpoint record, replaced atomically.

Every ``checkpoint_every`` records and on close the log appends an
``audit.checkpoint`` record whose ``fields`` hold ``covers_seq`` and ``signature``:
the server audit key's Ed25519 signature (context ``bastion/v1/audit-checkpoint``)
over the checkpoint's seq and time and the seq and hash of the record it covers.

What :func:`verify_log` detects, given the audit public key:

- a record edited, deleted, inserted or moved anywhere in the log, and a partly
  written line: the chain of ``prev``/``hash`` and the ``seq`` numbers break;
- a record rewritten *together with every later hash*, as long as a checkpoint
  follows it: that checkpoint's signature no longer verifies;
- records cut from the end, back past the checkpoint named by ``audit.head``;
- a forged ``audit.head``, or one deleted while the log holds checkpoints.

What it cannot detect without a witness outside the server:

- changes after the last checkpoint, if the attacker recomputes the hashes
  (they are unkeyed), and cutting those unsigned records off the end;
  :attr:`VerifyReport.signed_through_seq` says how far the signatures reach;
- a rollback of both files to an earlier consistent state (an old log prefix
  with the old head), or the deletion of both files;
- anything done by someone holding the audit private key: they can rewrite and
  re-sign the whole log.

Passing ``known_checkpoint=(seq, hash)``, copied earlier from a report to a place
the server cannot write, closes the first two gaps up to that checkpoint. Keeping
the private key off the server's disk (a separate signing service or hardware
key) is what closes the third.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from bastion.crypto.signing import AccountIdentity
from bastion.errors import StateError, StorageError
from bastion.server.audit.record import (
    CHECKPOINT_CONTEXT,
    CHECKPOINT_EVENT,
    GENESIS_HASH,
    HEAD_NAME,
    LOG_NAME,
    MAX_FIELD_NAME_CHARS,
    MAX_FIELD_STR_CHARS,
    MAX_FIELDS,
    MAX_RECORD_BYTES,
    RECORD_CONTEXT,
    RECOVERED_EVENT,
    TIME_PATTERN,
    AuditRecord,
    AuditRecordError,
    AuditRefusedError,
    FieldValue,
    check_fields,
    check_own_hash,
    checkpoint_parts,
    parse_record,
    record_hash,
)
from bastion.server.audit.verify import VerifyReport, read_records, verify_log

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CHECKPOINT_CONTEXT",
    "CHECKPOINT_EVENT",
    "EVENTS",
    "GENESIS_HASH",
    "HEAD_NAME",
    "LOG_NAME",
    "MAX_FIELDS",
    "MAX_FIELD_NAME_CHARS",
    "MAX_FIELD_STR_CHARS",
    "MAX_RECORD_BYTES",
    "RECORD_CONTEXT",
    "RECOVERED_EVENT",
    "AuditLog",
    "AuditRecord",
    "AuditRecordError",
    "AuditRefusedError",
    "FieldValue",
    "VerifyReport",
    "check_fields",
    "parse_record",
    "read_records",
    "record_hash",
    "verify_log",
]

EVENTS: Final = frozenset(
    [
        "server.started",
        "server.stopped",
        "registration",
        "account.registered",
        "registration.refused",
        "signin.ok",
        "signin.failed",
        "device.added",
        "device.revoked",
        "device_list.published",
        "key.changed",
        "limit.hit",
        "policy.changed",
        "admin.action",
        "upload.blocked",
    ]
)
"""The events callers may append; the log itself writes the ``audit.*`` ones."""


def _iso_time(now: float) -> str:
    try:
        moment = datetime.fromtimestamp(now, UTC)
    except (ValueError, OverflowError, OSError):
        raise AuditRefusedError("now is not a representable time") from None
    text = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if not TIME_PATTERN.match(text):
        raise AuditRefusedError("now is not a representable time")
    return text


def _open_private(path: Path, flags: int) -> int:
    fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_tail(fd: int) -> tuple[bytes, int]:
    """The last line of the file (without newline) and the size of the complete part.

    A final line without its newline is a write that never finished; the size
    returned then ends before it.
    """
    size = os.fstat(fd).st_size
    start = max(0, size - (MAX_RECORD_BYTES + 2) * 2)
    chunk = os.pread(fd, size - start, start)
    complete = chunk.rfind(b"\n") + 1
    if complete == 0:
        if start > 0:
            raise StorageError("the audit log ends with an overlong line")
        return b"", 0
    before = chunk.rfind(b"\n", 0, complete - 1) + 1
    if before == 0 and start > 0:
        raise StorageError("the audit log ends with an overlong line")
    return chunk[before : complete - 1], start + complete


class AuditLog:
    """An open audit log: append security events, checkpoint, close.

    Synchronous and single-writer (an exclusive lock refuses a second process).
    """

    def __init__(self, directory: Path, fd: int, key: AccountIdentity, every: int) -> None:
        self._directory = directory
        self._fd: int | None = fd
        self._key = key
        self._checkpoint_every = every
        self._fsync_each_append = True
        self._seq, self._hash, self._last_time = 0, GENESIS_HASH, ""
        self._since_checkpoint = 0

    @classmethod
    def open(
        cls,
        directory: Path | str,
        key: AccountIdentity,
        *,
        checkpoint_every: int = 100,
        fsync_each_append: bool = True,
        now: float | None = None,
    ) -> AuditLog:
        """Open or create the log in ``directory`` and continue its chain.

        With ``fsync_each_append=False`` records reach the disk on :meth:`flush`,
        at each checkpoint and on close. An unfinished last line (a crash
        mid-write) is cut off and an ``audit.recovered`` record notes how many
        bytes were dropped; ``now`` dates it (else the last record's time is
        reused). Raises :class:`StorageError` if the files cannot be used, the
        last record is damaged, or another process holds the log.
        """
        if checkpoint_every < 1:
            raise StorageError("checkpoint_every must be at least 1")
        path = Path(directory)
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = _open_private(path / LOG_NAME, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        except OSError as exc:
            raise StorageError(f"cannot open the audit log: {exc.strerror}") from None
        log = cls(path, fd, key, checkpoint_every)
        log._fsync_each_append = fsync_each_append
        try:
            log._resume(now)
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"cannot read the audit log: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return log

    def _resume(self, now: float | None) -> None:
        """Lock the file, continue the chain from its last record, repair a crash."""
        fd = self._require_open()
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise StorageError("the audit log is in use by another process") from None
        tail, complete = _read_tail(fd)
        try:
            last = parse_record(tail) if tail else None
        except AuditRecordError as exc:
            raise StorageError(f"the last audit record is damaged ({exc}); run verify") from None
        if last is not None:
            if not check_own_hash(last):
                raise StorageError("the last audit record does not match its hash; run verify")
            self._seq, self._hash, self._last_time = last.seq, last.hash, last.time
            self._since_checkpoint = 0 if last.is_checkpoint else 1
        dropped = os.fstat(fd).st_size - complete
        if dropped:
            os.ftruncate(fd, complete)
            self._append(RECOVERED_EVENT, self._time_or_last(now), {"dropped_bytes": dropped})
        elif last is not None and last.is_checkpoint:
            self._write_head_if_older(last)

    @property
    def last_seq(self) -> int:
        """The seq of the last record written (0 for an empty log)."""
        return self._seq

    @property
    def last_hash(self) -> str:
        """The hash of the last record written (64 zeros for an empty log)."""
        return self._hash

    def append(self, event: str, now: float, **fields: object) -> AuditRecord:
        """Append one security event dated ``now`` (seconds since the Unix epoch).

        Raises :class:`AuditRefusedError` for an event outside :data:`EVENTS` or
        a field that is not short str/int/bool metadata, :class:`StateError`
        after :meth:`close`, and :class:`StorageError` if the disk write fails.
        """
        if event not in EVENTS:
            raise AuditRefusedError("unknown audit event")
        checked = check_fields(fields)
        record = self._append(event, _iso_time(now), checked)
        if self._since_checkpoint >= self._checkpoint_every:
            self._checkpoint(record.time)
        return record

    def flush(self) -> None:
        """Force every appended record to disk. Raises :class:`StorageError` on failure."""
        fd = self._require_open()
        try:
            os.fsync(fd)
        except OSError as exc:
            raise StorageError(f"cannot sync the audit log: {exc.strerror}") from None

    def checkpoint(self, now: float | None = None) -> AuditRecord | None:
        """Sign the chain so far now (no-op if nothing new since the last checkpoint).

        Raises :class:`StateError` after :meth:`close` and :class:`StorageError`
        if a write fails.
        """
        self._require_open()
        if self._since_checkpoint == 0:
            return None
        return self._checkpoint(self._time_or_last(now))

    def close(self, now: float | None = None) -> None:
        """Write a final checkpoint (dated ``now``, else the last record's time) and close.

        Closing twice is harmless. Raises :class:`StorageError` if a write fails;
        the file is closed either way.
        """
        if self._fd is None:
            return
        try:
            self.checkpoint(now)
            self.flush()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _time_or_last(self, now: float | None) -> str:
        if now is not None:
            return _iso_time(now)
        return self._last_time or _iso_time(0.0)

    def _require_open(self) -> int:
        if self._fd is None:
            raise StateError("the audit log is closed")
        return self._fd

    def _append(self, event: str, time: str, fields: Mapping[str, FieldValue]) -> AuditRecord:
        fd = self._require_open()
        seq = self._seq + 1
        digest = record_hash(seq, time, event, fields, self._hash)
        record = AuditRecord(seq, time, event, dict(fields), self._hash, digest)
        size_before = -1
        try:
            size_before = os.fstat(fd).st_size
            _write_all(fd, record.to_line())
            if self._fsync_each_append:
                os.fsync(fd)
        except OSError as exc:
            # Never leave half a record for the next one to follow: cut it off,
            # or stop writing altogether (reopening repairs the file).
            try:
                if size_before >= 0:
                    os.ftruncate(fd, size_before)
            except OSError:
                os.close(fd)
                self._fd = None
            raise StorageError(f"cannot write the audit log: {exc.strerror}") from None
        self._seq, self._hash, self._last_time = seq, digest, time
        self._since_checkpoint = 0 if record.is_checkpoint else self._since_checkpoint + 1
        return record

    def _checkpoint(self, time: str) -> AuditRecord:
        seq = self._seq + 1
        covers_seq, covers_hash = self._seq, self._hash
        signature = self._key.sign(
            CHECKPOINT_CONTEXT, checkpoint_parts(seq, time, covers_seq, covers_hash)
        )
        fields: dict[str, FieldValue] = {"covers_seq": covers_seq, "signature": signature.hex()}
        record = self._append(CHECKPOINT_EVENT, time, fields)
        if not self._fsync_each_append:
            self.flush()
        self._write_head(record)
        return record

    def _write_head_if_older(self, checkpoint: AuditRecord) -> None:
        """After a crash between logging a checkpoint and writing the head, write the head.

        Only an existing, older head is replaced: a missing or damaged head is
        left for :func:`verify_log` to report, since deleting it is also what an
        attacker who cut the log would do.
        """
        try:
            current = parse_record((self._directory / HEAD_NAME).read_bytes().rstrip(b"\n"))
        except (OSError, StorageError):
            return
        if current.is_checkpoint and current.seq < checkpoint.seq:
            self._write_head(checkpoint)

    def _write_head(self, checkpoint: AuditRecord) -> None:
        head = self._directory / HEAD_NAME
        temp = self._directory / (HEAD_NAME + ".tmp")
        try:
            fd = _open_private(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                _write_all(fd, checkpoint.to_line())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, head)
            dir_fd = os.open(self._directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StorageError(f"cannot write the audit head: {exc.strerror}") from None


AUDIT_DIR: Final = "audit"
AUDIT_KEY_FILE: Final = "audit.key"
AUDIT_PUBLIC_FILE: Final = "audit.pub"


def ensure_audit_key(data_dir: Path) -> AccountIdentity:
    """The server audit key in ``data_dir``, generated (mode 0600) on first use.

    The public half is written beside it as hex for verifiers. Raises
    :class:`StorageError` if the key file cannot be written or is damaged.
    """
    path = data_dir / AUDIT_KEY_FILE
    try:
        if not path.exists():
            key = AccountIdentity.generate()
            fd = _open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                _write_all(fd, key.private_bytes())
                os.fsync(fd)
            finally:
                os.close(fd)
        raw = path.read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot use the audit key: {exc.strerror}") from None
    if len(raw) != 32:
        raise StorageError("the audit key file is damaged")
    key = AccountIdentity.from_private_bytes(raw)
    public = data_dir / AUDIT_PUBLIC_FILE
    if not public.exists():
        public.write_text(key.public_bytes.hex() + "\n")
    return key


def audit_public_key(data_dir: Path) -> bytes:
    """The audit public key of the server in ``data_dir``.

    Taken from the private key file when present (``audit.pub`` could have been
    swapped together with a forged log), else from ``audit.pub``. Raises
    :class:`StorageError` if neither is usable.
    """
    try:
        raw = (data_dir / AUDIT_KEY_FILE).read_bytes()
    except FileNotFoundError:
        raw = b""
    except OSError as exc:
        raise StorageError(f"cannot read the audit key: {exc.strerror}") from None
    if len(raw) == 32:
        return AccountIdentity.from_private_bytes(raw).public_bytes
    try:
        public = bytes.fromhex((data_dir / AUDIT_PUBLIC_FILE).read_text().strip())
    except (OSError, ValueError):
        raise StorageError(f"no audit key in {data_dir}") from None
    if len(public) != 32:
        raise StorageError("the audit public key file is damaged")
    return public
