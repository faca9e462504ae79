"""Where the relay keeps groups: each group's signed chain, its member list, and fan-out.

The server's member list is derived from the chain it stores (the relay applies
each change before appending it); clients never take it from the server, they
replay the chain themselves. A group message is stored as one queue row per
member device in the ordinary device queues (kind ``GROUP_KIND``), so delivery,
acknowledgement, catch-up and revocation work exactly as for direct messages.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Protocol

from bastion.errors import StorageError
from bastion.protocol.frames import GROUP_KIND
from bastion.server.pg_store import Connection, PgStore
from bastion.server.sqlite_store import SQLiteStore
from bastion.server.store import QueuedEnvelope

SENT_RETENTION_MS = 7 * 86_400_000

SQLITE_TABLES = (
    "CREATE TABLE IF NOT EXISTS group_changes (group_id BLOB NOT NULL, seq INTEGER NOT NULL,"
    " change BLOB NOT NULL, PRIMARY KEY (group_id, seq))",
    "CREATE TABLE IF NOT EXISTS group_members (group_id BLOB NOT NULL, username TEXT NOT NULL,"
    " active INTEGER NOT NULL, PRIMARY KEY (group_id, username))",
    "CREATE INDEX IF NOT EXISTS group_members_by_user ON group_members (username, group_id)",
    "CREATE TABLE IF NOT EXISTS group_sent (sender_device TEXT NOT NULL,"
    " client_msg_id BLOB NOT NULL, server_ts INTEGER NOT NULL,"
    " PRIMARY KEY (sender_device, client_msg_id))",
)


class GroupConflictError(StorageError):
    """Another change took that place in the chain first (or the group already exists)."""


class GroupStore(Protocol):
    """What the relay keeps per group."""

    async def changes(self, group_id: bytes, after_seq: int, limit: int) -> list[bytes]:
        """Encoded changes with ``seq > after_seq``, oldest first."""
        ...

    async def membership(self, group_id: bytes, user: str) -> bool | None:
        """True for a current member, False for a former one, None for neither."""
        ...

    async def active_members(self, group_id: bytes) -> list[str]:
        """The current members (sorted), as the stored chain says."""
        ...

    async def share_a_group(self, first: str, second: str) -> bool:
        """Whether two users are both current members of some group."""
        ...

    async def append_change(
        self,
        *,
        group_id: bytes,
        seq: int,
        change: bytes,
        members: Sequence[str],
        notify: Sequence[str],
        sender: str,
        sender_device: str,
        server_ts: int,
        item: bytes,
    ) -> list[QueuedEnvelope]:
        """Append a change, set the member list, and queue ``item`` for ``notify``'s devices.

        The sender's own device gets no copy. Raises :class:`GroupConflictError`
        if the chain already has a change at ``seq``.
        """
        ...

    async def fan_out(
        self,
        *,
        members: Sequence[str],
        sender: str,
        sender_device: str,
        client_msg_id: bytes,
        server_ts: int,
        item: bytes,
    ) -> tuple[int, list[QueuedEnvelope]]:
        """Queue ``item`` once per device of ``members`` (not the sender's device), durably.

        Once per (sender device, client id): a retry returns the original time
        and queues nothing.
        """
        ...


def _envelopes(
    rows: Sequence[Sequence[object]], sender: str, sender_device: str, ts: int, item: bytes
) -> list[QueuedEnvelope]:
    return [
        QueuedEnvelope(
            int(str(r[0])), str(r[1]), str(r[2]), sender, sender_device, ts, GROUP_KIND, item
        )
        for r in rows
    ]


class SQLiteGroupStore:
    """:class:`GroupStore` in the relay's SQLite file."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    async def open(self) -> None:
        """Create the tables if needed."""
        await self._store.ensure_tables(SQLITE_TABLES)

    async def changes(self, group_id: bytes, after_seq: int, limit: int) -> list[bytes]:
        """Encoded changes after ``after_seq``."""

        def op(conn: sqlite3.Connection) -> list[bytes]:
            rows = conn.execute(
                "SELECT change FROM group_changes WHERE group_id = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (group_id, after_seq, limit),
            )
            return [bytes(r[0]) for r in rows]

        return await self._store.run(op)

    async def membership(self, group_id: bytes, user: str) -> bool | None:
        """Current, former or never a member."""

        def op(conn: sqlite3.Connection) -> bool | None:
            row = conn.execute(
                "SELECT active FROM group_members WHERE group_id = ? AND username = ?",
                (group_id, user),
            ).fetchone()
            return None if row is None else bool(row[0])

        return await self._store.run(op)

    async def active_members(self, group_id: bytes) -> list[str]:
        """Current members, sorted."""

        def op(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT username FROM group_members WHERE group_id = ? AND active = 1"
                " ORDER BY username",
                (group_id,),
            )
            return [str(r[0]) for r in rows]

        return await self._store.run(op)

    async def share_a_group(self, first: str, second: str) -> bool:
        """Whether both are current members of one group."""

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM group_members a JOIN group_members b ON a.group_id = b.group_id"
                " WHERE a.username = ? AND b.username = ? AND a.active = 1 AND b.active = 1"
                " LIMIT 1",
                (first, second),
            ).fetchone()
            return row is not None

        return await self._store.run(op)

    async def append_change(
        self,
        *,
        group_id: bytes,
        seq: int,
        change: bytes,
        members: Sequence[str],
        notify: Sequence[str],
        sender: str,
        sender_device: str,
        server_ts: int,
        item: bytes,
    ) -> list[QueuedEnvelope]:
        """Append, update members, queue notices (one transaction)."""

        def op(conn: sqlite3.Connection) -> list[QueuedEnvelope]:
            try:
                conn.execute(
                    "INSERT INTO group_changes (group_id, seq, change) VALUES (?, ?, ?)",
                    (group_id, seq, change),
                )
            except sqlite3.IntegrityError:
                raise GroupConflictError("the group changed meanwhile; try again") from None
            conn.execute("UPDATE group_members SET active = 0 WHERE group_id = ?", (group_id,))
            conn.executemany(
                "INSERT INTO group_members (group_id, username, active) VALUES (?, ?, 1)"
                " ON CONFLICT (group_id, username) DO UPDATE SET active = 1",
                [(group_id, user) for user in members],
            )
            return _sqlite_queue(
                conn,
                notify,
                sender=sender,
                sender_device=sender_device,
                server_ts=server_ts,
                item=item,
            )

        return await self._store.run(op)

    async def fan_out(
        self,
        *,
        members: Sequence[str],
        sender: str,
        sender_device: str,
        client_msg_id: bytes,
        server_ts: int,
        item: bytes,
    ) -> tuple[int, list[QueuedEnvelope]]:
        """Queue one row per member device, once per client message id."""

        def op(conn: sqlite3.Connection) -> tuple[int, list[QueuedEnvelope]]:
            row = conn.execute(
                "SELECT server_ts FROM group_sent WHERE sender_device = ? AND client_msg_id = ?",
                (sender_device, client_msg_id),
            ).fetchone()
            if row is not None:
                return int(row[0]), []
            conn.execute(
                "INSERT INTO group_sent (sender_device, client_msg_id, server_ts) VALUES (?, ?, ?)",
                (sender_device, client_msg_id, server_ts),
            )
            conn.execute(
                "DELETE FROM group_sent WHERE server_ts < ?", (server_ts - SENT_RETENTION_MS,)
            )
            return server_ts, _sqlite_queue(
                conn,
                members,
                sender=sender,
                sender_device=sender_device,
                server_ts=server_ts,
                item=item,
            )

        return await self._store.run(op)


