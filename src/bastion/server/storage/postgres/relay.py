"""The clustered store: PostgreSQL through an asyncpg connection pool.

Several server nodes share one database. Two orderings matter and both are
kept here rather than left to chance:

* **Per sender device, call order.** Messages of every connection of a node
  wait in one list; one task stores whatever is waiting in one transaction of a
  few statements, whatever the batch's size (group commit per node: each
  statement takes arrays, ``unnest`` turns them into rows), and takes the next
  batch only after that commit. A message whose id is already in the batch
  waits for the next one, and so does every later message of its sender
  device, so a later call never commits before an earlier one.
* **Per recipient device, sequence order equals commit order.** A message
  first locks the device rows of everyone it writes to (in one sorted
  statement, so two messages never deadlock) and takes its sequence numbers
  only then. Another message to the same device waits for that commit, so a
  reader that sees ``seq`` N has already been able to see every smaller
  sequence number of that device: cursor-based delivery never skips one.

Every result is released only after the commit that made it durable.
Acknowledgements are gathered the same way: one ``DELETE`` for every ack of
the node that waits (gathered for a few milliseconds: nobody waits on them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import asyncpg
from asyncpg.pool import PoolConnectionProxy

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
from bastion.server.storage.postgres.migrations import migrate, quote_schema

log = logging.getLogger("bastion.server.storage.postgres.relay")

# A pooled connection; asyncpg hands out proxies that behave as connections.
Connection = asyncpg.Connection | PoolConnectionProxy

DEFAULT_SCHEMA = "bastion"
_DEVICE_COLUMNS = "username, device_id, ed25519, curve25519, created_at, certificate"
_ENVELOPE_COLUMNS = "seq, username, device_id, sender, sender_device, server_ts, kind, body"
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


def split_dsn(url: str) -> tuple[str, str]:
    """Split ``postgresql://...?schema=NAME`` into the asyncpg DSN and the schema name.

    Raises :class:`StorageError` for another scheme or an invalid schema name.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise StorageError("the database URL must start with postgresql://")
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schema = DEFAULT_SCHEMA
    kept = []
    for key, value in query:
        if key == "schema":
            schema = value
        else:
            kept.append((key, value))
    quote_schema(schema)
    dsn = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(kept)))
    return dsn, schema


class _StatelessConnection(asyncpg.Connection):
    """A pooled connection released without a reset query.

    The store keeps no session state (no LISTEN, advisory lock, cursor or
    setting), so the default reset (four statements in one round trip on every
    release) would only undo nothing. An open transaction is still rolled back.
    """

    def get_reset_query(self) -> str:
        """Nothing to reset."""
        return ""


@dataclass(slots=True)
class _PendingAck:
    username: str
    device_id: str
    seqs: list[int]
    future: asyncio.Future[int]


@dataclass(slots=True)
class _PendingMessage:
    sender: str
    sender_device: str
    client_msg_id: bytes
    recipient: str
    server_ts: int
    copies: Sequence[Copy]
    queue_max: int | None
    contacts_only: bool
    future: asyncio.Future[StoredMessage]
    outcome: StoredMessage | StorageError | None = field(default=None)


