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

import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Final

from bastion.crypto.signing import AccountIdentity, Part, signing_input, verify_signed
from bastion.errors import AuthenticationError, ConfigError, StateError, StorageError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

RECORD_CONTEXT: Final = "bastion/v1/audit-record"
CHECKPOINT_CONTEXT: Final = "bastion/v1/audit-checkpoint"
LOG_NAME: Final = "audit.log"
HEAD_NAME: Final = "audit.head"
CHECKPOINT_EVENT: Final = "audit.checkpoint"
RECOVERED_EVENT: Final = "audit.recovered"
GENESIS_HASH: Final = "0" * 64

EVENTS: Final = frozenset(
    [
        "server.started",
        "server.stopped",
        "registration",
        "signin.ok",
        "signin.failed",
        "device.added",
        "device.revoked",
        "key.changed",
        "limit.hit",
        "policy.changed",
        "admin.action",
        "upload.blocked",
    ]
)
"""The events callers may append; the log itself writes the ``audit.*`` ones."""

MAX_FIELDS: Final = 16
MAX_FIELD_NAME_CHARS: Final = 32
MAX_FIELD_STR_CHARS: Final = 256
MAX_RECORD_BYTES: Final = 32 * 1024
_INT64 = 2**63
_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")  # MAX_FIELD_NAME_CHARS
_EVENT_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}(\.[a-z][a-z0-9_]{0,31}){0,2}\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_HEX128 = re.compile(r"[0-9a-f]{128}\Z")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z\Z")
_RECORD_KEYS = ("seq", "time", "event", "fields", "prev", "hash")

FieldValue = str | int | bool


class AuditRefusedError(StorageError):
    """The audit log refused an event: unknown name, or a field that could carry content."""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One line of the audit log."""

    seq: int
    time: str
    event: str
    fields: Mapping[str, FieldValue]
    prev: str
    hash: str

    @property
    def is_checkpoint(self) -> bool:
        """True for a signed checkpoint record."""
        return self.event == CHECKPOINT_EVENT

    def to_line(self) -> bytes:
        """The record as one JSON line, newline included."""
        body = {key: getattr(self, key) for key in _RECORD_KEYS}
        body["fields"] = dict(self.fields)
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        return text.encode() + b"\n"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of :func:`verify_log`; ``reason`` is one line, empty when ``ok``."""

    ok: bool
    records_checked: int
    checkpoints_checked: int = 0
    signed_through_seq: int = 0
    signed_through_hash: str = ""
    first_bad_seq: int | None = None
    first_bad_line: int | None = None
    reason: str = ""

    @property
    def unsigned_tail(self) -> int:
        """Records after the last valid checkpoint: not protected by a signature yet."""
        return self.records_checked - self.signed_through_seq


def record_hash(
    seq: int, time: str, event: str, fields: Mapping[str, FieldValue], prev: str
) -> str:
    """The hex SHA-256 that chains a record with this content to the log."""
    parts: list[Part] = [seq, time, event, len(fields)]
    for name in sorted(fields):
        value = fields[name]
        if isinstance(value, bool):
            parts += [name, "b", int(value)]
        elif isinstance(value, int):
            parts += [name, "i", value]
        else:
            parts += [name, "s", value]
    parts.append(bytes.fromhex(prev))
    return hashlib.sha256(signing_input(RECORD_CONTEXT, parts)).hexdigest()


def _checkpoint_parts(seq: int, time: str, covers_seq: int, covers_hash: str) -> list[Part]:
    return [seq, time, covers_seq, bytes.fromhex(covers_hash)]


def _iso_time(now: float) -> str:
    try:
        moment = datetime.fromtimestamp(now, UTC)
    except (ValueError, OverflowError, OSError):
        raise AuditRefusedError("now is not a representable time") from None
    text = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if not _TIME.match(text):
        raise AuditRefusedError("now is not a representable time")
    return text


def check_fields(fields: Mapping[str, object]) -> dict[str, FieldValue]:
    """Return ``fields`` if every name and value is acceptable audit metadata.

    Names are short lower-case identifiers; values are bool, 64-bit int, or a
    printable str of at most :data:`MAX_FIELD_STR_CHARS` characters (no control,
    format or line-separator characters). Raises :class:`AuditRefusedError`
    for anything else: bytes, floats, nested containers, long text.
    """
    if len(fields) > MAX_FIELDS:
        raise AuditRefusedError(f"at most {MAX_FIELDS} fields per audit record")
    checked: dict[str, FieldValue] = {}
    for name, value in fields.items():
        if not isinstance(name, str) or not _FIELD_NAME.match(name):
            raise AuditRefusedError("audit field names are short lower-case identifiers")
        if isinstance(value, bool):
            checked[name] = value
        elif isinstance(value, int):
            if not -_INT64 <= value < _INT64:
                raise AuditRefusedError(f"audit field {name!r} is out of the 64-bit range")
            checked[name] = value
        elif isinstance(value, str):
            if len(value) > MAX_FIELD_STR_CHARS:
                raise AuditRefusedError(f"audit field {name!r} is longer than allowed")
            if not value.isprintable():
                raise AuditRefusedError(f"audit field {name!r} holds unprintable characters")
            checked[name] = value
        else:
            raise AuditRefusedError(
                f"audit field {name!r} must be str, int or bool, not {type(value).__name__}"
            )
    return checked


