"""The operator tables of a cluster, in the PostgreSQL schema every node shares.

Same rules as the single server's SQLite tables (:mod:`bastion.server.admin.policy`):
a change and its ``admin_events`` row commit together, and every node applies
and audits the events after the last one it saw. Event ids must become visible
in order, or a node could read id 11, move past it, and never see an id 10 that
committed a moment later; so every writer of ``admin_events`` first takes a
lock that conflicts with itself (and not with readers) on that table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

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
from bastion.server.storage.postgres.relay import Connection, PgStore

ConnectionSource = Callable[[], contextlib.AbstractAsyncContextManager[Connection]]


async def _event(conn: Connection, now_ms: int, action: str, target: str) -> None:
    await conn.execute("LOCK TABLE admin_events IN SHARE ROW EXCLUSIVE MODE")
    await conn.execute(
        "INSERT INTO admin_events (at, action, target) VALUES ($1, $2, $3)",
        now_ms,
        action,
        target,
    )


class PgAdmin:
    """:class:`~bastion.server.storage.admin.AdminBackend` on the cluster's PostgreSQL schema.

    ``connection`` hands out pooled connections (:meth:`PgStore.connection`);
    ``owned`` is a store opened for this object alone, closed with it.
    """

    def __init__(self, connection: ConnectionSource, *, owned: PgStore | None = None) -> None:
        self._connection = connection
        self._owned = owned

    @classmethod
    async def open(cls, url: str) -> PgAdmin:
        """Connect to the cluster's database on its own (for ``bastion admin``).

        Raises :class:`StorageError` if it is unreachable or cannot be migrated.
        """
        store = await PgStore.connect(url, min_connections=1, max_connections=2)
        return cls(store.connection, owned=store)

    async def source(self) -> str:
        """The database's own random name, made when its operator tables were."""
        async with self._connection() as conn:
            name = await conn.fetchval("SELECT id FROM admin_identity")
        if not isinstance(name, str):
            raise StorageError("the database has no admin identity")
        return f"postgresql/{name}"

    async def policy(self) -> Policy:
        """See :meth:`AdminBackend.policy`."""
        async with self._connection() as conn:
            rows = await conn.fetch("SELECT key, value FROM policy")
        return policy_from_rows({r["key"]: r["value"] for r in rows})

    async def set_policy(self, setting: str, *, now_ms: int) -> Policy:
        """See :meth:`AdminBackend.set_policy`."""
        key, value = parse_setting(setting)
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO policy (key, value) VALUES ($1, $2)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                key,
                value,
            )
            await conn.execute(
                "INSERT INTO policy (key, value) VALUES ($1, '2')"
                " ON CONFLICT (key) DO UPDATE SET value = (policy.value::bigint + 1)::text",
                VERSION_KEY,
            )
            await _event(conn, now_ms, "policy.set", f"{key}={value}")
        return await self.policy()

    async def users(self) -> list[UserSummary]:
        """See :meth:`AdminBackend.users`."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT a.username, a.created_at, a.disabled,"
                " (SELECT count(*) FROM devices d WHERE d.username = a.username) AS devices"
                " FROM accounts a ORDER BY a.username"
            )
        return [
            UserSummary(r["username"], r["created_at"], r["disabled"], r["devices"]) for r in rows
        ]

    async def set_disabled(self, username: str, disabled: bool, *, now_ms: int) -> None:
        """See :meth:`AdminBackend.set_disabled`."""
        async with self._connection() as conn, conn.transaction():
            status = await conn.execute(
                "UPDATE accounts SET disabled = $1 WHERE username = $2", disabled, username
            )
            if status != "UPDATE 1":
                raise ConfigError(f"there is no user named {username!r}")
            await _event(conn, now_ms, "user.disabled" if disabled else "user.enabled", username)

    async def create_invite(self, *, uses: int, expires_at_ms: int, now_ms: int) -> str:
        """See :meth:`AdminBackend.create_invite`."""
        check_invite(uses=uses, expires_at_ms=expires_at_ms, now_ms=now_ms)
        code = new_invite_code()
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO invites (code_hash, uses_left, expires_at, created_at)"
                " VALUES ($1, $2, $3, $4)",
                invite_hash(code),
                uses,
                expires_at_ms,
                now_ms,
            )
            await _event(conn, now_ms, "invite.created", f"uses={uses}")
        return code

    async def use_invite(self, code: str, *, now_ms: int) -> bool:
        """See :meth:`AdminBackend.use_invite` (one row update: atomic across nodes)."""
        async with self._connection() as conn:
            left = await conn.fetchval(
                "UPDATE invites SET uses_left = uses_left - 1"
                " WHERE code_hash = $1 AND uses_left > 0 AND expires_at > $2 RETURNING uses_left",
                invite_hash(code),
                now_ms,
            )
        return left is not None

    async def return_invite(self, code: str) -> None:
        """See :meth:`AdminBackend.return_invite`."""
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE invites SET uses_left = uses_left + 1 WHERE code_hash = $1",
                invite_hash(code),
            )

    async def first_cursor(self) -> int:
        """The newest event: a node that joins now has nothing older to apply."""
        async with self._connection() as conn:
            newest = await conn.fetchval("SELECT coalesce(max(id), 0) FROM admin_events")
        return int(newest)

    async def events_after(self, after_id: int, limit: int = 256) -> list[AdminEvent]:
        """See :meth:`AdminBackend.events_after`."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id, at, action, target FROM admin_events WHERE id > $1 ORDER BY id"
                " LIMIT $2",
                after_id,
                limit,
            )
        return [AdminEvent(r["id"], r["at"], r["action"], r["target"]) for r in rows]

    async def queue_depth(self) -> int:
        """See :meth:`AdminBackend.queue_depth`."""
        async with self._connection() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM queue"))

    async def close(self) -> None:
        """Close the store opened for this object, if any (a shared one stays open)."""
        if self._owned is not None:
            await self._owned.close()
