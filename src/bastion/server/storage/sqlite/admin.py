"""The operator tables in a single server's SQLite file (see :mod:`bastion.server.admin.policy`).

:class:`AdminDB` is the synchronous access ``bastion admin`` and the server share;
:class:`SQLiteAdmin` runs it on one worker thread for the event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Final, TypeVar

from bastion.errors import ConfigError, StorageError
from bastion.server.admin.policy import (
    VERSION_KEY,
    AdminEvent,
    Policy,
    UserSummary,
    check_invite,
    invite_hash,
    new_invite_code,
    parse_setting,
    policy_from_rows,
)
from bastion.server.storage.sqlite.relay import SCHEMA as STORE_SCHEMA

DB_FILE: Final = "bastion.db"

T = TypeVar("T")

ADMIN_SCHEMA = """
CREATE TABLE IF NOT EXISTS policy (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS invites (
    code_hash BLOB PRIMARY KEY,
    uses_left INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS admin_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    handled INTEGER NOT NULL DEFAULT 0  -- kept by older releases; read once, see first_cursor
);
"""


class AdminDB:
    """Synchronous access to the operator tables of one server's database.

    Opening creates the tables if needed; raises :class:`ConfigError` if the
    data folder does not exist and :class:`StorageError` if the database
    cannot be opened.
    """

    def __init__(self, data_dir: Path) -> None:
        if not data_dir.is_dir():
            raise ConfigError(f"there is no server data folder at {data_dir}")
        try:
            self._conn = sqlite3.connect(data_dir / DB_FILE, isolation_level=None, timeout=10)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(STORE_SCHEMA + ADMIN_SCHEMA)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the server database: {exc}") from None

    def close(self) -> None:
        """Close the database connection."""
        self._conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StorageError(f"the server database refused the change: {exc}") from None

    def _event(self, conn: sqlite3.Connection, now_ms: int, action: str, target: str) -> None:
        conn.execute(
            "INSERT INTO admin_events (at, action, target) VALUES (?, ?, ?)",
            (now_ms, action, target),
        )

    # --- policy ------------------------------------------------------------------------------

    def policy(self) -> Policy:
        """The current policy (defaults for settings never set)."""
        try:
            rows = dict(self._conn.execute("SELECT key, value FROM policy").fetchall())
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the policy: {exc}") from None
        return policy_from_rows(rows)

    def set_policy(self, setting: str, *, now_ms: int) -> Policy:
        """Apply one ``KEY=VALUE`` setting; returns the new policy.

        Raises :class:`ConfigError` for an invalid setting.
        """
        key, value = parse_setting(setting)
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO policy (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
            conn.execute(
                "INSERT INTO policy (key, value) VALUES (?, '2')"
                " ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
                (VERSION_KEY,),
            )
            self._event(conn, now_ms, "policy.set", f"{key}={value}")
        return self.policy()

    # --- users -------------------------------------------------------------------------------

    def users(self) -> list[UserSummary]:
        """Every account, by name."""
        rows = self._conn.execute(
            "SELECT a.username, a.created_at, a.disabled,"
            " (SELECT count(*) FROM devices d WHERE d.username = a.username)"
            " FROM accounts a ORDER BY a.username"
        ).fetchall()
        return [UserSummary(r[0], r[1], bool(r[2]), r[3]) for r in rows]

    def set_disabled(self, username: str, disabled: bool, *, now_ms: int) -> None:
        """Disable or enable an account; raises :class:`ConfigError` if there is none."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE accounts SET disabled = ? WHERE username = ?", (int(disabled), username)
            )
            if cursor.rowcount != 1:
                raise ConfigError(f"there is no user named {username!r}")
            self._event(conn, now_ms, "user.disabled" if disabled else "user.enabled", username)

    # --- invites -----------------------------------------------------------------------------

    def create_invite(self, *, uses: int, expires_at_ms: int, now_ms: int) -> str:
        """A new invite code good for ``uses`` registrations until ``expires_at_ms``.

        Raises :class:`ConfigError` for a use count out of range or an expiry in the past.
        """
        check_invite(uses=uses, expires_at_ms=expires_at_ms, now_ms=now_ms)
        code = new_invite_code()
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO invites (code_hash, uses_left, expires_at, created_at)"
                " VALUES (?, ?, ?, ?)",
                (invite_hash(code), uses, expires_at_ms, now_ms),
            )
            self._event(conn, now_ms, "invite.created", f"uses={uses}")
        return code

    def use_invite(self, code: str, *, now_ms: int) -> bool:
        """Take one use of an invite; False if it is unknown, used up or expired."""
        with self._transaction() as conn:
            row = conn.execute(
                "UPDATE invites SET uses_left = uses_left - 1"
                " WHERE code_hash = ? AND uses_left > 0 AND expires_at > ? RETURNING uses_left",
                (invite_hash(code), now_ms),
            ).fetchone()
        return row is not None

    def return_invite(self, code: str) -> None:
        """Give back a use taken by a registration that then failed."""
        with self._transaction() as conn:
            conn.execute(
                "UPDATE invites SET uses_left = uses_left + 1 WHERE code_hash = ?",
                (invite_hash(code),),
            )

    # --- events for the running server -------------------------------------------------------

    def events_after(self, after_id: int, limit: int = 256) -> list[AdminEvent]:
        """Admin events with an id above ``after_id``, oldest first."""
        try:
            rows = self._conn.execute(
                "SELECT id, at, action, target FROM admin_events WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read admin events: {exc}") from None
        return [AdminEvent(*row) for row in rows]

    def first_cursor(self) -> int:
        """Where a server with no saved position starts reading events.

        Just before the first event not yet handled: databases written before
        positions were kept mark applied events ``handled``.
        """
        try:
            row = self._conn.execute(
                "SELECT (SELECT min(id) - 1 FROM admin_events WHERE handled = 0),"
                " (SELECT max(id) FROM admin_events)"
            ).fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read admin events: {exc}") from None
        return int(row[0] if row[0] is not None else row[1] or 0)

    def queue_depth(self) -> int:
        """Envelopes waiting in all device queues (for the metrics gauge)."""
        try:
            return int(self._conn.execute("SELECT count(*) FROM queue").fetchone()[0])
        except sqlite3.Error as exc:
            raise StorageError(f"cannot count the queue: {exc}") from None


