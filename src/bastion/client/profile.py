"""A client profile: one device's keys, sessions, contacts and history, encrypted at rest.

The profile folder (mode 0700) holds ``profile.json`` (the Argon2id salt and
cost, and a check value; nothing secret) and ``profile.db`` (SQLite). Every row
of the database is sealed with AES-256-GCM under a key derived from the
passphrase; lookups go through HMAC tags, so neither names, message ids nor
contact usernames appear in clear on disk.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from bastion.client.passphrase import check_new_passphrase
from bastion.crypto.atrest import (
    SALT_BYTES,
    KdfParams,
    SecretBox,
    derive_master_key,
    purpose_key,
)
from bastion.errors import ProfileError

T = TypeVar("T")
V = TypeVar("V")

HEADER_FILE = "profile.json"
DB_FILE = "profile.db"
_CHECK = b"bastion profile v1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (tag BLOB PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    peer BLOB NOT NULL, sid BLOB NOT NULL, value BLOB NOT NULL, used INTEGER NOT NULL,
    PRIMARY KEY (peer, sid)
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, conv BLOB NOT NULL, tag BLOB NOT NULL UNIQUE,
    value BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conv ON messages (conv, seq);
CREATE TABLE IF NOT EXISTS seen (tag BLOB PRIMARY KEY);
CREATE TABLE IF NOT EXISTS outbox (tag BLOB PRIMARY KEY, value BLOB NOT NULL);
"""

_encoder = msgspec.msgpack.Encoder()