class PgStore:
    """:class:`~bastion.server.storage.interfaces.Store` on PostgreSQL, shared by every node."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        *,
        max_batch: int = 256,
        ack_delay_s: float = 0.005,
        sent_retention_ms: int = 7 * 86_400_000,
        prune_every_ms: int = 60_000,
    ) -> None:
        self._pool = pool
        self._ack_delay_s = ack_delay_s
        self.schema = schema
        self._max_batch = max_batch
        self._sent_retention_ms = sent_retention_ms
        self._prune_every_ms = prune_every_ms
        self._last_prune_ms = 0
        self._waiting: list[_PendingMessage] = []
        self._writer: asyncio.Task[None] | None = None
        self._acks: list[_PendingAck] = []
        self._ack_writer: asyncio.Task[None] | None = None
        self._running_loop = RunningLoop()
        self._closed = False

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        min_connections: int = 2,
        max_connections: int = 16,
        max_batch: int = 256,
    ) -> PgStore:
        """Connect to ``postgresql://...[?schema=NAME]`` and bring the schema up to date.

        Raises :class:`StorageError` if the database is unreachable or the schema
        cannot be migrated.
        """
        dsn, schema = split_dsn(url)
        try:
            conn = await asyncpg.connect(dsn)
            try:
                applied = await migrate(conn, schema)
            finally:
                await conn.close()
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_connections,
                max_size=max_connections,
                server_settings={"search_path": schema},
                connection_class=_StatelessConnection,
            )
        except _DB_ERRORS as exc:
            raise StorageError(f"cannot open the database: {type(exc).__name__}") from None
        if applied:
            log.info("store.migrated", extra={"versions": applied})
        return cls(pool, schema, max_batch=max_batch)

    async def close(self) -> None:
        """Let queued messages commit, then close the pool."""
        self._closed = True
        while self._writer is not None or self._ack_writer is not None:
            await asyncio.gather(
                *[t for t in (self._writer, self._ack_writer) if t is not None],
                return_exceptions=True,
            )
        await self._pool.close()

    def connection(self) -> contextlib.AbstractAsyncContextManager[Connection]:
        """A pooled connection, for features that keep their own tables (migrations add them)."""
        return self._connection()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        if self._closed:
            raise StorageError("the store is closed")
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except _DB_ERRORS as exc:
            raise StorageError(f"database operation failed: {type(exc).__name__}") from None

    # --- accounts and devices ----------------------------------------------------------------

    async def create_account(
        self,
        account: AccountRecord,
        device: DeviceRecord,
        one_time_keys: Sequence[KeyRecord],
        fallback_key: KeyRecord,
    ) -> None:
        """Create an account with its first device; raises UsernameTakenError."""
        async with self._connection() as conn, conn.transaction():
            try:
                await conn.execute(
                    "INSERT INTO accounts (username, identity_key, created_at, disabled)"
                    " VALUES ($1, $2, $3, $4)",
                    account.username,
                    account.identity_key,
                    account.created_at,
                    account.disabled,
                )
            except asyncpg.UniqueViolationError:
                raise UsernameTakenError("that username is taken") from None
            await _insert_device(conn, device, fallback_key)
            await _insert_keys(conn, device.username, device.device_id, one_time_keys)

    async def get_account(self, username: str) -> AccountRecord | None:
        """The account, or None."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT username, identity_key, created_at, disabled FROM accounts"
                " WHERE username = $1",
                username,
            )
        return None if row is None else AccountRecord(*row)

    async def get_device(self, username: str, device_id: str) -> DeviceRecord | None:
        """One device, or None."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE username = $1 AND device_id = $2",  # noqa: S608
                username,
                device_id,
            )
        return None if row is None else DeviceRecord(*row)

    async def list_devices(self, username: str) -> list[DeviceRecord]:
        """All devices of an account."""
        async with self._connection() as conn:
            return await _devices(conn, username)

    async def add_device(
        self,
        device: DeviceRecord,
        one_time_keys: Sequence[KeyRecord],
        fallback_key: KeyRecord,
        *,
        max_devices: int,
    ) -> None:
        """Add a certified device to an existing account; raises DeviceRefusedError."""
        async with self._connection() as conn, conn.transaction():
            revoked = await conn.fetchval(
                "SELECT 1 FROM revoked_devices WHERE device_id = $1", device.device_id
            )
            if revoked is not None:
                raise DeviceRefusedError("that device was revoked")
            # The account row lock makes the device count exact under concurrent adds.
            exists = await conn.fetchval(
                "SELECT 1 FROM accounts WHERE username = $1 FOR UPDATE", device.username
            )
            if exists is None:
                raise DeviceRefusedError("there is no such account")
            count = await conn.fetchval(
                "SELECT count(*) FROM devices WHERE username = $1", device.username
            )
            if count >= max_devices:
                raise DeviceRefusedError(f"an account can have at most {max_devices} devices")
            try:
                async with conn.transaction():
                    await _insert_device(conn, device, fallback_key)
            except asyncpg.UniqueViolationError:
                raise DeviceRefusedError("that device is already part of the account") from None
            await _insert_keys(conn, device.username, device.device_id, one_time_keys)

    async def revoke_device(self, username: str, device_id: str) -> bool:
        """Remove a device, its keys and its queue; remember the id as revoked."""
        async with self._connection() as conn, conn.transaction():
            removed = await conn.execute(
                "DELETE FROM devices WHERE username = $1 AND device_id = $2", username, device_id
            )
            await conn.execute(
                "DELETE FROM one_time_keys WHERE username = $1 AND device_id = $2",
                username,
                device_id,
            )
            await conn.execute(
                "DELETE FROM queue WHERE username = $1 AND device_id = $2", username, device_id
            )
            await conn.execute(
                "INSERT INTO revoked_devices (device_id, username) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING",
                device_id,
                username,
            )
        return _row_count(removed) > 0

    # --- key stock -----------------------------------------------------------------------------

    async def add_one_time_keys(
        self, username: str, device_id: str, keys: Sequence[KeyRecord], fallback: KeyRecord | None
    ) -> int:
        """Add keys (and replace the fallback key); returns the new stock size."""
        async with self._connection() as conn, conn.transaction():
            await _insert_keys(conn, username, device_id, keys)
            if fallback is not None:
                await conn.execute(
                    "UPDATE devices SET fallback_key = $1, fallback_signature = $2"
                    " WHERE username = $3 AND device_id = $4",
                    fallback.key,
                    fallback.signature,
                    username,
                    device_id,
                )
            return await _count_keys(conn, username, device_id)

    async def count_one_time_keys(self, username: str, device_id: str) -> int:
        """The device's stock size."""
        async with self._connection() as conn:
            return await _count_keys(conn, username, device_id)

    async def claim_keys(self, username: str) -> list[ClaimedKeyRecord]:
        """Take one key per device, atomically; the fallback key when the stock is empty.

        ``SKIP LOCKED`` lets concurrent claims (from any node) take different keys
        without waiting on each other; no key is ever handed out twice.
        """
        claimed: list[ClaimedKeyRecord] = []
        async with self._connection() as conn, conn.transaction():
            devices = await conn.fetch(
                "SELECT device_id, fallback_key, fallback_signature FROM devices"
                " WHERE username = $1 ORDER BY device_id",
                username,
            )
            for device_id, fallback_key, fallback_signature in devices:
                row = await conn.fetchrow(
                    "DELETE FROM one_time_keys WHERE (username, device_id, key) IN ("
                    " SELECT username, device_id, key FROM one_time_keys"
                    " WHERE username = $1 AND device_id = $2 LIMIT 1 FOR UPDATE SKIP LOCKED)"
                    " RETURNING key, signature",
                    username,
                    device_id,
                )
                if row is not None:
                    claimed.append(ClaimedKeyRecord(device_id, row[0], row[1], False))
                elif fallback_key is not None:
                    claimed.append(
                        ClaimedKeyRecord(device_id, fallback_key, fallback_signature, True)
                    )
        return claimed

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

        The message waits for the node's next batch. The future raises what the
        Store protocol lists, or StorageError if the database fails (then nothing
        of the message was stored).
        """
        loop = self._running_loop.get()
        future: asyncio.Future[StoredMessage] = loop.create_future()
        if self._closed:
            future.set_exception(StorageError("the store is closed"))
            return future
        self._waiting.append(
            _PendingMessage(
                sender,
                sender_device,
                client_msg_id,
                recipient,
                server_ts,
                copies,
                queue_max,
                contacts_only,
                future,
            )
        )
        if self._writer is None:
            self._writer = loop.create_task(self._write_batches())
        return future

    async def _write_batches(self) -> None:
        """Store what waits, one transaction per batch, until nothing waits."""
        try:
            while self._waiting:
                batch = self._next_batch()
                try:
                    await self._store_batch(batch)
                except StorageError as exc:
                    for pending in batch:
                        pending.outcome = exc
                except _DB_ERRORS as exc:
                    failure = StorageError(f"database commit failed: {type(exc).__name__}")
                    for pending in batch:
                        pending.outcome = failure
                for pending in batch:
                    if pending.future.done():
                        continue
                    if isinstance(pending.outcome, StoredMessage):
                        pending.future.set_result(pending.outcome)
                    else:
                        pending.future.set_exception(
                            pending.outcome or StorageError("the message was not stored")
                        )
        finally:
            self._writer = None

    def _next_batch(self) -> list[_PendingMessage]:
        """Take the next batch from the waiting messages, in order.

        A message whose (sender device, client message id) is already in the
        batch waits for the next one (its duplicate check must see the first
        committed or refused), and so does every later message of that sender
        device, which keeps each sender's call order.
        """
        batch: list[_PendingMessage] = []
        later: list[_PendingMessage] = []
        keys: set[tuple[str, bytes]] = set()
        held: set[str] = set()
        for pending in self._waiting:
            key = (pending.sender_device, pending.client_msg_id)
            if len(batch) >= self._max_batch or key in keys or pending.sender_device in held:
                held.add(pending.sender_device)
                later.append(pending)
                continue
            keys.add(key)
            batch.append(pending)
        self._waiting = later
        return batch

    async def _store_batch(self, batch: list[_PendingMessage]) -> None:
        users = sorted({p.sender for p in batch} | {p.recipient for p in batch})
        async with self._connection() as conn, conn.transaction():
            # Lock every device written to, in one sorted statement (no deadlocks); sequence
            # numbers taken below then commit in order for each device.
            rows = await conn.fetch(
                "SELECT username, device_id FROM devices WHERE username = ANY($1::text[])"
                " ORDER BY username, device_id FOR NO KEY UPDATE",
                users,
            )
            devices: dict[str, list[str]] = {}
            for username, device_id in rows:
                devices.setdefault(username, []).append(device_id)
            need = [p for p in batch if _needs_facts(p, devices)]
            fresh, facts = await _claim_ids(conn, batch, need)
            refused: list[_PendingMessage] = []
            stored: list[_PendingMessage] = []
            added: dict[str, int] = {}
            for p in fresh:
                accepted, queued = facts.get((p.sender, p.recipient), (0, 0))
                problem = check_copies(
                    p.copies,
                    sender=p.sender,
                    sender_device=p.sender_device,
                    sender_devices=devices.get(p.sender, []),
                    recipient=p.recipient,
                    recipient_devices=devices.get(p.recipient, []),
                    contacts_only=p.contacts_only,
                    are_contacts=functools.partial(bool, accepted == 2),  # both rows of the pair
                    queue_max=p.queue_max,
                    queued=functools.partial(int, queued + added.get(p.recipient, 0)),
                )
                if problem is not None:
                    p.outcome = problem
                    refused.append(p)
                    continue
                stored.append(p)
                for c in p.copies:
                    added[c.user] = added.get(c.user, 0) + 1
            if refused:
                await conn.execute(
                    "DELETE FROM sent WHERE (sender_device, client_msg_id) IN"
                    " (SELECT * FROM unnest($1::text[], $2::bytea[]))",
                    [p.sender_device for p in refused],
                    [p.client_msg_id for p in refused],
                )
            await _enqueue(conn, stored)
            now = max(p.server_ts for p in batch)
            if now - self._last_prune_ms >= self._prune_every_ms:
                self._last_prune_ms = now
                await conn.execute(
                    "DELETE FROM sent WHERE server_ts < $1", now - self._sent_retention_ms
                )

    async def fetch_queue(
        self, username: str, device_id: str, after_seq: int, limit: int
    ) -> list[QueuedEnvelope]:
        """Queued envelopes after ``after_seq``, oldest first."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_ENVELOPE_COLUMNS} FROM queue"  # noqa: S608
                " WHERE username = $1 AND device_id = $2 AND seq > $3 ORDER BY seq LIMIT $4",
                username,
                device_id,
                after_seq,
                limit,
            )
        return [QueuedEnvelope(*row) for row in rows]

    async def ack(self, username: str, device_id: str, seqs: Sequence[int]) -> int:
        """Delete acknowledged envelopes of that device (with the node's other acks, at once)."""
        future: asyncio.Future[int] = self._running_loop.get().create_future()
        if self._closed:
            raise StorageError("the store is closed")
        self._acks.append(_PendingAck(username, device_id, list(seqs), future))
        if self._ack_writer is None:
            self._ack_writer = self._running_loop.get().create_task(self._write_acks())
        return await future

    async def _write_acks(self) -> None:
        """Delete what was acknowledged, one statement per batch, until nothing waits.

        A batch that is not full waits ``ack_delay_s`` for more: nobody waits on a
        deletion (the envelope was delivered; one deleted late may only be sent
        again after a reconnect, and the client drops it by message id), and at a
        low rate the wait turns one ``DELETE`` and commit per ack into one per
        several.
        """
        try:
            while self._acks:
                if len(self._acks) < self._max_batch and not self._closed:
                    await asyncio.sleep(self._ack_delay_s)
                batch = self._acks[: self._max_batch]
                del self._acks[: self._max_batch]
                try:
                    deleted = await self._delete_acked(batch)
                except StorageError as exc:
                    for pending in batch:
                        if not pending.future.done():
                            pending.future.set_exception(exc)
                    continue
                for pending in batch:
                    # Each deleted envelope counts once, for the first ack that named it.
                    count = 0
                    for seq in pending.seqs:
                        if (pending.username, pending.device_id, seq) in deleted:
                            deleted.discard((pending.username, pending.device_id, seq))
                            count += 1
                    if not pending.future.done():
                        pending.future.set_result(count)
        finally:
            self._ack_writer = None

    async def _delete_acked(self, batch: list[_PendingAck]) -> set[tuple[str, str, int]]:
        users: list[str] = []
        device_ids: list[str] = []
        seqs: list[int] = []
        for pending in batch:
            users.extend(pending.username for _ in pending.seqs)
            device_ids.extend(pending.device_id for _ in pending.seqs)
            seqs.extend(pending.seqs)
        async with self._connection() as conn:
            rows = await conn.fetch(
                "DELETE FROM queue AS q USING unnest($1::text[], $2::text[], $3::bigint[])"
                " AS t(u, d, s) WHERE q.seq = t.s AND q.username = t.u AND q.device_id = t.d"
                " RETURNING q.username, q.device_id, q.seq",
                users,
                device_ids,
                seqs,
            )
        return {(r[0], r[1], int(r[2])) for r in rows}

    async def count_queued(self, username: str) -> int:
        """How many envelopes wait for any device of ``username``."""
        async with self._connection() as conn:
            count = await conn.fetchval("SELECT count(*) FROM queue WHERE username = $1", username)
        return int(count)


