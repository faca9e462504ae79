"""The embedded store: one SQLite file in WAL mode, written by one thread.

Operations queue up for a single database thread, which runs whatever is
waiting in one transaction (group commit) with ``synchronous=FULL``: every
operation's result is released only after the commit that made it durable,
so a sender's acknowledgement survives a crash, and one fsync serves many
messages. A batch runs optimistically, without a savepoint per operation; if
one operation fails, the whole transaction is rolled back and the batch runs
again with each operation isolated, so a failed operation never leaves a
partial write and never takes the others down with it.

The device ids of recently messaged accounts, which pairs of accounts are
accepted contacts, and an upper bound of each recipient's queue are kept on
the database thread for the checks of every message. They stay exact: triggers
on the ``devices`` and ``contacts`` tables drop an entry on any insert, delete
or update made through this connection, a trigger on ``queue`` counts every
insert into the bound, and all three are dropped after any rollback and after a
commit by another connection (``PRAGMA data_version``).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bastion.errors import StorageError
from bastion.server.core.contact_rules import ACCEPTED
from bastion.server.core.messages import check_copies
from bastion.server.storage.interfaces import (
    AccountRecord,
    ClaimedKeyRecord,
    Copy,
    DeviceRecord,
    DeviceRefusedError,
    KeyRecord,
    QueuedEnvelope,
    RunningLoop,
    StoredMessage,
    UsernameTakenError,
)

T = TypeVar("T")

log = logging.getLogger("bastion.server.storage.sqlite.relay")

_DEVICE_CACHE_MAX = 100_000
_CHECKPOINT_EVERY_S = 0.5
_LAZY_WAIT_S = 0.05
_CONTACT_CACHE_MAX = 1_000_000
_TRIGGERS = (
    "CREATE TEMP TRIGGER IF NOT EXISTS device_added AFTER INSERT ON main.devices"
    " BEGIN SELECT bastion_devices_changed(NEW.username); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS device_removed AFTER DELETE ON main.devices"
    " BEGIN SELECT bastion_devices_changed(OLD.username); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS device_changed AFTER UPDATE OF username, device_id"
    " ON main.devices BEGIN SELECT bastion_devices_changed(OLD.username),"
    " bastion_devices_changed(NEW.username); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS contact_added AFTER INSERT ON main.contacts"
    " BEGIN SELECT bastion_contacts_changed(NEW.owner, NEW.peer); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS contact_removed AFTER DELETE ON main.contacts"
    " BEGIN SELECT bastion_contacts_changed(OLD.owner, OLD.peer); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS contact_changed AFTER UPDATE ON main.contacts"
    " BEGIN SELECT bastion_contacts_changed(OLD.owner, OLD.peer),"
    " bastion_contacts_changed(NEW.owner, NEW.peer); END",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    username TEXT PRIMARY KEY,
    identity_key BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS devices (
    username TEXT NOT NULL REFERENCES accounts(username),
    device_id TEXT NOT NULL,
    ed25519 BLOB NOT NULL,
    curve25519 BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    certificate BLOB NOT NULL,
    fallback_key BLOB,
    fallback_signature BLOB,
    PRIMARY KEY (username, device_id)
);
CREATE TABLE IF NOT EXISTS one_time_keys (
    username TEXT NOT NULL,
    device_id TEXT NOT NULL,
    key BLOB NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (username, device_id, key)
);
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    username TEXT NOT NULL,
    device_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    sender_device TEXT NOT NULL,
    server_ts INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_by_device ON queue (username, device_id, seq);
CREATE TABLE IF NOT EXISTS sent (
    sender_device TEXT NOT NULL,
    client_msg_id BLOB NOT NULL,
    server_ts INTEGER NOT NULL,
    PRIMARY KEY (sender_device, client_msg_id)
);
CREATE INDEX IF NOT EXISTS sent_by_time ON sent (server_ts);
CREATE TABLE IF NOT EXISTS revoked_devices (
    device_id TEXT PRIMARY KEY,
    username TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS contacts (
    owner TEXT NOT NULL,
    peer TEXT NOT NULL,
    state TEXT NOT NULL,
    note_id BLOB,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (owner, peer)
) WITHOUT ROWID;
"""