class Profile:
    """An unlocked profile. Create with :meth:`create`, open with :meth:`unlock`."""

    def __init__(self, path: Path, master: bytes, conn: sqlite3.Connection) -> None:
        self.path = path
        self._box = SecretBox(purpose_key(master, "records"))
        self._index = purpose_key(master, "index")
        self.pickle_key = purpose_key(master, "vodozemac-pickle")
        self._conn = conn

    def __repr__(self) -> str:
        return f"Profile({self.path.name})"

    # --- lifecycle ----------------------------------------------------------------------------

    @staticmethod
    def exists(path: Path) -> bool:
        """Whether a profile is stored at ``path``."""
        return (path / HEADER_FILE).exists()

    @classmethod
    def create(cls, path: Path, passphrase: str, *, params: KdfParams | None = None) -> Profile:
        """Create a new, empty profile.

        Raises :class:`ProfileError` if one exists there or the passphrase is too
        short (see :mod:`bastion.client.passphrase`).
        """
        if not passphrase:
            raise ProfileError("a passphrase is required to protect the profile")
        check_new_passphrase(passphrase)
        if cls.exists(path):
            raise ProfileError(f"a profile already exists in {path}")
        params = params or KdfParams()
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.chmod(0o700)
        salt = os.urandom(SALT_BYTES)
        master = derive_master_key(passphrase, salt, params)
        check = SecretBox(purpose_key(master, "check")).seal(_CHECK, b"check")
        header = {
            "version": 1,
            "kdf": {
                "algorithm": "argon2id",
                "memory_kib": params.memory_kib,
                "iterations": params.iterations,
                "lanes": params.lanes,
            },
            "salt": base64.b64encode(salt).decode(),
            "check": base64.b64encode(check).decode(),
        }
        _write_private(path / DB_FILE, b"")
        profile = cls(path, master, _connect(path / DB_FILE))
        _write_private(path / HEADER_FILE, json.dumps(header, indent=2).encode())
        return profile

    @classmethod
    def unlock(cls, path: Path, passphrase: str) -> Profile:
        """Open a profile; raises :class:`ProfileError` if missing or the passphrase is wrong."""
        try:
            header = json.loads((path / HEADER_FILE).read_text())
            kdf = header["kdf"]
            if header["version"] != 1 or kdf["algorithm"] != "argon2id":
                raise ProfileError("this profile was made by an unknown version")
            params = KdfParams(
                memory_kib=int(kdf["memory_kib"]),
                iterations=int(kdf["iterations"]),
                lanes=int(kdf["lanes"]),
            )
            salt = base64.b64decode(header["salt"])
            check = base64.b64decode(header["check"])
        except FileNotFoundError:
            raise ProfileError(f"no profile in {path}; register or link a device first") from None
        except (OSError, ValueError, KeyError, TypeError):
            raise ProfileError(f"the profile header in {path} is damaged") from None
        master = derive_master_key(passphrase, salt, params)
        try:
            opened = SecretBox(purpose_key(master, "check")).open(check, b"check")
        except ProfileError:
            raise ProfileError("wrong passphrase for this profile") from None
        if not hmac.compare_digest(opened, _CHECK):
            raise ProfileError("wrong passphrase for this profile")
        return cls(path, master, _connect(path / DB_FILE))

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    @classmethod
    @contextmanager
    def provisional(cls, path: Path, passphrase: str) -> Iterator[Profile]:
        """Create a profile that is removed again if the block fails (e.g. registration refused)."""
        profile = cls.create(path, passphrase)
        try:
            yield profile
        except BaseException:
            profile.close()
            for name in (DB_FILE, HEADER_FILE):
                (path / name).unlink(missing_ok=True)
            raise

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the block atomically: everything it wrote is kept, or nothing."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # --- tags and sealing ---------------------------------------------------------------------

    def tag(self, kind: str, name: str | bytes) -> bytes:
        """The HMAC tag that stands for ``name`` on disk."""
        raw = name.encode() if isinstance(name, str) else name
        return hmac.new(self._index, kind.encode() + b"\0" + raw, hashlib.sha256).digest()

    def _seal(self, value: Any, aad: bytes) -> bytes:
        return self._box.seal(_encoder.encode(value), aad)

    def _open(self, blob: bytes, aad: bytes, kind: type[T]) -> T:
        return _decode(_decoder(kind), self._box.open(blob, aad))

    # --- key/value records ------------------------------------------------------------------

    def get(self, name: str, kind: type[T]) -> T | None:
        """A record by name, or None."""
        tag = self.tag("kv", name)
        row = self._conn.execute("SELECT value FROM kv WHERE tag = ?", (tag,)).fetchone()
        return None if row is None else self._open(row[0], tag, kind)

    def put(self, name: str, value: Any) -> None:
        """Store a record under a name (replacing it)."""
        tag = self.tag("kv", name)
        self._conn.execute(
            "INSERT OR REPLACE INTO kv (tag, value) VALUES (?, ?)", (tag, self._seal(value, tag))
        )

    # --- Olm sessions -------------------------------------------------------------------------

    def sessions(self, peer_curve25519: bytes) -> list[tuple[str, str]]:
        """(session id, pickle) of every session with a device, most recently used first."""
        peer = self.tag("peer", peer_curve25519)
        rows = self._conn.execute(
            "SELECT sid, value FROM sessions WHERE peer = ? ORDER BY used DESC", (peer,)
        ).fetchall()
        out = []
        for sid, value in rows:
            out.append((bytes(sid).decode(), self._open(value, peer + bytes(sid), str)))
        return out

    def save_session(self, peer_curve25519: bytes, session_id: str, pickle: str, used: int) -> None:
        """Store a session's pickle (after it was used successfully)."""
        peer = self.tag("peer", peer_curve25519)
        sid = session_id.encode()
        self._conn.execute(
            "INSERT OR REPLACE INTO sessions (peer, sid, value, used) VALUES (?, ?, ?, ?)",
            (peer, sid, self._seal(pickle, peer + sid), used),
        )

    # --- seen markers (replay and duplicate detection) --------------------------------------

    def seen(self, kind: str, name: str | bytes) -> bool:
        """Whether ``name`` of this kind was recorded before."""
        row = self._conn.execute(
            "SELECT 1 FROM seen WHERE tag = ?", (self.tag("seen:" + kind, name),)
        ).fetchone()
        return row is not None

    def mark_seen(self, kind: str, name: str | bytes) -> None:
        """Record ``name`` of this kind."""
        self._conn.execute(
            "INSERT OR IGNORE INTO seen (tag) VALUES (?)", (self.tag("seen:" + kind, name),)
        )

    # --- history ------------------------------------------------------------------------------

    def add_message(self, conversation: str, message_id: bytes, record: Any) -> bool:
        """Append to a conversation's history; False if that message id is already there.

        The record is sealed to both its conversation and its id, so a row moved
        to another conversation does not open there.
        """
        conv = self.tag("conv", conversation)
        tag = self.tag("msg", message_id)
        try:
            self._conn.execute(
                "INSERT INTO messages (conv, tag, value) VALUES (?, ?, ?)",
                (conv, tag, self._seal(record, conv + tag)),
            )
        except sqlite3.IntegrityError:
            return False
        return True

    def update_message(self, message_id: bytes, record: Any) -> None:
        """Replace the stored record of a message (its delivery state changed)."""
        tag = self.tag("msg", message_id)
        row = self._conn.execute("SELECT conv FROM messages WHERE tag = ?", (tag,)).fetchone()
        if row is None:
            return
        self._conn.execute(
            "UPDATE messages SET value = ? WHERE tag = ?",
            (self._seal(record, bytes(row[0]) + tag), tag),
        )

    def message(self, message_id: bytes, kind: type[T]) -> T | None:
        """One history record by message id, or None."""
        tag = self.tag("msg", message_id)
        row = self._conn.execute(
            "SELECT conv, value FROM messages WHERE tag = ?", (tag,)
        ).fetchone()
        return None if row is None else self._open(row[1], bytes(row[0]) + tag, kind)

    def history(self, conversation: str, kind: type[T], *, limit: int = 1000) -> list[T]:
        """The last ``limit`` records of a conversation, oldest first."""
        conv = self.tag("conv", conversation)
        rows = self._conn.execute(
            "SELECT tag, value FROM messages WHERE conv = ? ORDER BY seq DESC LIMIT ?",
            (conv, limit),
        ).fetchall()
        return [self._open(value, conv + bytes(tag), kind) for tag, value in reversed(rows)]

    def each_message(self, kind: type[T], *, batch: int = 512) -> Iterator[T]:
        """Every history record of every conversation, in the order they were stored.

        Raises :class:`ProfileError` if a stored record was altered.
        """
        decoder = _decoder(kind)
        cursor = self._conn.execute("SELECT conv, tag, value FROM messages ORDER BY seq")
        try:
            while rows := cursor.fetchmany(batch):
                for conv, tag, value in rows:
                    yield _decode(decoder, self._box.open(value, conv + tag))
        finally:
            cursor.close()

    def search_messages(
        self,
        view: type[V],
        matches: Callable[[V], bool],
        kind: type[T],
        *,
        limit: int,
        batch: int = 512,
    ) -> list[T]:
        """Records of every conversation that ``matches`` accepts, newest first, at most ``limit``.

        One scan of the history in the order it was stored, newest first,
        opening the sealed records a batch at a time and stopping at the
        ``limit``-th match: nothing is indexed, and nothing opened is written
        anywhere. ``matches`` looks at each record as ``view``, a Struct with
        some of the record's fields (cheaper to decode); a match is returned as
        ``kind``. Raises :class:`ProfileError` if a stored record was altered.
        """
        found: list[T] = []
        if limit < 1:
            return found
        look = _decoder(view)
        cursor = self._conn.execute("SELECT conv, tag, value FROM messages ORDER BY seq DESC")
        try:
            while rows := cursor.fetchmany(batch):
                for conv, tag, value in rows:
                    raw = self._box.open(value, conv + tag)
                    if matches(_decode(look, raw)):
                        found.append(_decode(_decoder(kind), raw))
                        if len(found) >= limit:
                            return found
        finally:
            cursor.close()
        return found

    # --- outbox -------------------------------------------------------------------------------

    def queue_outgoing(self, message_id: bytes, frame: bytes) -> None:
        """Keep an encrypted outgoing frame until the server acknowledges it."""
        tag = self.tag("out", message_id)
        self._conn.execute(
            "INSERT OR REPLACE INTO outbox (tag, value) VALUES (?, ?)",
            (tag, self._seal(frame, tag)),
        )

    def outgoing(self) -> list[bytes]:
        """Frames waiting for the server's acknowledgement."""
        rows = self._conn.execute("SELECT tag, value FROM outbox ORDER BY rowid").fetchall()
        return [self._open(value, bytes(tag), bytes) for tag, value in rows]

    def sent(self, message_id: bytes) -> None:
        """Forget an outgoing frame the server acknowledged."""
        self._conn.execute("DELETE FROM outbox WHERE tag = ?", (self.tag("out", message_id),))


_DECODERS: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {}


def _decoder(kind: type[T]) -> msgspec.msgpack.Decoder[T]:
    """One decoder per record type, made once (cheaper than decoding with ``type=``)."""
    found = _DECODERS.get(kind)
    if found is None:
        found = _DECODERS[kind] = msgspec.msgpack.Decoder(kind)
    return found


def _decode(decoder: msgspec.msgpack.Decoder[T], raw: bytes) -> T:
    try:
        return decoder.decode(raw)
    except msgspec.MsgspecError:
        raise ProfileError("a stored record has an unexpected shape") from None


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA secure_delete=ON")
    conn.executescript(SCHEMA)
    return conn