def _needs_facts(p: _PendingMessage, devices: dict[str, list[str]]) -> bool:
    """Whether the rule may ask for the contact pair or the recipient's queue count."""
    return bool(devices.get(p.recipient)) and (p.contacts_only or p.queue_max is not None)


_Facts = dict[tuple[str, str], tuple[int, int]]


async def _claim_ids(
    conn: Connection, batch: list[_PendingMessage], need: list[_PendingMessage]
) -> tuple[list[_PendingMessage], _Facts]:
    """Record each message's id as sent, and read the facts the rule needs, in one statement.

    Returns the messages seen for the first time (in order), and for each
    (sender, recipient) of ``need``: the accepted contact rows of the pair and
    the recipient's queue size, counted up to the largest ``queue_max`` only
    (the rule needs it exact below that bound; counting further costs a scan of
    a full queue). The statement runs after the device rows were locked, so its
    snapshot holds every commit that wrote to those devices before. A message
    sent before gets the original's server time and no envelopes.
    """
    pairs = sorted({(p.sender, p.recipient) for p in need})
    bound = max((p.queue_max for p in need if p.queue_max is not None), default=0)
    rows = await conn.fetch(
        "WITH claimed AS (INSERT INTO sent (sender_device, client_msg_id, server_ts)"
        " SELECT * FROM unnest($1::text[], $2::bytea[], $3::bigint[])"
        " ON CONFLICT DO NOTHING RETURNING sender_device, client_msg_id)"
        " SELECT sender_device, client_msg_id, NULL::text, 0::bigint, 0::bigint FROM claimed"
        " UNION ALL SELECT s, NULL::bytea, r,"
        " (SELECT count(*) FROM contacts WHERE state = $6 AND"
        " ((owner = s AND peer = r) OR (owner = r AND peer = s))),"
        " (SELECT count(*) FROM (SELECT 1 FROM queue WHERE username = r LIMIT $7) AS q)"
        " FROM unnest($4::text[], $5::text[]) AS t(s, r)",
        [p.sender_device for p in batch],
        [p.client_msg_id for p in batch],
        [p.server_ts for p in batch],
        [s for s, _ in pairs],
        [r for _, r in pairs],
        ACCEPTED,
        bound,
    )
    new: set[tuple[str, bytes]] = set()
    facts: _Facts = {}
    for first, msg_id, recipient, accepted, queued in rows:
        if msg_id is not None:
            new.add((first, bytes(msg_id)))
        else:
            facts[first, recipient] = (int(accepted), int(queued))
    fresh = [p for p in batch if (p.sender_device, p.client_msg_id) in new]
    if len(fresh) == len(batch):
        return fresh, facts
    again = [p for p in batch if (p.sender_device, p.client_msg_id) not in new]
    rows = await conn.fetch(
        "SELECT sender_device, client_msg_id, server_ts FROM sent"
        " WHERE (sender_device, client_msg_id) IN"
        " (SELECT * FROM unnest($1::text[], $2::bytea[]))",
        [p.sender_device for p in again],
        [p.client_msg_id for p in again],
    )
    original = {(r[0], bytes(r[1])): int(r[2]) for r in rows}
    for p in again:
        server_ts = original.get((p.sender_device, p.client_msg_id))
        if server_ts is not None:
            p.outcome = StoredMessage(server_ts, [])
    return fresh, facts


