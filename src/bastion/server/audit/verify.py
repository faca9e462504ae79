"""Checking an audit log: the hash chain, every checkpoint signature and the head file.

What is and is not detected is listed in :mod:`bastion.server.audit.log`.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bastion.errors import ConfigError, StorageError
from bastion.server.audit.record import (
    GENESIS_HASH,
    HEAD_NAME,
    HEX64_PATTERN,
    LOG_NAME,
    AuditRecord,
    AuditRecordError,
    check_checkpoint,
    check_own_hash,
    iter_lines,
    parse_record,
)


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
        for number, (line, complete) in enumerate(iter_lines(handle), start=1):
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
        if not isinstance(digest, str) or not HEX64_PATTERN.match(digest):
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
            if not check_own_hash(head):
                raise AuditRecordError("does not match its hash")
            check_checkpoint(head, self.public_key)
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
            for number, (line, complete) in enumerate(iter_lines(handle), start=1):
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
        if not check_own_hash(record):
            return self.report(f"{where} does not match its hash (edited)", number, record.seq)
        if record.is_checkpoint:
            try:
                check_checkpoint(record, self.public_key)
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