class AuditRecordError(StorageError):
    """A line of the log or head file is not a well-formed, correctly signed record."""


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise AuditRecordError("duplicate key")
    return result


def parse_record(line: bytes) -> AuditRecord:
    """Decode one log line (without its newline) into an :class:`AuditRecord`.

    Checks the shape only, not the chain. Raises :class:`AuditRecordError`
    naming what is wrong.
    """
    if len(line) > MAX_RECORD_BYTES:
        raise AuditRecordError("line too long")
    try:
        data = json.loads(line.decode(), object_pairs_hook=_reject_duplicates)
    except (ValueError, RecursionError):
        raise AuditRecordError("not valid JSON") from None
    if not isinstance(data, dict) or tuple(data) != _RECORD_KEYS:
        raise AuditRecordError("wrong keys")
    seq, time, event, fields, prev, digest = (data[key] for key in _RECORD_KEYS)
    if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq < _INT64:
        raise AuditRecordError("bad seq")
    if not isinstance(time, str) or not _TIME.match(time):
        raise AuditRecordError("bad time")
    if not isinstance(event, str) or not _EVENT_NAME.match(event):
        raise AuditRecordError("bad event name")
    if not isinstance(fields, dict):
        raise AuditRecordError("bad fields")
    try:
        checked = check_fields(fields)
    except AuditRefusedError:
        raise AuditRecordError("bad fields") from None
    for value in (prev, digest):
        if not isinstance(value, str) or not _HEX64.match(value):
            raise AuditRecordError("bad hash")
    return AuditRecord(seq, time, event, checked, prev, digest)


def _check_checkpoint(record: AuditRecord, public_key: bytes) -> None:
    """Raise :class:`AuditRecordError` unless ``record`` is a validly signed checkpoint."""
    covers_seq = record.fields.get("covers_seq")
    signature = record.fields.get("signature")
    if (
        set(record.fields) != {"covers_seq", "signature"}
        or not isinstance(covers_seq, int)
        or isinstance(covers_seq, bool)
        or covers_seq != record.seq - 1
        or not isinstance(signature, str)
        or not _HEX128.match(signature)
    ):
        raise AuditRecordError("malformed checkpoint")
    parts = _checkpoint_parts(record.seq, record.time, covers_seq, record.prev)
    try:
        verify_signed(public_key, bytes.fromhex(signature), CHECKPOINT_CONTEXT, parts)
    except AuthenticationError:
        raise AuditRecordError(
            "checkpoint signature does not verify (wrong key or forged)"
        ) from None


def _check_own_hash(record: AuditRecord) -> bool:
    expected = record_hash(record.seq, record.time, record.event, record.fields, record.prev)
    return hmac.compare_digest(expected, record.hash)


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
            if not _check_own_hash(last):
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
            CHECKPOINT_CONTEXT, _checkpoint_parts(seq, time, covers_seq, covers_hash)
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


def _lines(handle: IO[bytes]) -> Iterator[tuple[bytes, bool]]:
    """Lines without their newline, each with whether it was complete and short enough."""
    while True:
        line = handle.readline(MAX_RECORD_BYTES + 1)
        if not line:
            return
        if line.endswith(b"\n"):
            yield line[:-1], True
        else:
            yield line, False
            if len(line) > MAX_RECORD_BYTES:
                return


def read_records(directory: Path | str) -> Iterator[AuditRecord]:
    """Yield the records of the log in ``directory`` in file order, without verifying.

    For display (``bastion admin audit show``); use :func:`verify_log` to check
    them. Raises :class:`StorageError` for an unreadable file or malformed line.
    """
    path = Path(directory) / LOG_NAME
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(f"cannot read the audit log: {exc.strerror}") from None
    with handle:
        for number, (line, complete) in enumerate(_lines(handle), start=1):
            if not complete:
                raise StorageError(f"line {number}: unfinished or overlong audit record")
            try:
                yield parse_record(line)
            except AuditRecordError as exc:
                raise StorageError(f"line {number}: not an audit record: {exc}") from None