async def _enqueue(conn: Connection, stored: list[_PendingMessage]) -> None:
    """Insert every copy of the stored messages in one statement; set their outcomes.

    The rows are inserted in batch order, so the identity column hands out
    sequence numbers in that order: sorted, the returned numbers match the copies.
    """
    copies = [(p, c) for p in stored for c in p.copies]
    if not copies:
        for p in stored:
            p.outcome = StoredMessage(p.server_ts, [])
        return
    rows = await conn.fetch(
        "INSERT INTO queue (username, device_id, sender, sender_device, server_ts, kind, body)"
        " SELECT u, d, s, sd, ts, k, b FROM unnest($1::text[], $2::text[], $3::text[],"
        " $4::text[], $5::bigint[], $6::int[], $7::bytea[]) WITH ORDINALITY"
        " AS t(u, d, s, sd, ts, k, b, n) ORDER BY n RETURNING seq",
        [c.user for _, c in copies],
        [c.device_id for _, c in copies],
        [p.sender for p, _ in copies],
        [p.sender_device for p, _ in copies],
        [p.server_ts for p, _ in copies],
        [c.kind for _, c in copies],
        [c.body for _, c in copies],
    )
    if len(rows) != len(copies):
        raise StorageError("the database stored a different number of envelopes")
    seqs = iter(sorted(int(r[0]) for r in rows))
    for p in stored:
        p.outcome = StoredMessage(
            p.server_ts,
            [
                QueuedEnvelope(
                    next(seqs),
                    c.user,
                    c.device_id,
                    p.sender,
                    p.sender_device,
                    p.server_ts,
                    c.kind,
                    c.body,
                )
                for c in p.copies
            ],
        )