class _Op:
    """One call waiting for the database thread.

    ``refusals``: a StorageError that ``fn`` returns (rather than raises, which
    would undo its batch) is raised to the caller. ``lazy``: it may wait up to
    ``_LAZY_WAIT_S`` for other operations to commit with.
    """

    __slots__ = ("fn", "future", "lazy", "loop", "refusals")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        *,
        refusals: bool,
        lazy: bool,
    ) -> None:
        self.fn = fn
        self.loop = loop
        self.future = future
        self.refusals = refusals
        self.lazy = lazy


def _resolve(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in results:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class SQLiteStore:
    """:class:`~bastion.server.storage.interfaces.Store` on one SQLite file."""

    def __init__(
        self,
        path: Path,
        *,
        max_batch: int = 512,
        sent_retention_ms: int = 7 * 86_400_000,
        prune_every_ms: int = 60_000,
    ):
        self._path = path
        self._max_batch = max_batch
        self._sent_retention_ms = sent_retention_ms
        self._prune_every_ms = prune_every_ms
        self._last_prune_ms = 0
        # Database thread only: username -> device ids, the pairs (sorted) known to be
        # accepted contacts, username -> an upper bound of its queued envelopes, and the
        # last data_version seen.
        self._device_ids: dict[str, tuple[str, ...]] = {}
        self._accepted: set[tuple[str, str]] = set()
        self._queued: dict[str, int] = {}
        self._running_loop = RunningLoop()
        self._data_version = -1
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bastion-sqlite", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise StorageError(f"cannot open the database: {self._error}")
        self._stop_checkpoints = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint, name="bastion-sqlite-checkpoint", daemon=True
        )
        self._checkpointer.start()

    # --- the database thread ---------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        # Checkpoints run on their own thread (below), never inside a commit.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(SCHEMA)
        conn.create_function("bastion_devices_changed", 1, self._forget_devices)
        conn.create_function("bastion_contacts_changed", 2, self._forget_contacts)
        for trigger in _TRIGGERS:
            conn.execute(trigger)
        return conn

    def _checkpoint(self) -> None:
        """Copy committed pages from the WAL into the database file, off the commit path.

        A passive checkpoint waits for no one: the writer goes on committing while
        it runs, and the WAL is reused from its start once everything is copied.
        """
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            log.error("store.checkpoint_failed", extra={"error": type(exc).__name__})
            return
        try:
            while not self._stop_checkpoints.wait(_CHECKPOINT_EVERY_S):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # busy or I/O: the next round tries again
                    log.warning("store.checkpoint_failed", extra={"error": type(exc).__name__})
        finally:
            conn.close()

    def _forget_devices(self, username: object) -> None:
        if isinstance(username, str):
            self._device_ids.pop(username, None)

    def _forget_contacts(self, owner: object, peer: object) -> None:
        if isinstance(owner, str) and isinstance(peer, str):
            self._accepted.discard((owner, peer) if owner < peer else (peer, owner))

    def _forget_all(self) -> None:
        self._device_ids.clear()
        self._accepted.clear()
        self._queued.clear()

    def _queued_at_most(self, conn: sqlite3.Connection, username: str, limit: int) -> int:
        """An upper bound of the envelopes waiting for ``username``, exact if ``limit`` or more.

        The bound is a real count plus every envelope this store queued since;
        deletions only make it looser. It is counted again once it reaches ``limit``,
        and forgotten after any operation of a feature (which may queue envelopes too).
        """
        bound = self._queued.get(username)
        if bound is not None and bound < limit:
            return bound
        row = conn.execute("SELECT count(*) FROM queue WHERE username = ?", (username,))
        count = int(row.fetchone()[0])
        if username not in self._queued and len(self._queued) >= _DEVICE_CACHE_MAX:
            del self._queued[next(iter(self._queued))]
        self._queued[username] = count
        return count

    def _are_contacts(self, conn: sqlite3.Connection, a: str, b: str) -> bool:
        """Whether both rows of the pair say accepted (database thread; cached when so)."""
        pair = (a, b) if a < b else (b, a)
        if pair in self._accepted:
            return True
        accepted = conn.execute(
            "SELECT count(*) FROM contacts WHERE state = ? AND"
            " ((owner = ? AND peer = ?) OR (owner = ? AND peer = ?))",
            (ACCEPTED, a, b, b, a),
        ).fetchone()[0]
        if accepted != 2:
            return False  # only accepted pairs are cached: strangers must not fill the cache
        if len(self._accepted) >= _CONTACT_CACHE_MAX:
            self._accepted.pop()
        self._accepted.add(pair)
        return True

    def _device_ids_of(self, conn: sqlite3.Connection, username: str) -> tuple[str, ...]:
        """The account's device ids, from the cache when it holds them (database thread)."""
        cached = self._device_ids.get(username)
        if cached is not None:
            return cached
        ids = tuple(
            row[0]
            for row in conn.execute(
                "SELECT device_id FROM devices WHERE username = ? ORDER BY device_id", (username,)
            )
        )
        if ids:  # unknown names are not cached: a flood of them must not fill the cache
            if len(self._device_ids) >= _DEVICE_CACHE_MAX:
                del self._device_ids[next(iter(self._device_ids))]
            self._device_ids[username] = ids
        return ids

    def _run(self) -> None:
        try:
            conn = self._open()
        except sqlite3.Error as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        # Lazy operations (acknowledgements) wait up to _LAZY_WAIT_S for other work, so
        # that they share its commit (and its fsync) instead of paying for their own.
        held: list[_Op] = []
        held_until = 0.0
        stopping = False
        while not stopping:
            try:
                if held:
                    item = self._queue.get(timeout=max(0.0, held_until - time.monotonic()))
                else:
                    item = self._queue.get()
            except queue.Empty:
                self._run_batch(conn, held)  # nothing came: they commit alone
                held = []
                continue
            batch, held = held, []
            was_holding = bool(batch)
            eager = False
            while True:
                if item is None:
                    stopping = True
                    break
                batch.append(item)
                eager = eager or not item.lazy
                if len(batch) >= self._max_batch:
                    eager = True
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if not eager and not stopping:
                held = batch
                if not was_holding:
                    held_until = time.monotonic() + _LAZY_WAIT_S
                continue
            if batch:
                self._run_batch(conn, batch)
        conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        results: list[tuple[_Op, bool, Any]] | None
        try:
            self._begin(conn)
            results = self._run_optimistic(conn, batch)
            if results is None:
                # One operation failed: undo the whole batch and run it again, each
                # operation in its own savepoint.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._forget_all()
                self._begin(conn)
                results = self._run_isolated(conn, batch)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._forget_all()
            failure = StorageError(f"database commit failed: {exc}")
            results = [(op, False, failure) for op in batch]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for op, ok, value in results:
            refused = op.refusals and isinstance(value, StorageError)
            by_loop.setdefault(op.loop, []).append((op.future, ok and not refused, value))
        for loop, outcomes in by_loop.items():  # one wake-up per loop, not one per operation
            loop.call_soon_threadsafe(_resolve, outcomes)

    def _begin(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        # Another connection (``bastion admin``) may have changed devices since the last batch;
        # with the write lock held, nothing else commits until this batch does.
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self._data_version = version
            self._forget_all()

    @staticmethod
    def _run_optimistic(
        conn: sqlite3.Connection, batch: list[_Op]
    ) -> list[tuple[_Op, bool, Any]] | None:
        """Every operation's result, or None as soon as one fails (the batch is then undone)."""
        results: list[tuple[_Op, bool, Any]] = []
        for op in batch:
            try:
                value = op.fn(conn)
            except (StorageError, sqlite3.Error):
                return None
            results.append((op, True, value))
        return results

    def _run_isolated(
        self, conn: sqlite3.Connection, batch: list[_Op]
    ) -> list[tuple[_Op, bool, Any]]:
        """Each operation in a savepoint: a failed one is undone alone and reported."""
        results: list[tuple[_Op, bool, Any]] = []
        for op in batch:
            conn.execute("SAVEPOINT op")
            try:
                value = op.fn(conn)
            except (StorageError, sqlite3.Error) as exc:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                self._forget_all()
                error: BaseException = (
                    exc if isinstance(exc, StorageError) else StorageError(str(exc))
                )
                results.append((op, False, error))
            else:
                conn.execute("RELEASE op")
                results.append((op, True, value))
        return results

    def _submit(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        *,
        refusals: bool = False,
        lazy: bool = False,
    ) -> asyncio.Future[Any]:
        loop = self._running_loop.get()
        future: asyncio.Future[Any] = loop.create_future()
        if self._thread.is_alive():
            self._queue.put(_Op(fn, loop, future, refusals=refusals, lazy=lazy))
        else:
            future.set_exception(StorageError("the store is closed"))
        return future

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        result: T = await self._submit(fn)
        return result

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the database thread inside the next group commit.

        For features that keep their own tables: ``fn`` must raise only
        StorageError (or sqlite3.Error) and is durable once this returns. It
        may run twice (when another operation of its batch fails, the first
        run is rolled back), so it must not change anything outside the database.
        """

        def op(conn: sqlite3.Connection) -> T:
            try:
                return fn(conn)
            finally:
                self._queued.clear()  # ``fn`` may have queued envelopes (group messages do)

        return await self._call(op)

    async def ensure_tables(self, statements: Sequence[str]) -> None:
        """Create a feature's tables and indexes (``CREATE ... IF NOT EXISTS`` statements)."""

        def op(conn: sqlite3.Connection) -> None:
            for statement in statements:
                conn.execute(statement)

        await self._call(op)

    async def close(self) -> None:
        """Finish queued work, then close the database."""
        self._stop_checkpoints.set()
        if self._thread.is_alive():
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)
        if self._checkpointer.is_alive():
            await asyncio.to_thread(self._checkpointer.join)

    # --- accounts and devices ----------------------------------------------------------------

    async def create_account(
        self,
        account: AccountRecord,
        device: DeviceRecord,
        one_time_keys: Sequence[KeyRecord],
        fallback_key: KeyRecord,
    ) -> None:
        """Create an account with its first device; raises UsernameTakenError."""

        def op(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO accounts (username, identity_key, created_at) VALUES (?, ?, ?)",
                    (account.username, account.identity_key, account.created_at),
                )
            except sqlite3.IntegrityError:
                raise UsernameTakenError("that username is taken") from None
            _insert_device(conn, device, fallback_key)
            _insert_keys(conn, device.username, device.device_id, one_time_keys)

        await self._call(op)

    async def get_account(self, username: str) -> AccountRecord | None:
        """The account, or None."""

        def op(conn: sqlite3.Connection) -> AccountRecord | None:
            row = conn.execute(
                "SELECT username, identity_key, created_at, disabled FROM accounts"
                " WHERE username = ?",
                (username,),
            ).fetchone()
            return None if row is None else AccountRecord(row[0], row[1], row[2], bool(row[3]))

        return await self._call(op)

    async def get_device(self, username: str, device_id: str) -> DeviceRecord | None:
        """One device, or None."""

        def op(conn: sqlite3.Connection) -> DeviceRecord | None:
            row = conn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE username = ? AND device_id = ?",  # noqa: S608
                (username, device_id),
            ).fetchone()
            return None if row is None else DeviceRecord(*row)

        return await self._call(op)

    async def list_devices(self, username: str) -> list[DeviceRecord]:
        """All devices of an account."""

        def op(conn: sqlite3.Connection) -> list[DeviceRecord]:
            return _devices(conn, username)

        return await self._call(op)

    async def add_device(
        self,
        device: DeviceRecord,
        one_time_keys: Sequence[KeyRecord],
        fallback_key: KeyRecord,
        *,
        max_devices: int,
    ) -> None:
        """Add a certified device to an existing account (see the Store protocol)."""

        def op(conn: sqlite3.Connection) -> None:
            revoked = conn.execute(
                "SELECT 1 FROM revoked_devices WHERE device_id = ?", (device.device_id,)
            ).fetchone()
            if revoked is not None:
                raise DeviceRefusedError("that device was revoked")
            if len(_devices(conn, device.username)) >= max_devices:
                raise DeviceRefusedError(f"an account can have at most {max_devices} devices")
            try:
                _insert_device(conn, device, fallback_key)
            except sqlite3.IntegrityError:
                raise DeviceRefusedError("that device is already part of the account") from None
            _insert_keys(conn, device.username, device.device_id, one_time_keys)

        await self._call(op)

    async def revoke_device(self, username: str, device_id: str) -> bool:
        """Remove a device, its keys and its queue; remember the id as revoked."""

        def op(conn: sqlite3.Connection) -> bool:
            removed = conn.execute(
                "DELETE FROM devices WHERE username = ? AND device_id = ?", (username, device_id)
            ).rowcount
            conn.execute(
                "DELETE FROM one_time_keys WHERE username = ? AND device_id = ?",
                (username, device_id),
            )
            conn.execute(
                "DELETE FROM queue WHERE username = ? AND device_id = ?", (username, device_id)
            )
            conn.execute(
                "INSERT OR IGNORE INTO revoked_devices (device_id, username) VALUES (?, ?)",
                (device_id, username),
            )
            return removed > 0

        return await self._call(op)

    # --- key stock -----------------------------------------------------------------------------

    async def add_one_time_keys(
        self, username: str, device_id: str, keys: Sequence[KeyRecord], fallback: KeyRecord | None
    ) -> int:
        """Add keys (and replace the fallback key); returns the new stock size."""

        def op(conn: sqlite3.Connection) -> int:
            _insert_keys(conn, username, device_id, keys)
            if fallback is not None:
                conn.execute(
                    "UPDATE devices SET fallback_key = ?, fallback_signature = ?"
                    " WHERE username = ? AND device_id = ?",
                    (fallback.key, fallback.signature, username, device_id),
                )
            return _count_keys(conn, username, device_id)

        return await self._call(op)

    async def count_one_time_keys(self, username: str, device_id: str) -> int:
        """The device's stock size."""
        return await self._call(lambda conn: _count_keys(conn, username, device_id))

    async def claim_keys(self, username: str) -> list[ClaimedKeyRecord]:
        """Take one key per device, atomically; the fallback key when the stock is empty."""

        def op(conn: sqlite3.Connection) -> list[ClaimedKeyRecord]:
            claimed: list[ClaimedKeyRecord] = []
            rows = conn.execute(
                "SELECT device_id, fallback_key, fallback_signature FROM devices"
                " WHERE username = ? ORDER BY device_id",
                (username,),
            ).fetchall()
            for device_id, fallback_key, fallback_signature in rows:
                row = conn.execute(
                    "DELETE FROM one_time_keys WHERE rowid = (SELECT rowid FROM one_time_keys"
                    " WHERE username = ? AND device_id = ? LIMIT 1) RETURNING key, signature",
                    (username, device_id),
                ).fetchone()
                if row is not None:
                    claimed.append(ClaimedKeyRecord(device_id, row[0], row[1], False))
                elif fallback_key is not None:
                    claimed.append(
                        ClaimedKeyRecord(device_id, fallback_key, fallback_signature, True)
                    )
            return claimed

        return await self._call(op)

    # --- messages ------------------------------------------------------------------------------

    def submit_message(
        self,
        *,
        sender: str,
        sender_device: str,
        client_msg_id: bytes,
        recipient: str,
        server_ts: int,
        copies: Sequence[Copy],
        queue_max: int | None = None,
        contacts_only: bool = False,
    ) -> asyncio.Future[StoredMessage]:
        """Queue the copies durably, once per (sender device, client message id).

        Every check runs in the group commit that stores the message (see the
        Store protocol). A refusal undoes its own ``sent`` row and is returned
        from the operation rather than raised, so it never costs its batch a
        rollback; the future raises it.
        """

        def op(conn: sqlite3.Connection) -> StoredMessage | StorageError:
            inserted = conn.execute(
                "INSERT OR IGNORE INTO sent (sender_device, client_msg_id, server_ts)"
                " VALUES (?, ?, ?)",
                (sender_device, client_msg_id, server_ts),
            ).rowcount
            if inserted == 0:
                row = conn.execute(
                    "SELECT server_ts FROM sent WHERE sender_device = ? AND client_msg_id = ?",
                    (sender_device, client_msg_id),
                ).fetchone()
                return StoredMessage(row[0], [])
            refusal = check_copies(
                copies,
                sender=sender,
                sender_device=sender_device,
                sender_devices=self._device_ids_of(conn, sender),
                recipient=recipient,
                recipient_devices=self._device_ids_of(conn, recipient),
                contacts_only=contacts_only,
                are_contacts=lambda: self._are_contacts(conn, sender, recipient),
                queue_max=queue_max,
                queued=lambda: self._queued_at_most(conn, recipient, queue_max or 0),
            )
            if refusal is not None:
                conn.execute(
                    "DELETE FROM sent WHERE sender_device = ? AND client_msg_id = ?",
                    (sender_device, client_msg_id),
                )
                return refusal
            envelopes = []
            for c in copies:
                cursor = conn.execute(
                    "INSERT INTO queue (username, device_id, sender, sender_device, server_ts,"
                    " kind, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (c.user, c.device_id, sender, sender_device, server_ts, c.kind, c.body),
                )
                seq = cursor.lastrowid
                if seq is None:
                    raise StorageError("queue insert returned no sequence number")
                envelopes.append(
                    QueuedEnvelope(
                        seq, c.user, c.device_id, sender, sender_device, server_ts, c.kind, c.body
                    )
                )
                if c.user in self._queued:
                    self._queued[c.user] += 1
            if server_ts - self._last_prune_ms >= self._prune_every_ms:
                # At most once a minute, not once per message. If this batch is rolled
                # back, the prune simply waits for the next interval.
                self._last_prune_ms = server_ts
                conn.execute(
                    "DELETE FROM sent WHERE server_ts < ?", (server_ts - self._sent_retention_ms,)
                )
            return StoredMessage(server_ts, envelopes)

        future: asyncio.Future[StoredMessage] = self._submit(op, refusals=True)
        return future

    async def fetch_queue(
        self, username: str, device_id: str, after_seq: int, limit: int
    ) -> list[QueuedEnvelope]:
        """Queued envelopes after ``after_seq``, oldest first."""

        def op(conn: sqlite3.Connection) -> list[QueuedEnvelope]:
            rows = conn.execute(
                "SELECT seq, username, device_id, sender, sender_device, server_ts, kind, body"
                " FROM queue WHERE username = ? AND device_id = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (username, device_id, after_seq, limit),
            ).fetchall()
            return [QueuedEnvelope(*row) for row in rows]

        return await self._call(op)

    async def ack(self, username: str, device_id: str, seqs: Sequence[int]) -> int:
        """Delete acknowledged envelopes of that device.

        The deletion commits with the next other work, or alone after at most
        ``_LAZY_WAIT_S``: until then a reconnecting device may be sent an envelope
        it already acknowledged, which it drops by message id.
        """

        def op(conn: sqlite3.Connection) -> int:
            cursor = conn.executemany(
                "DELETE FROM queue WHERE seq = ? AND username = ? AND device_id = ?",
                [(seq, username, device_id) for seq in seqs],
            )
            return cursor.rowcount

        deleted: int = await self._submit(op, lazy=True)
        return deleted

    async def count_queued(self, username: str) -> int:
        """How many envelopes wait for any device of ``username``."""

        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT count(*) FROM queue WHERE username = ?", (username,))
            return int(row.fetchone()[0])

        return await self._call(op)


