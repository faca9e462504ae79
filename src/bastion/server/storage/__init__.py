"""Where the relay keeps its data: the interfaces, the SQLite and PostgreSQL adapters, and
:func:`open_storage`, the one place that knows which backend a node runs on.

Everything else is given a :class:`Storage` and sees only the interfaces
(:class:`~bastion.server.storage.interfaces.Store`, :class:`ContactStore`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bastion.errors import StorageError
from bastion.server.config import Settings
from bastion.server.storage.admin import AdminBackend
from bastion.server.storage.blob_content import (
    BlobContent,
    LocalBlobFiles,
    PgBlobContent,
    discard,
)
from bastion.server.storage.blobs import BlobStore, PgBlobStore, SQLiteBlobStore
from bastion.server.storage.contacts import ContactStore, PgContactStore, SQLiteContactStore
from bastion.server.storage.device_lists import (
    DeviceListStore,
    PgDeviceListStore,
    SQLiteDeviceListStore,
)
from bastion.server.storage.groups import GroupStore, SQLiteGroupStore
from bastion.server.storage.interfaces import Store
from bastion.server.storage.sqlite.admin import DB_FILE, SQLiteAdmin
from bastion.server.storage.sqlite.relay import SQLiteStore

BLOBS_DIR = "blobs"


@dataclass(frozen=True, slots=True, kw_only=True)
class Storage:
    """Every store of one node, opened together on one backend.

    ``blob_folder`` holds uploads in progress (and, on SQLite, finished blobs).
    ``admin`` is closed by the :class:`~bastion.server.admin.watch.AdminChannel`
    that reads it; :meth:`close` closes the rest.
    """

    relay: Store
    contacts: ContactStore
    groups: GroupStore
    blobs: BlobStore
    blob_content: BlobContent
    blob_folder: Path
    device_lists: DeviceListStore
    admin: AdminBackend

    async def close(self) -> None:
        """Let the relay store finish its writes and close it."""
        await self.relay.close()


async def open_storage(settings: Settings, data_dir: Path) -> Storage:
    """SQLite in ``data_dir``, or PostgreSQL at ``settings.db``; every table created.

    Raises :class:`StorageError` if the database or the blob folder cannot be opened.
    """
    blob_folder = data_dir / BLOBS_DIR
    try:
        blob_folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Nothing is being uploaded before the node starts: any partial file was left
        # by a node that stopped mid-upload, and no one can finish it.
        for partial in blob_folder.glob("*.part"):
            discard(partial)
    except OSError as exc:
        raise StorageError(f"cannot create the blob folder: {exc.strerror}") from None
    if settings.db is None:
        return await _open_sqlite(data_dir, blob_folder)
    return await _open_postgres(settings.db, blob_folder)


async def open_admin(data_dir: Path, db: str | None) -> AdminBackend:
    """Only the operator tables of the node in ``data_dir`` (for ``bastion admin``):
    its SQLite file, or the PostgreSQL database at ``db``, on a connection of their own.

    Raises :class:`ConfigError` if the data folder does not exist (SQLite) and
    :class:`StorageError` if the database cannot be opened.
    """
    if db is None:
        return await SQLiteAdmin.open(data_dir)
    from bastion.server.storage.postgres.admin import PgAdmin  # noqa: PLC0415 - imports asyncpg

    return await PgAdmin.open(db)


async def _open_sqlite(data_dir: Path, blob_folder: Path) -> Storage:
    relay = SQLiteStore(data_dir / DB_FILE)
    contacts = SQLiteContactStore(relay)
    await contacts.open()
    groups = SQLiteGroupStore(relay)
    await groups.open()
    device_lists = SQLiteDeviceListStore(relay)
    await device_lists.open()
    return Storage(
        relay=relay,
        contacts=contacts,
        groups=groups,
        blobs=await SQLiteBlobStore.open(relay),
        blob_content=LocalBlobFiles(blob_folder),
        blob_folder=blob_folder,
        device_lists=device_lists,
        admin=await SQLiteAdmin.open(data_dir),
    )


async def _open_postgres(url: str, blob_folder: Path) -> Storage:
    # asyncpg is loaded only by a node (or command) that uses PostgreSQL.
    from bastion.server.storage.postgres.admin import PgAdmin  # noqa: PLC0415 - imports asyncpg
    from bastion.server.storage.postgres.groups import PgGroupStore  # noqa: PLC0415
    from bastion.server.storage.postgres.relay import PgStore  # noqa: PLC0415

    relay = await PgStore.connect(url)
    groups = PgGroupStore(relay)
    await groups.open()
    device_lists = PgDeviceListStore(relay)
    await device_lists.open()
    return Storage(
        relay=relay,
        contacts=PgContactStore(relay),
        groups=groups,
        blobs=PgBlobStore(relay),
        blob_content=PgBlobContent(relay),
        blob_folder=blob_folder,
        device_lists=device_lists,
        admin=PgAdmin(relay.connection),
    )
