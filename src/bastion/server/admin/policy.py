"""Operator state kept with the relay's data: policy, invites, disabled users, admin events.

This module holds its pure part (the records, setting and invite rules). It
lives in the server's database, in tables of its own (the
:class:`~bastion.server.storage.admin.AdminBackend` interface): the SQLite file
of a single server (:class:`~bastion.server.storage.sqlite.admin.SQLiteAdmin`),
or the PostgreSQL schema every node of a cluster shares
(:class:`~bastion.server.storage.postgres.admin.PgAdmin`). So ``bastion admin`` works the
same on a stopped or a running server and from any node: a command writes its
change and an ``admin_events`` row in one transaction; every running node polls
for events after the last one it applied, about once a second
(``Limits.admin_poll_s``), applies each (a disabled user is signed out of that
node) and writes it to its audit log. A stopped node catches up on its next
start. Nothing here needs a socket or a second secret, and a change is durable
before the command returns.

Invite codes are stored only as SHA-256 hashes, so reading the database does
not hand out codes that still work.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Final, Literal

from bastion.errors import ConfigError

REGISTRATION_MODES: Final = ("open", "invite", "closed")
MAX_INVITE_USES: Final = 10_000
MAX_FILE_MB: Final = 100_000


Registration = Literal["open", "invite", "closed"]


@dataclass(frozen=True, slots=True)
class Policy:
    """The organisation's policy: who may register, and whether files may be sent."""

    registration: Registration = "open"
    file_transfer: bool = True
    max_file_mb: int = 100
    version: int = 1  # raised by every change; clients refuse an older signed policy

    def as_dict(self) -> dict[str, str | int | bool]:
        """The policy as plain values (for ``--json`` and the audit log)."""
        return {
            "version": self.version,
            "registration": self.registration,
            "file_transfer": self.file_transfer,
            "max_file_mb": self.max_file_mb,
        }


@dataclass(frozen=True, slots=True)
class UserSummary:
    """What ``bastion admin users list`` shows about an account."""

    username: str
    created_at: int
    disabled: bool
    devices: int


@dataclass(frozen=True, slots=True)
class AdminEvent:
    """A change made by an operator that the running server must apply and audit."""

    id: int
    at: int
    action: str
    target: str


def parse_setting(text: str) -> tuple[str, str]:
    """Check a ``KEY=VALUE`` policy setting; returns the key and the stored value.

    Raises :class:`ConfigError` for an unknown key or a value it does not take.
    """
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep:
        raise ConfigError("a policy setting is written KEY=VALUE")
    if key == "registration":
        if value not in REGISTRATION_MODES:
            raise ConfigError("registration must be open, invite or closed")
        return key, value
    if key == "file_transfer":
        if value not in ("on", "off"):
            raise ConfigError("file_transfer must be on or off")
        return key, value
    if key == "max_file_mb":
        if not value.isdigit() or not 1 <= int(value) <= MAX_FILE_MB:
            raise ConfigError(f"max_file_mb must be a whole number from 1 to {MAX_FILE_MB}")
        return key, str(int(value))
    raise ConfigError(f"unknown policy setting {key!r} (registration, file_transfer, max_file_mb)")


def check_invite(*, uses: int, expires_at_ms: int, now_ms: int) -> None:
    """Raise :class:`ConfigError` for a use count out of range or an expiry in the past."""
    if not 1 <= uses <= MAX_INVITE_USES:
        raise ConfigError(f"uses must be from 1 to {MAX_INVITE_USES}")
    if expires_at_ms <= now_ms:
        raise ConfigError("the invite must expire in the future")


VERSION_KEY = "_version"


def policy_from_rows(rows: dict[str, str]) -> Policy:
    """The policy stored as ``key -> value`` rows (defaults for keys never set)."""
    registration = rows.get("registration", "open")
    mode: Registration = "open"
    if registration == "invite":
        mode = "invite"
    elif registration != "open":
        mode = "closed"  # anything unexpected fails closed
    return Policy(
        registration=mode,
        file_transfer=rows.get("file_transfer", "on") == "on",
        max_file_mb=int(rows.get("max_file_mb", "100")),
        version=int(rows.get(VERSION_KEY, "1")),
    )


def new_invite_code() -> str:
    """A fresh invite code: 24 URL-safe characters, about 143.9 random bits.

    Never starting with ``-``, which a command line would read as an option
    (``bastion register --invite CODE``).
    """
    while (code := secrets.token_urlsafe(18)).startswith("-"):
        pass
    return code


def invite_hash(code: str) -> bytes:
    """What the database keeps of an invite code."""
    return hashlib.sha256(b"bastion/v1/invite\x00" + code.encode()).digest()
