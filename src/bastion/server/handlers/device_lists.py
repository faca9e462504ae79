"""Signed device lists: the relay keeps the newest one per account and hands it out.

Each account publishes a list of its device ids, signed by the account identity
key and numbered by a version that every link and revocation raises (see
:class:`bastion.crypto.device.SignedDeviceList`). The relay checks the signature
and that the version only goes up, stores the newest list, and attaches it to
every key query answer. Clients do the checks that matter: the relay is not
trusted with them (docs/protocol.md, section 6.7).
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from bastion.crypto.device import SignedDeviceList
from bastion.errors import AuthenticationError, StorageError
from bastion.protocol import frames
from bastion.server import handlers
from bastion.server.storage.postgres.relay import PgStore
from bastion.server.storage.sqlite.relay import SQLiteStore

if TYPE_CHECKING:
    from bastion.server.net.connection import ClientConnection, RelayServer

EXTENSION = "device_lists"

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


_opening = asyncio.Lock()


async def store_of(server: RelayServer) -> DeviceListStore:
    """The server's device list store, opened on first use; StorageError for other stores."""
    found = server.extensions.get(EXTENSION)
    if isinstance(found, SQLiteDeviceListStore | PgDeviceListStore):
        return found
    async with _opening:
        found = server.extensions.get(EXTENSION)
        if isinstance(found, SQLiteDeviceListStore | PgDeviceListStore):
            return found
        store: SQLiteDeviceListStore | PgDeviceListStore
        if isinstance(server.store, SQLiteStore):
            store = SQLiteDeviceListStore(server.store)
        elif isinstance(server.store, PgStore):
            store = PgDeviceListStore(server.store)
        else:
            raise StorageError("this store keeps no device lists")
        await store.open()
        server.extensions[EXTENSION] = store
        return store


async def latest_frame(
    server: RelayServer, username: str, identity_key: bytes
) -> frames.DeviceList | None:
    """The newest list of ``username`` (signed by ``identity_key``) for a key query answer."""
    stored = await (await store_of(server)).latest(username)
    if stored is None or stored.identity_key != identity_key:
        return None
    return frames.DeviceList(
        version=stored.version, device_ids=list(stored.device_ids), signature=stored.signature
    )


@handlers.handles(frames.PublishDeviceList)
async def publish(conn: ClientConnection, frame: frames.PublishDeviceList) -> None:
    """Store a newer list signed by the account key of the signed-in account."""
    username, device_id = conn.session.require_signed_in()
    account = await conn.server.store.get_account(username)
    if account is None:
        raise AuthenticationError("account no longer exists")
    listed = frame.device_list
    signed = SignedDeviceList(username, listed.version, tuple(listed.device_ids), listed.signature)
    try:
        signed.verify(account.identity_key)
    except AuthenticationError:
        conn.refuse(frame.req, "bad_device_list", "the device list is not signed by the account")
        return
    try:
        await (await store_of(conn.server)).replace(
            username,
            StoredDeviceList(
                account.identity_key, signed.version, signed.device_ids, signed.signature
            ),
        )
    except StaleDeviceListError as exc:
        conn.refuse(frame.req, "stale_device_list", str(exc))
        return
    conn.server.audit_event(
        "device_list.published", user=username, version=signed.version, by=device_id
    )
    conn.send_frame(frames.Ok(req=frame.req))