def verify_log(
    directory: Path | str,
    public_key: bytes,
    *,
    known_checkpoint: tuple[int, str] | None = None,
) -> VerifyReport:
    """Check the chain, every checkpoint signature and the head file of the log in ``directory``.

    ``known_checkpoint`` is a ``(signed_through_seq, signed_through_hash)``
    pair from an earlier report, kept where the server cannot write; the log
    must still contain that exact record. Problems in the log are reported, not
    raised; raises :class:`ConfigError` for a malformed ``known_checkpoint`` and
    :class:`StorageError` when a file exists but cannot be read.
    """
    if known_checkpoint is not None:
        seq, digest = known_checkpoint
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise ConfigError("the known checkpoint's seq must be a positive integer")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise ConfigError("the known checkpoint's hash must be 64 lower-case hex digits")
    return _Verifier(Path(directory), public_key, known_checkpoint).run()


class _Verifier:
    def __init__(self, directory: Path, public_key: bytes, known: tuple[int, str] | None) -> None:
        self.directory = directory
        self.public_key = public_key
        # (seq, hash, what) of records the log must contain: the head, a witness.
        self.pending: list[tuple[int, str, str]] = [] if known is None else [(*known, "known")]
        self.records = 0
        self.checkpoints = 0
        self.signed_through = 0
        self.signed_hash = ""
        self.last_hash = GENESIS_HASH

    def report(
        self, reason: str = "", line: int | None = None, seq: int | None = None
    ) -> VerifyReport:
        return VerifyReport(
            ok=not reason,
            records_checked=self.records,
            checkpoints_checked=self.checkpoints,
            signed_through_seq=self.signed_through,
            signed_through_hash=self.signed_hash,
            first_bad_seq=seq,
            first_bad_line=line,
            reason=reason,
        )

    def load_head(self) -> str:
        """Read and check the head file; return a problem, or "" if it is fine or absent."""
        try:
            raw = (self.directory / HEAD_NAME).read_bytes()
        except FileNotFoundError:
            return ""
        except OSError as exc:
            raise StorageError(f"cannot read the audit head: {exc.strerror}") from None
        try:
            if not raw.endswith(b"\n"):
                raise AuditRecordError("unfinished")
            head = parse_record(raw[:-1])
            if not head.is_checkpoint:
                raise AuditRecordError("not a checkpoint")
            if not _check_own_hash(head):
                raise AuditRecordError("does not match its hash")
            _check_checkpoint(head, self.public_key)
        except AuditRecordError as exc:
            return f"the head file is not a valid signed checkpoint: {exc}"
        self.pending.append((head.seq, head.hash, "head"))
        return ""

    def run(self) -> VerifyReport:
        problem = self.load_head()
        if problem:
            return self.report(problem)
        try:
            handle = (self.directory / LOG_NAME).open("rb")
        except FileNotFoundError:
            return self.finish()
        except OSError as exc:
            raise StorageError(f"cannot read the audit log: {exc.strerror}") from None
        with handle:
            for number, (line, complete) in enumerate(_lines(handle), start=1):
                bad = self.check_line(line, complete, number)
                if bad is not None:
                    return bad
        return self.finish()

    def check_line(self, line: bytes, complete: bool, number: int) -> VerifyReport | None:
        if not complete:
            return self.report(f"line {number}: unfinished or overlong record", number)
        try:
            record = parse_record(line)
        except AuditRecordError as exc:
            return self.report(f"line {number}: not an audit record ({exc})", number)
        where = f"line {number}: seq {record.seq}"
        if record.seq != self.records + 1:
            reason = f"{where} where {self.records + 1} was expected (deleted, inserted or moved)"
            return self.report(reason, number, record.seq)
        if not hmac.compare_digest(record.prev, self.last_hash):
            return self.report(f"{where} does not chain to the record before", number, record.seq)
        if not _check_own_hash(record):
            return self.report(f"{where} does not match its hash (edited)", number, record.seq)
        if record.is_checkpoint:
            try:
                _check_checkpoint(record, self.public_key)
            except AuditRecordError as exc:
                return self.report(f"{where}: {exc}", number, record.seq)
            self.checkpoints += 1
            self.signed_through, self.signed_hash = record.seq, record.hash
        for target in [t for t in self.pending if t[0] == record.seq]:
            if not hmac.compare_digest(target[1], record.hash):
                return self.report(f"{where} differs from the {target[2]} checkpoint", number)
            self.pending.remove(target)
        self.records += 1
        self.last_hash = record.hash
        return None

    def finish(self) -> VerifyReport:
        for seq, _, what in self.pending:
            reason = f"the log ends at seq {self.records} before the {what} checkpoint at seq {seq}"
            if what == "head":
                reason += ": records were cut from the end"
            return self.report(reason, seq=self.records + 1)
        if self.checkpoints and not (self.directory / HEAD_NAME).exists():
            return self.report("the head file is missing although the log holds checkpoints")
        return self.report()
