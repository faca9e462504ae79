"""Where the relay keeps groups: each group's signed chain, its member list, and fan-out.

The server's member list is derived from the chain it stores (the relay applies
each change to the stored head state before appending it); clients never take
it from the server, they replay the chain themselves. A member the chain names
who has not joined (an invitation pending or declined, or withheld because they
blocked the adder) is kept in ``group_invites`` and is not an active member: the
server delivers nothing of the group to them. A group message is stored as one
queue row per member device in the ordinary device queues (kind ``GROUP_KIND``),
so delivery, acknowledgement, catch-up and revocation work exactly as for direct
messages.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from bastion.errors import StorageError
from bastion.protocol.frames import GROUP_KIND
from bastion.server.storage.interfaces import QueuedEnvelope
from bastion.server.storage.sqlite.relay import SQLiteStore

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
    "CREATE TABLE IF NOT EXISTS group_heads (group_id BLOB PRIMARY KEY, seq INTEGER NOT NULL,"
    " state BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS group_invites (group_id BLOB NOT NULL, username TEXT NOT NULL,"
    " inviter TEXT NOT NULL, state TEXT NOT NULL, created_at INTEGER NOT NULL,"
    " PRIMARY KEY (group_id, username))",
    "CREATE INDEX IF NOT EXISTS group_invites_by_user ON group_invites (username, state)",
)

# States of a member the chain names who has not joined.
PENDING = "pending"  # invited, no answer yet
DECLINED = "declined"  # said no (silently: the group sees an invitation never answered)
WITHHELD = "withheld"  # added by someone they blocked: never shown to them


@dataclass(frozen=True, slots=True)
class Invitation:
    """A pending invitation as stored: the group, who added the user, when."""

    group_id: bytes
    inviter: str
    created_at: int


@dataclass(frozen=True, slots=True)
class Appended:
    """What :meth:`GroupStore.append_change` writes besides the change itself."""

    head: bytes  # the encoded verified state after the change
    members: Sequence[str]  # who is an active (joined) member afterwards
    named: Sequence[str]  # every member the chain names afterwards
    invites: Sequence[tuple[str, str]]  # new not-joined members and their state
    inviter: str
    invite_item: bytes  # queued to each new PENDING invitee's devices


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

    async def head(self, group_id: bytes) -> bytes | None:
        """The encoded verified state at the group's head (None: none stored)."""
        ...

    async def set_head(self, group_id: bytes, seq: int, head: bytes) -> None:
        """Store the head state of a chain that had none (rebuilt once from the chain)."""
        ...

    async def not_joined(self, group_id: bytes) -> dict[str, str]:
        """Members the chain names who have not joined, with their state."""
        ...

    async def pending_invites(self, user: str, limit: int) -> list[Invitation]:
        """``user``'s invitations waiting for an answer, oldest first."""
        ...

    async def blocked_by(self, user: str) -> set[str]:
        """The accounts that blocked ``user``."""
        ...

    async def respond(
        self, group_id: bytes, user: str, device: str, *, accept: bool, server_ts: int, item: bytes
    ) -> list[QueuedEnvelope] | None:
        """Answer ``user``'s pending invitation (None if there is none).

        Accepting makes ``user`` an active member and queues ``item`` (a chain
        notice) for their other devices; declining is kept, silently.
        """
        ...

    async def append_change(
        self,
        *,
        group_id: bytes,
        seq: int,
        change: bytes,
        appended: Appended,
        notify: Sequence[str],
        sender: str,
        sender_device: str,
        server_ts: int,
        item: bytes,
    ) -> list[QueuedEnvelope]:
        """Append a change with its head state and member lists; queue notices.

        ``item`` goes to ``notify``'s devices, ``appended.invite_item`` to new
        pending invitees'. The sender's own device gets no copy. Raises
        :class:`GroupConflictError` if the chain already has a change at ``seq``.
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


def envelopes_of(
    rows: Sequence[Sequence[object]], sender: str, sender_device: str, ts: int, item: bytes
) -> list[QueuedEnvelope]:
    """Queue rows ``(seq, user, device)`` of one group item as envelopes to publish."""
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

    async def head(self, group_id: bytes) -> bytes | None:
        """The stored head state."""

        def op(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT state FROM group_heads WHERE group_id = ?", (group_id,)
            ).fetchone()
            return None if row is None else bytes(row[0])

        return await self._store.run(op)

    async def set_head(self, group_id: bytes, seq: int, head: bytes) -> None:
        """Store a rebuilt head (unless a newer one got there first)."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO group_heads (group_id, seq, state) VALUES (?, ?, ?)"
                " ON CONFLICT (group_id) DO NOTHING",
                (group_id, seq, head),
            )

        await self._store.run(op)

    async def not_joined(self, group_id: bytes) -> dict[str, str]:
        """Named but not joined members and their state."""

        def op(conn: sqlite3.Connection) -> dict[str, str]:
            rows = conn.execute(
                "SELECT username, state FROM group_invites WHERE group_id = ?", (group_id,)
            )
            return {str(r[0]): str(r[1]) for r in rows}

        return await self._store.run(op)

    async def pending_invites(self, user: str, limit: int) -> list[Invitation]:
        """Pending invitations, oldest first."""

        def op(conn: sqlite3.Connection) -> list[Invitation]:
            rows = conn.execute(
                "SELECT group_id, inviter, created_at FROM group_invites"
                " WHERE username = ? AND state = ? ORDER BY created_at, group_id LIMIT ?",
                (user, PENDING, limit),
            )
            return [Invitation(bytes(r[0]), str(r[1]), int(r[2])) for r in rows]

        return await self._store.run(op)

    async def blocked_by(self, user: str) -> set[str]:
        """Who blocked ``user``."""

        def op(conn: sqlite3.Connection) -> set[str]:
            rows = conn.execute(
                "SELECT owner FROM contacts WHERE peer = ? AND state = 'blocked'", (user,)
            )
            return {str(r[0]) for r in rows}

        return await self._store.run(op)

    async def respond(
        self, group_id: bytes, user: str, device: str, *, accept: bool, server_ts: int, item: bytes
    ) -> list[QueuedEnvelope] | None:
        """Join or decline, in one transaction."""

        def op(conn: sqlite3.Connection) -> list[QueuedEnvelope] | None:
            row = conn.execute(
                "SELECT state FROM group_invites WHERE group_id = ? AND username = ?",
                (group_id, user),
            ).fetchone()
            if row is None or row[0] != PENDING:
                return None
            if not accept:
                conn.execute(
                    "UPDATE group_invites SET state = ? WHERE group_id = ? AND username = ?",
                    (DECLINED, group_id, user),
                )
                return []
            conn.execute(
                "DELETE FROM group_invites WHERE group_id = ? AND username = ?", (group_id, user)
            )
            conn.execute(
                "INSERT INTO group_members (group_id, username, active) VALUES (?, ?, 1)"
                " ON CONFLICT (group_id, username) DO UPDATE SET active = 1",
                (group_id, user),
            )
            return _sqlite_queue(
                conn, [user], sender=user, sender_device=device, server_ts=server_ts, item=item
            )

        return await self._store.run(op)

    async def append_change(
        self,
        *,
        group_id: bytes,
        seq: int,
        change: bytes,
        appended: Appended,
        notify: Sequence[str],
        sender: str,
        sender_device: str,
        server_ts: int,
        item: bytes,
    ) -> list[QueuedEnvelope]:
        """Append, update head, members and invitations, queue notices (one transaction)."""

        def op(conn: sqlite3.Connection) -> list[QueuedEnvelope]:
            try:
                conn.execute(
                    "INSERT INTO group_changes (group_id, seq, change) VALUES (?, ?, ?)",
                    (group_id, seq, change),
                )
            except sqlite3.IntegrityError:
                raise GroupConflictError("the group changed meanwhile; try again") from None
            conn.execute(
                "INSERT INTO group_heads (group_id, seq, state) VALUES (?, ?, ?)"
                " ON CONFLICT (group_id) DO UPDATE SET seq = excluded.seq, state = excluded.state",
                (group_id, seq, appended.head),
            )
            named = set(appended.named)
            gone = [
                (group_id, str(r[0]))
                for r in conn.execute(
                    "SELECT username FROM group_invites WHERE group_id = ?", (group_id,)
                )
                if str(r[0]) not in named
            ]
            conn.executemany("DELETE FROM group_invites WHERE group_id = ? AND username = ?", gone)
            # Named once and gone without joining: a former member, so a new add invites.
            conn.executemany(
                "INSERT INTO group_members (group_id, username, active) VALUES (?, ?, 0)"
                " ON CONFLICT (group_id, username) DO NOTHING",
                gone,
            )
            conn.executemany(
                "INSERT OR REPLACE INTO group_invites"
                " (group_id, username, inviter, state, created_at) VALUES (?, ?, ?, ?, ?)",
                [
                    (group_id, user, appended.inviter, state, server_ts)
                    for user, state in appended.invites
                ],
            )
            conn.execute("UPDATE group_members SET active = 0 WHERE group_id = ?", (group_id,))
            conn.executemany(
                "INSERT INTO group_members (group_id, username, active) VALUES (?, ?, 1)"
                " ON CONFLICT (group_id, username) DO UPDATE SET active = 1",
                [(group_id, user) for user in appended.members],
            )
            queued = _sqlite_queue(
                conn,
                notify,
                sender=sender,
                sender_device=sender_device,
                server_ts=server_ts,
                item=item,
            )
            return queued + _sqlite_queue(
                conn,
                [user for user, state in appended.invites if state == PENDING],
                sender=sender,
                sender_device=sender_device,
                server_ts=server_ts,
                item=appended.invite_item,
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
    return envelopes_of(rows, sender, sender_device, server_ts, item)