_DEVICE_COLUMNS = "username, device_id, ed25519, curve25519, created_at, certificate"


def _devices(conn: sqlite3.Connection, username: str) -> list[DeviceRecord]:
    rows = conn.execute(
        f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE username = ? ORDER BY device_id",  # noqa: S608
        (username,),
    ).fetchall()
    return [DeviceRecord(*row) for row in rows]


def _insert_device(conn: sqlite3.Connection, device: DeviceRecord, fallback: KeyRecord) -> None:
    conn.execute(
        f"INSERT INTO devices ({_DEVICE_COLUMNS}, fallback_key, fallback_signature)"  # noqa: S608
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            device.username,
            device.device_id,
            device.ed25519,
            device.curve25519,
            device.created_at,
            device.certificate,
            fallback.key,
            fallback.signature,
        ),
    )


def _insert_keys(
    conn: sqlite3.Connection, username: str, device_id: str, keys: Sequence[KeyRecord]
) -> None:
    conn.executemany(
        "INSERT OR IGNORE INTO one_time_keys (username, device_id, key, signature)"
        " VALUES (?, ?, ?, ?)",
        [(username, device_id, k.key, k.signature) for k in keys],
    )


def _count_keys(conn: sqlite3.Connection, username: str, device_id: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM one_time_keys WHERE username = ? AND device_id = ?",
        (username, device_id),
    ).fetchone()
    return int(row[0])
