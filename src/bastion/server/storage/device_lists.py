"""Where the relay keeps each account's newest signed device list (SQLite and PostgreSQL).

The handlers are in :mod:`bastion.server.handlers.device_lists`; the checks that
matter are the clients' (docs/protocol.md, section 6.7).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from bastion.errors import StorageError
from bastion.server.storage.sqlite.relay import SQLiteStore

if TYPE_CHECKING:
    from bastion.server.storage.postgres.relay import PgStore

SQLITE_TABLES = (
    "CREATE TABLE IF NOT EXISTS device_lists (username TEXT PRIMARY KEY,"
    " identity_key BLOB NOT NULL, version INTEGER NOT NULL, device_ids TEXT NOT NULL,"
    " signature BLOB NOT NULL)",
)


class StaleDeviceListError(StorageError):
    """The stored list already has this version or a higher one."""


@dataclass(frozen=True, slots=True)
class StoredDeviceList:
    """A list as stored: the account key that signed it, version, ids and the signature.

    A list signed by another key than the account's current one (the name was
    freed and registered again) is never handed out and is replaced by any version.
    """

    identity_key: bytes
    version: int
    device_ids: tuple[str, ...]
    signature: bytes


class DeviceListStore(Protocol):
    """Where the newest signed list of each account is kept."""

    async def latest(self, username: str) -> StoredDeviceList | None:
        """The newest list of ``username``, or None if it never published one."""
        ...

    async def replace(self, username: str, device_list: StoredDeviceList) -> None:
        """Store ``device_list`` if its version is higher; raises :class:`StaleDeviceListError`."""
        ...


def _ids(text: str) -> tuple[str, ...]:
    return tuple(i for i in text.split(",") if i)


class SQLiteDeviceListStore:
    """:class:`DeviceListStore` in the relay's SQLite file."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    async def open(self) -> None:
        """Create the table if needed."""
        await self._store.ensure_tables(SQLITE_TABLES)

    async def latest(self, username: str) -> StoredDeviceList | None:
        """See :meth:`DeviceListStore.latest`."""

        def op(conn: sqlite3.Connection) -> StoredDeviceList | None:
            row = conn.execute(
                "SELECT identity_key, version, device_ids, signature FROM device_lists"
                " WHERE username = ?",
                (username,),
            ).fetchone()
            if row is None:
                return None
            return StoredDeviceList(bytes(row[0]), int(row[1]), _ids(row[2]), bytes(row[3]))

        return await self._store.run(op)

    async def replace(self, username: str, device_list: StoredDeviceList) -> None:
        """See :meth:`DeviceListStore.replace`."""

        def op(conn: sqlite3.Connection) -> None:
            cursor = conn.execute(
                "INSERT INTO device_lists (username, identity_key, version, device_ids, signature)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (username) DO UPDATE SET"
                " identity_key = excluded.identity_key, version = excluded.version,"
                " device_ids = excluded.device_ids, signature = excluded.signature"
                " WHERE excluded.version > device_lists.version"
                " OR excluded.identity_key <> device_lists.identity_key",
                (
                    username,
                    device_list.identity_key,
                    device_list.version,
                    ",".join(device_list.device_ids),
                    device_list.signature,
                ),
            )
            if cursor.rowcount == 0:
                raise StaleDeviceListError("a newer device list is already stored")

        await self._store.run(op)


class PgDeviceListStore:
    """:class:`DeviceListStore` in PostgreSQL (table from migration 0007)."""

    def __init__(self, store: PgStore) -> None:
        self._store = store

    async def open(self) -> None:
        """Nothing to do: the migration made the table."""

    async def latest(self, username: str) -> StoredDeviceList | None:
        """See :meth:`DeviceListStore.latest`."""
        async with self._store.connection() as conn:
            row = await conn.fetchrow(
                "SELECT identity_key, version, device_ids, signature FROM device_lists"
                " WHERE username = $1",
                username,
            )
        if row is None:
            return None
        return StoredDeviceList(
            bytes(row["identity_key"]),
            int(row["version"]),
            _ids(row["device_ids"]),
            bytes(row["signature"]),
        )

    async def replace(self, username: str, device_list: StoredDeviceList) -> None:
        """See :meth:`DeviceListStore.replace`."""
        async with self._store.connection() as conn:
            status = await conn.execute(
                "INSERT INTO device_lists (username, identity_key, version, device_ids, signature)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (username) DO UPDATE SET"
                " identity_key = excluded.identity_key, version = excluded.version,"
                " device_ids = excluded.device_ids, signature = excluded.signature"
                " WHERE excluded.version > device_lists.version"
                " OR excluded.identity_key <> device_lists.identity_key",
                username,
                device_list.identity_key,
                device_list.version,
                ",".join(device_list.device_ids),
                device_list.signature,
            )
        if status.endswith(" 0"):
            raise StaleDeviceListError("a newer device list is already stored")