class SQLiteAdmin:
    """:class:`AdminBackend` on a single server's SQLite file, through one worker thread.

    The event loop never waits on the database. Raises as :class:`AdminDB` does.
    """

    def __init__(self, db: AdminDB, executor: ThreadPoolExecutor) -> None:
        self._db = db
        self._executor = executor

    @classmethod
    async def open(cls, data_dir: Path) -> SQLiteAdmin:
        """Open (and create if needed) the operator tables of the server in ``data_dir``."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bastion-admin")
        try:
            db = await asyncio.wrap_future(executor.submit(AdminDB, data_dir))
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(db, executor)

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self._executor.submit(fn))

    async def source(self) -> str:
        """One server, one file: its event ids are the only ones its data folder knows."""
        return "sqlite"

    async def policy(self) -> Policy:
        """See :meth:`AdminBackend.policy`."""
        return await self._call(self._db.policy)

    async def set_policy(self, setting: str, *, now_ms: int) -> Policy:
        """See :meth:`AdminBackend.set_policy`."""
        return await self._call(lambda: self._db.set_policy(setting, now_ms=now_ms))

    async def users(self) -> list[UserSummary]:
        """See :meth:`AdminBackend.users`."""
        return await self._call(self._db.users)

    async def set_disabled(self, username: str, disabled: bool, *, now_ms: int) -> None:
        """See :meth:`AdminBackend.set_disabled`."""
        await self._call(lambda: self._db.set_disabled(username, disabled, now_ms=now_ms))

    async def create_invite(self, *, uses: int, expires_at_ms: int, now_ms: int) -> str:
        """See :meth:`AdminBackend.create_invite`."""
        return await self._call(
            lambda: self._db.create_invite(uses=uses, expires_at_ms=expires_at_ms, now_ms=now_ms)
        )

    async def use_invite(self, code: str, *, now_ms: int) -> bool:
        """See :meth:`AdminBackend.use_invite`."""
        return await self._call(lambda: self._db.use_invite(code, now_ms=now_ms))

    async def return_invite(self, code: str) -> None:
        """See :meth:`AdminBackend.return_invite`."""
        await self._call(lambda: self._db.return_invite(code))

    async def first_cursor(self) -> int:
        """See :meth:`AdminDB.first_cursor`."""
        return await self._call(self._db.first_cursor)

    async def events_after(self, after_id: int, limit: int = 256) -> list[AdminEvent]:
        """See :meth:`AdminBackend.events_after`."""
        return await self._call(lambda: self._db.events_after(after_id, limit))

    async def queue_depth(self) -> int:
        """See :meth:`AdminBackend.queue_depth`."""
        return await self._call(self._db.queue_depth)

    async def close(self) -> None:
        """Close the database and stop the worker thread."""
        try:
            await self._call(self._db.close)
        finally:
            self._executor.shutdown(wait=True)