def _row_count(status: str) -> int:
    """The row count at the end of a command tag such as ``DELETE 3``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


async def _devices(conn: Connection, username: str) -> list[DeviceRecord]:
    rows = await conn.fetch(
        f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE username = $1 ORDER BY device_id",  # noqa: S608
        username,
    )
    return [DeviceRecord(*row) for row in rows]


async def _insert_device(conn: Connection, device: DeviceRecord, fallback: KeyRecord) -> None:
    await conn.execute(
        f"INSERT INTO devices ({_DEVICE_COLUMNS}, fallback_key, fallback_signature)"  # noqa: S608
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        device.username,
        device.device_id,
        device.ed25519,
        device.curve25519,
        device.created_at,
        device.certificate,
        fallback.key,
        fallback.signature,
    )


async def _insert_keys(
    conn: Connection, username: str, device_id: str, keys: Sequence[KeyRecord]
) -> None:
    if not keys:
        return
    await conn.execute(
        "INSERT INTO one_time_keys (username, device_id, key, signature)"
        " SELECT $1, $2, k, s FROM unnest($3::bytea[], $4::bytea[]) AS t(k, s)"
        " ON CONFLICT DO NOTHING",
        username,
        device_id,
        [k.key for k in keys],
        [k.signature for k in keys],
    )


async def _count_keys(conn: Connection, username: str, device_id: str) -> int:
    count = await conn.fetchval(
        "SELECT count(*) FROM one_time_keys WHERE username = $1 AND device_id = $2",
        username,
        device_id,
    )
    return int(count)
