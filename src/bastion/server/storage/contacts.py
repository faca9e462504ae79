"""Where the relay keeps contacts: one row per direction of a pair, and visibility.

Each change reads both rows of a pair and writes the outcome of a pure rule
(:mod:`bastion.server.core.contact_rules`) in one transaction, so two nodes acting on
the same pair at once cannot leave it half changed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from bastion.server.core.contact_rules import ACCEPTED, PENDING_IN, ContactRow, Pair, Transition
from bastion.server.storage.sqlite.relay import SQLiteStore

if TYPE_CHECKING:
    from bastion.server.storage.postgres.relay import Connection, PgStore

Rule = Callable[[Pair], Transition]

# The ``contacts`` table itself is part of the core schema (SQLite and migration 0002):
# the store checks it in the transaction that stores each message.
SQLITE_TABLES = (
    "CREATE TABLE IF NOT EXISTS contact_settings (username TEXT PRIMARY KEY,"
    " invisible INTEGER NOT NULL)",
)


class ContactStore(Protocol):
    """What the relay keeps about contacts."""

    async def update(
        self, owner: str, peer: str, rule: Rule, *, counts: bool = False
    ) -> Transition:
        """Read the pair (with the counts the limits need), apply ``rule``, write its rows."""
        ...

    async def pair(self, owner: str, peer: str) -> Pair:
        """Both rows of a pair, without counts."""
        ...

    async def contacts(self, owner: str) -> list[tuple[str, ContactRow]]:
        """Every row ``owner`` has, sorted by peer."""
        ...

    async def accepted(self, owner: str) -> list[str]:
        """The peers ``owner`` has accepted (always mutual)."""
        ...

    async def invisible(self, user: str) -> bool:
        """Whether ``user`` chose to look offline."""
        ...

    async def set_invisible(self, user: str, invisible: bool) -> None:
        """Record ``user``'s visibility."""
        ...


def _row(state: str, updated_at: int, note_id: bytes | None) -> ContactRow:
    return ContactRow(
        state=state, updated_at=int(updated_at), note_id=None if note_id is None else bytes(note_id)
    )


class SQLiteContactStore:
    """:class:`ContactStore` in the relay's SQLite file."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    async def open(self) -> None:
        """Create the tables if needed."""
        await self._store.ensure_tables(SQLITE_TABLES)

    @staticmethod
    def _read(conn: sqlite3.Connection, owner: str, peer: str) -> ContactRow | None:
        row = conn.execute(
            "SELECT state, updated_at, note_id FROM contacts WHERE owner = ? AND peer = ?",
            (owner, peer),
        ).fetchone()
        return None if row is None else _row(row[0], row[1], row[2])

    @staticmethod
    def _write(conn: sqlite3.Connection, owner: str, peer: str, row: ContactRow | None) -> None:
        if row is None:
            conn.execute("DELETE FROM contacts WHERE owner = ? AND peer = ?", (owner, peer))
        else:
            conn.execute(
                "INSERT OR REPLACE INTO contacts (owner, peer, state, note_id, updated_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (owner, peer, row.state, row.note_id, row.updated_at),
            )

    async def update(
        self, owner: str, peer: str, rule: Rule, *, counts: bool = False
    ) -> Transition:
        """See :meth:`ContactStore.update`."""

        def op(conn: sqlite3.Connection) -> Transition:
            mine = self._read(conn, owner, peer)
            theirs = self._read(conn, peer, owner)
            pair = Pair(mine, theirs)
            if counts:

                def count(sql: str, *args: str) -> int:
                    return int(conn.execute(sql, args).fetchone()[0])

                pair = Pair(
                    mine,
                    theirs,
                    their_pending=count(
                        "SELECT count(*) FROM contacts WHERE owner = ? AND state = ?",
                        peer,
                        PENDING_IN,
                    ),
                    my_count=count("SELECT count(*) FROM contacts WHERE owner = ?", owner),
                    their_count=count("SELECT count(*) FROM contacts WHERE owner = ?", peer),
                )
            outcome = rule(pair)
            if outcome.error is None:
                if outcome.mine != mine:
                    self._write(conn, owner, peer, outcome.mine)
                if outcome.theirs != theirs:
                    self._write(conn, peer, owner, outcome.theirs)
            return outcome

        return await self._store.run(op)

    async def pair(self, owner: str, peer: str) -> Pair:
        """See :meth:`ContactStore.pair`."""

        def op(conn: sqlite3.Connection) -> Pair:
            return Pair(self._read(conn, owner, peer), self._read(conn, peer, owner))

        return await self._store.run(op)

    async def contacts(self, owner: str) -> list[tuple[str, ContactRow]]:
        """See :meth:`ContactStore.contacts`."""

        def op(conn: sqlite3.Connection) -> list[tuple[str, ContactRow]]:
            rows = conn.execute(
                "SELECT peer, state, updated_at, note_id FROM contacts WHERE owner = ?"
                " ORDER BY peer",
                (owner,),
            ).fetchall()
            return [(r[0], _row(r[1], r[2], r[3])) for r in rows]

        return await self._store.run(op)

    async def accepted(self, owner: str) -> list[str]:
        """See :meth:`ContactStore.accepted`."""

        def op(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT peer FROM contacts WHERE owner = ? AND state = ? ORDER BY peer",
                (owner, ACCEPTED),
            ).fetchall()
            return [r[0] for r in rows]

        return await self._store.run(op)

    async def invisible(self, user: str) -> bool:
        """See :meth:`ContactStore.invisible`."""

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT invisible FROM contact_settings WHERE username = ?", (user,)
            ).fetchone()
            return bool(row[0]) if row is not None else False

        return await self._store.run(op)

    async def set_invisible(self, user: str, invisible: bool) -> None:
        """See :meth:`ContactStore.set_invisible`."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO contact_settings (username, invisible) VALUES (?, ?)",
                (user, int(invisible)),
            )

        await self._store.run(op)


