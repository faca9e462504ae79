"""The audit log's record format: one JSON line per record, hash-chained.

Shared by the writer (:mod:`bastion.server.audit.log`) and the verifier
(:mod:`bastion.server.audit.verify`); see the writer's docstring for the file layout.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Final

from bastion.crypto.signing import Part, signing_input, verify_signed
from bastion.errors import AuthenticationError, StorageError

RECORD_CONTEXT: Final = "bastion/v1/audit-record"
CHECKPOINT_CONTEXT: Final = "bastion/v1/audit-checkpoint"
LOG_NAME: Final = "audit.log"
HEAD_NAME: Final = "audit.head"
CHECKPOINT_EVENT: Final = "audit.checkpoint"
RECOVERED_EVENT: Final = "audit.recovered"
GENESIS_HASH: Final = "0" * 64

MAX_FIELDS: Final = 16
MAX_FIELD_NAME_CHARS: Final = 32
MAX_FIELD_STR_CHARS: Final = 256
MAX_RECORD_BYTES: Final = 32 * 1024
_INT64 = 2**63
_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")  # MAX_FIELD_NAME_CHARS
_EVENT_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}(\.[a-z][a-z0-9_]{0,31}){0,2}\Z")
HEX64_PATTERN = re.compile(r"[0-9a-f]{64}\Z")
_HEX128 = re.compile(r"[0-9a-f]{128}\Z")
TIME_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z\Z")
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


def checkpoint_parts(seq: int, time: str, covers_seq: int, covers_hash: str) -> list[Part]:
    return [seq, time, covers_seq, bytes.fromhex(covers_hash)]


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
    if not isinstance(time, str) or not TIME_PATTERN.match(time):
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
        if not isinstance(value, str) or not HEX64_PATTERN.match(value):
            raise AuditRecordError("bad hash")
    return AuditRecord(seq, time, event, checked, prev, digest)


def check_checkpoint(record: AuditRecord, public_key: bytes) -> None:
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
    parts = checkpoint_parts(record.seq, record.time, covers_seq, record.prev)
    try:
        verify_signed(public_key, bytes.fromhex(signature), CHECKPOINT_CONTEXT, parts)
    except AuthenticationError:
        raise AuditRecordError(
            "checkpoint signature does not verify (wrong key or forged)"
        ) from None


def check_own_hash(record: AuditRecord) -> bool:
    expected = record_hash(record.seq, record.time, record.event, record.fields, record.prev)
    return hmac.compare_digest(expected, record.hash)


def iter_lines(handle: IO[bytes]) -> Iterator[tuple[bytes, bool]]:
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
