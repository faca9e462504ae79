"""The group store in the shared PostgreSQL database (tables from migrations 0003 and 0008).

The same rules as :class:`~bastion.server.storage.groups.SQLiteGroupStore`, one
transaction per call.
"""

from __future__ import annotations

from collections.abc import Sequence

from bastion.protocol.frames import GROUP_KIND
from bastion.server.storage.groups import (
    DECLINED,
    PENDING,
    SENT_RETENTION_MS,
    Appended,
    GroupConflictError,
    Invitation,
    envelopes_of,
)
from bastion.server.storage.interfaces import QueuedEnvelope
from bastion.server.storage.postgres.relay import Connection, PgStore


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

    async def head(self, group_id: bytes) -> bytes | None:
        """The stored head state."""
        async with self._store.connection() as conn:
            state = await conn.fetchval(
                "SELECT state FROM group_heads WHERE group_id = $1", group_id
            )
        return None if state is None else bytes(state)

    async def set_head(self, group_id: bytes, seq: int, head: bytes) -> None:
        """Store a rebuilt head (unless a newer one got there first)."""
        async with self._store.connection() as conn:
            await conn.execute(
                "INSERT INTO group_heads (group_id, seq, state) VALUES ($1, $2, $3)"
                " ON CONFLICT (group_id) DO NOTHING",
                group_id,
                seq,
                head,
            )

    async def not_joined(self, group_id: bytes) -> dict[str, str]:
        """Named but not joined members and their state."""
        async with self._store.connection() as conn:
            rows = await conn.fetch(
                "SELECT username, state FROM group_invites WHERE group_id = $1", group_id
            )
        return {str(r[0]): str(r[1]) for r in rows}

    async def pending_invites(self, user: str, limit: int) -> list[Invitation]:
        """Pending invitations, oldest first."""
        async with self._store.connection() as conn:
            rows = await conn.fetch(
                "SELECT group_id, inviter, created_at FROM group_invites"
                " WHERE username = $1 AND state = $2 ORDER BY created_at, group_id LIMIT $3",
                user,
                PENDING,
                limit,
            )
        return [Invitation(bytes(r[0]), str(r[1]), int(r[2])) for r in rows]

    async def blocked_by(self, user: str) -> set[str]:
        """Who blocked ``user``."""
        async with self._store.connection() as conn:
            rows = await conn.fetch(
                "SELECT owner FROM contacts WHERE peer = $1 AND state = 'blocked'", user
            )
        return {str(r[0]) for r in rows}

    async def respond(
        self, group_id: bytes, user: str, device: str, *, accept: bool, server_ts: int, item: bytes
    ) -> list[QueuedEnvelope] | None:
        """Join or decline, in one transaction."""
        async with self._store.connection() as conn, conn.transaction():
            state = await conn.fetchval(
                "SELECT state FROM group_invites WHERE group_id = $1 AND username = $2 FOR UPDATE",
                group_id,
                user,
            )
            if state != PENDING:
                return None
            if not accept:
                await conn.execute(
                    "UPDATE group_invites SET state = $3 WHERE group_id = $1 AND username = $2",
                    group_id,
                    user,
                    DECLINED,
                )
                return []
            await conn.execute(
                "DELETE FROM group_invites WHERE group_id = $1 AND username = $2", group_id, user
            )
            await conn.execute(
                "INSERT INTO group_members (group_id, username, active) VALUES ($1, $2, true)"
                " ON CONFLICT (group_id, username) DO UPDATE SET active = true",
                group_id,
                user,
            )
            rows = await _pg_queue(
                conn, [user], sender=user, sender_device=device, server_ts=server_ts, item=item
            )
        return envelopes_of(rows, user, device, server_ts, item)

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
                "INSERT INTO group_heads (group_id, seq, state) VALUES ($1, $2, $3)"
                " ON CONFLICT (group_id) DO UPDATE SET seq = excluded.seq, state = excluded.state",
                group_id,
                seq,
                appended.head,
            )
            gone = await conn.fetch(
                "DELETE FROM group_invites"
                " WHERE group_id = $1 AND NOT (username = ANY($2::text[])) RETURNING username",
                group_id,
                list(appended.named),
            )
            # Named once and gone without joining: a former member, so a new add invites.
            await conn.execute(
                "INSERT INTO group_members (group_id, username, active)"
                " SELECT $1, u, false FROM unnest($2::text[]) AS t(u)"
                " ON CONFLICT (group_id, username) DO NOTHING",
                group_id,
                [str(r[0]) for r in gone],
            )
            await conn.executemany(
                "INSERT INTO group_invites (group_id, username, inviter, state, created_at)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (group_id, username) DO UPDATE"
                " SET inviter = excluded.inviter, state = excluded.state,"
                " created_at = excluded.created_at",
                [
                    (group_id, user, appended.inviter, state, server_ts)
                    for user, state in appended.invites
                ],
            )
            await conn.execute(
                "UPDATE group_members SET active = false WHERE group_id = $1", group_id
            )
            await conn.execute(
                "INSERT INTO group_members (group_id, username, active)"
                " SELECT $1, u, true FROM unnest($2::text[]) AS t(u)"
                " ON CONFLICT (group_id, username) DO UPDATE SET active = true",
                group_id,
                list(appended.members),
            )
            rows = await _pg_queue(
                conn,
                notify,
                sender=sender,
                sender_device=sender_device,
                server_ts=server_ts,
                item=item,
            )
            invited = await _pg_queue(
                conn,
                [user for user, state in appended.invites if state == PENDING],
                sender=sender,
                sender_device=sender_device,
                server_ts=server_ts,
                item=appended.invite_item,
            )
        return envelopes_of(rows, sender, sender_device, server_ts, item) + envelopes_of(
            invited, sender, sender_device, server_ts, appended.invite_item
        )

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
        return server_ts, envelopes_of(rows, sender, sender_device, server_ts, item)


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