class PgContactStore:
    """:class:`ContactStore` in PostgreSQL (tables from migration 0002), shared by every node."""

    def __init__(self, store: PgStore) -> None:
        self._store = store

    @staticmethod
    async def _read(conn: Connection, owner: str, peer: str) -> ContactRow | None:
        row = await conn.fetchrow(
            "SELECT state, updated_at, note_id FROM contacts WHERE owner = $1 AND peer = $2",
            owner,
            peer,
        )
        return None if row is None else _row(row["state"], row["updated_at"], row["note_id"])

    @staticmethod
    async def _write(conn: Connection, owner: str, peer: str, row: ContactRow | None) -> None:
        if row is None:
            await conn.execute("DELETE FROM contacts WHERE owner = $1 AND peer = $2", owner, peer)
        else:
            await conn.execute(
                "INSERT INTO contacts (owner, peer, state, note_id, updated_at)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (owner, peer) DO UPDATE"
                " SET state = excluded.state, note_id = excluded.note_id,"
                " updated_at = excluded.updated_at",
                owner,
                peer,
                row.state,
                row.note_id,
                row.updated_at,
            )

    async def update(
        self, owner: str, peer: str, rule: Rule, *, counts: bool = False
    ) -> Transition:
        """See :meth:`ContactStore.update`; the pair is locked for the transaction."""
        first, second = sorted((owner, peer))
        async with self._store.connection() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"contact:{first} {second}"
            )
            mine = await self._read(conn, owner, peer)
            theirs = await self._read(conn, peer, owner)
            pair = Pair(mine, theirs)
            if counts:
                pair = Pair(
                    mine,
                    theirs,
                    their_pending=int(
                        await conn.fetchval(
                            "SELECT count(*) FROM contacts WHERE owner = $1 AND state = $2",
                            peer,
                            PENDING_IN,
                        )
                    ),
                    my_count=int(
                        await conn.fetchval("SELECT count(*) FROM contacts WHERE owner = $1", owner)
                    ),
                    their_count=int(
                        await conn.fetchval("SELECT count(*) FROM contacts WHERE owner = $1", peer)
                    ),
                )
            outcome = rule(pair)
            if outcome.error is None:
                if outcome.mine != mine:
                    await self._write(conn, owner, peer, outcome.mine)
                if outcome.theirs != theirs:
                    await self._write(conn, peer, owner, outcome.theirs)
            return outcome

    async def pair(self, owner: str, peer: str) -> Pair:
        """See :meth:`ContactStore.pair`."""
        async with self._store.connection() as conn:
            return Pair(await self._read(conn, owner, peer), await self._read(conn, peer, owner))

    async def contacts(self, owner: str) -> list[tuple[str, ContactRow]]:
        """See :meth:`ContactStore.contacts`."""
        async with self._store.connection() as conn:
            rows = await conn.fetch(
                "SELECT peer, state, updated_at, note_id FROM contacts WHERE owner = $1"
                " ORDER BY peer",
                owner,
            )
        return [(r["peer"], _row(r["state"], r["updated_at"], r["note_id"])) for r in rows]

    async def accepted(self, owner: str) -> list[str]:
        """See :meth:`ContactStore.accepted`."""
        async with self._store.connection() as conn:
            rows = await conn.fetch(
                "SELECT peer FROM contacts WHERE owner = $1 AND state = $2 ORDER BY peer",
                owner,
                ACCEPTED,
            )
        return [r["peer"] for r in rows]

    async def invisible(self, user: str) -> bool:
        """See :meth:`ContactStore.invisible`."""
        async with self._store.connection() as conn:
            value = await conn.fetchval(
                "SELECT invisible FROM contact_settings WHERE username = $1", user
            )
        return bool(value)

    async def set_invisible(self, user: str, invisible: bool) -> None:
        """See :meth:`ContactStore.set_invisible`."""
        async with self._store.connection() as conn:
            await conn.execute(
                "INSERT INTO contact_settings (username, invisible) VALUES ($1, $2)"
                " ON CONFLICT (username) DO UPDATE SET invisible = excluded.invisible",
                user,
                invisible,
            )
