"""The device list store on SQLite and PostgreSQL: only a higher version replaces a list."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bastion.server.storage.device_lists import (
    DeviceListStore,
    PgDeviceListStore,
    SQLiteDeviceListStore,
    StaleDeviceListError,
    StoredDeviceList,
)
from bastion.server.storage.postgres.relay import PgStore
from bastion.server.storage.sqlite.relay import SQLiteStore
from tests.server.test_store_contract import (
    POSTGRES_URL,
    drop_schema,
    fresh_schema,
    postgres_or_skip,
)

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DeviceListStore]:
    if request.param == "sqlite":
        sqlite = SQLiteStore(tmp_path / "bastion.db")
        lists = SQLiteDeviceListStore(sqlite)
        await lists.open()
        yield lists
        await sqlite.close()
        return
    await postgres_or_skip()
    schema = fresh_schema()
    pg = await PgStore.connect(f"{POSTGRES_URL}?schema={schema}")
    try:
        pg_lists = PgDeviceListStore(pg)
        await pg_lists.open()
        yield pg_lists
    finally:
        await pg.close()
        await drop_schema(schema)


def listed(version: int, *ids: str, key: bytes = KEY) -> StoredDeviceList:
    return StoredDeviceList(key, version, ids, bytes([version]) * 64)


async def test_only_a_higher_version_replaces_the_stored_list(store: DeviceListStore) -> None:
    assert await store.latest("alice") is None
    await store.replace("alice", listed(1, "aaaaaaaaaaaaaaaa"))
    await store.replace("alice", listed(2, "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"))
    for stale in (listed(2, "aaaaaaaaaaaaaaaa"), listed(1, "cccccccccccccccc")):
        with pytest.raises(StaleDeviceListError):
            await store.replace("alice", stale)
    assert await store.latest("alice") == listed(2, "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb")
    assert await store.latest("bob") is None


async def test_a_list_under_a_new_account_key_starts_afresh(store: DeviceListStore) -> None:
    await store.replace("alice", listed(5, "aaaaaaaaaaaaaaaa"))
    await store.replace("alice", listed(1, "dddddddddddddddd", key=OTHER_KEY))
    assert await store.latest("alice") == listed(1, "dddddddddddddddd", key=OTHER_KEY)