def _sqlite_queue(
    conn: sqlite3.Connection,
    users: Sequence[str],
    *,
    sender: str,
    sender_device: str,
    server_ts: int,
    item: bytes,
) -> list[QueuedEnvelope]:
    rows: list[Sequence[object]] = []
    for user in users:
        rows += conn.execute(
            "INSERT INTO queue (username, device_id, sender, sender_device, server_ts, kind, body)"
            " SELECT username, device_id, ?, ?, ?, ?, ? FROM devices"
            " WHERE username = ? AND NOT (username = ? AND device_id = ?)"
            " RETURNING seq, username, device_id",
            (sender, sender_device, server_ts, GROUP_KIND, item, user, sender, sender_device),
        ).fetchall()
    return _envelopes(rows, sender, sender_device, server_ts, item)


class PgGroupStore:
    """:class:`GroupStore` in the shared PostgreSQL database (tables from migration 0003)."""

    def __init__(self, store: PgStore) -> None:
        self._store = store

    async def open(self) -> None:
        """Nothing to do: the migration made the tables."""

    async def changes(self, group_id: bytes, after_seq: int, limit: int) -> list[bytes]:
        """Encoded changes after ``after_seq``."""
        async with self._store.connection() as conn:
            rows = await conn.fetch(
                "SELECT change FROM group_changes WHERE group_id = $1 AND seq > $2"
                " ORDER BY seq LIMIT $3",
                group_id,
                after_seq,
                limit,
            )
        return [bytes(r[0]) for r in rows]

    async def membership(self, group_id: bytes, user: str) -> bool | None:
        """Current, former or never a member."""
        async with self._store.connection() as conn:
            active = await conn.fetchval(
                "SELECT active FROM group_members WHERE group_id = $1 AND username = $2",
                group_id,
                user,
            )
        return None if active is None else bool(active)

    async def active_members(self, group_id: bytes) -> list[str]:
        """Current members, sorted."""
        async with self._store.connection() as conn:
            rows = await conn.fetch(
                "SELECT username FROM group_members WHERE group_id = $1 AND active"
                " ORDER BY username",
                group_id,
            )
        return [str(r[0]) for r in rows]

    async def share_a_group(self, first: str, second: str) -> bool:
        """Whether both are current members of one group."""
        async with self._store.connection() as conn:
            found = await conn.fetchval(
                "SELECT 1 FROM group_members a JOIN group_members b ON a.group_id = b.group_id"
                " WHERE a.username = $1 AND b.username = $2 AND a.active  AND b.active "
                " LIMIT 1",
                first,
                second,
            )
        return found is not None

    async def append_change(
        self,
        *,
        group_id: bytes,
        seq: int,
        change: bytes,
        members: Sequence[str],
        notify: Sequence[str],
        sender: str,
        sender_device: str,
        server_ts: int,
        item: bytes,
    ) -> list[QueuedEnvelope]:
        """Append, update members, queue notices (one transaction)."""
        async with self._store.connection() as conn, conn.transaction():
            inserted = await conn.fetchval(
                "INSERT INTO group_changes (group_id, seq, change) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING RETURNING seq",
                group_id,
                seq,
                change,
            )
            if inserted is None:
                raise GroupConflictError("the group changed meanwhile; try again")
            await conn.execute(
                "UPDATE group_members SET active = false WHERE group_id = $1", group_id
            )
            await conn.execute(
                "INSERT INTO group_members (group_id, username, active)"
                " SELECT $1, u, true FROM unnest($2::text[]) AS t(u)"
                " ON CONFLICT (group_id, username) DO UPDATE SET active = true",
                group_id,
                list(members),
            )
            rows = await _pg_queue(
                conn,
                notify,
                sender=sender,
                sender_device=sender_device,
                server_ts=server_ts,
                item=item,
            )
        return _envelopes(rows, sender, sender_device, server_ts, item)

    async def fan_out(
        self,
        *,
        members: Sequence[str],
        sender: str,
        sender_device: str,
        client_msg_id: bytes,
        server_ts: int,
        item: bytes,
    ) -> tuple[int, list[QueuedEnvelope]]:
        """Queue one row per member device, once per client message id."""
        async with self._store.connection() as conn, conn.transaction():
            inserted = await conn.fetchval(
                "INSERT INTO group_sent (sender_device, client_msg_id, server_ts)"
                " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING server_ts",
                sender_device,
                client_msg_id,
                server_ts,
            )
            if inserted is None:
                original = await conn.fetchval(
                    "SELECT server_ts FROM group_sent"
                    " WHERE sender_device = $1 AND client_msg_id = $2",
                    sender_device,
                    client_msg_id,
                )
                return int(original), []
            await conn.execute(
                "DELETE FROM group_sent WHERE server_ts < $1", server_ts - SENT_RETENTION_MS
            )
            rows = await _pg_queue(
                conn,
                members,
                sender=sender,
                sender_device=sender_device,
                server_ts=server_ts,
                item=item,
            )
        return server_ts, _envelopes(rows, sender, sender_device, server_ts, item)


async def _pg_queue(
    conn: Connection,
    users: Sequence[str],
    *,
    sender: str,
    sender_device: str,
    server_ts: int,
    item: bytes,
) -> list[Sequence[object]]:
    rows = await conn.fetch(
        "INSERT INTO queue (username, device_id, sender, sender_device, server_ts, kind, body)"
        " SELECT username, device_id, $2, $3, $4, $5, $6 FROM devices"
        " WHERE username = ANY($1::text[]) AND NOT (username = $2 AND device_id = $3)"
        " ORDER BY username, device_id"
        " RETURNING seq, username, device_id",
        list(users),
        sender,
        sender_device,
        server_ts,
        GROUP_KIND,
        item,
    )
    return [tuple(r) for r in rows]
