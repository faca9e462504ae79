"""The operator tables, run against both backends: a single server's SQLite, a cluster's PostgreSQL.

Two backend objects on one database stand for two nodes (or ``bastion admin``
and a running node). PostgreSQL tests use a fresh schema, dropped afterwards,
and are skipped with the reason when no PostgreSQL answers.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from bastion.errors import ConfigError, StorageError
from bastion.server.admin.policy import new_invite_code
from bastion.server.admin.watch import (
    CURSOR_FILE,
    AdminChannel,
    EventCursor,
    audit_pending_events,
)
from bastion.server.audit.log import AUDIT_DIR, AuditLog, ensure_audit_key, read_records
from bastion.server.handlers._context import NullAudit
from bastion.server.storage.admin import AdminBackend
from bastion.server.storage.interfaces import Store
from bastion.server.storage.postgres.admin import PgAdmin, _event
from bastion.server.storage.postgres.relay import PgStore
from bastion.server.storage.sqlite.admin import AdminDB, SQLiteAdmin
from bastion.server.storage.sqlite.relay import SQLiteStore
from tests.server.test_store_contract import (
    POSTGRES_URL,
    drop_schema,
    fresh_schema,
    make_user,
    postgres_or_skip,
)

Node = Callable[[], Awaitable[AdminBackend]]
NOW_MS = 1_800_000_000_000


class Database:
    """One database, and the backends ("nodes") and relay store opened on it."""

    def __init__(self, kind: str, root: Path, schema: str) -> None:
        self.kind = kind
        self.root = root
        self.schema = schema
        self.opened: list[AdminBackend] = []
        self.stores: list[Store] = []

    @property
    def url(self) -> str:
        return f"{POSTGRES_URL}?schema={self.schema}"

    async def node(self) -> AdminBackend:
        backend: AdminBackend
        if self.kind == "sqlite":
            backend = await SQLiteAdmin.open(self.root)
        else:
            backend = await PgAdmin.open(self.url)
        self.opened.append(backend)
        return backend

    async def store(self) -> Store:
        store: Store
        if self.kind == "sqlite":
            store = SQLiteStore(self.root / "bastion.db")
        else:
            store = await PgStore.connect(self.url)
        self.stores.append(store)
        return store


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "postgres":
        await postgres_or_skip()
    db = Database(request.param, tmp_path, fresh_schema())
    yield db
    for backend in db.opened:
        await backend.close()
    for store in db.stores:
        await store.close()
    if request.param == "postgres":
        await drop_schema(db.schema)


async def test_a_policy_change_is_seen_by_every_node_with_a_higher_version(
    database: Database,
) -> None:
    one, two = await database.node(), await database.node()
    before = await two.policy()
    assert (before.registration, before.file_transfer, before.version) == ("open", True, 1)
    await one.set_policy("registration=invite", now_ms=NOW_MS)
    await one.set_policy("max_file_mb=25", now_ms=NOW_MS)
    after = await two.policy()
    assert (after.registration, after.max_file_mb, after.version) == ("invite", 25, 3)
    with pytest.raises(ConfigError):
        await one.set_policy("registration=everyone", now_ms=NOW_MS)
    assert await two.policy() == after
    events = await two.events_after(0)
    assert [(e.action, e.target) for e in events] == [
        ("policy.set", "registration=invite"),
        ("policy.set", "max_file_mb=25"),
    ]


async def test_disabling_a_user_is_recorded_once_and_an_unknown_user_is_an_error(
    database: Database,
) -> None:
    await make_user(await database.store(), "bob", "b1", "b2")
    one, two = await database.node(), await database.node()
    await one.set_disabled("bob", True, now_ms=NOW_MS)
    [bob] = await two.users()
    assert (bob.username, bob.disabled, bob.devices) == ("bob", True, 2)
    assert (await (await database.store()).get_account("bob")).disabled  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="no user named"):
        await two.set_disabled("nobody", True, now_ms=NOW_MS)
    events = await two.events_after(0)
    assert [(e.action, e.target) for e in events] == [("user.disabled", "bob")]


async def test_an_invite_gives_exactly_its_uses_across_nodes(database: Database) -> None:
    one, two = await database.node(), await database.node()
    code = await one.create_invite(uses=3, expires_at_ms=NOW_MS + 60_000, now_ms=NOW_MS)
    assert len(code) >= 24
    taken = await asyncio.gather(*(node.use_invite(code, now_ms=NOW_MS) for node in (one, two) * 5))
    assert sorted(taken) == [False] * 7 + [True] * 3
    await two.return_invite(code)  # a registration that then failed gives its use back
    assert await one.use_invite(code, now_ms=NOW_MS)
    assert not await one.use_invite(code, now_ms=NOW_MS)
    assert not await two.use_invite("not-a-code", now_ms=NOW_MS)
    short = await one.create_invite(uses=5, expires_at_ms=NOW_MS + 1000, now_ms=NOW_MS)
    assert not await two.use_invite(short, now_ms=NOW_MS + 1000)  # expired
    for uses, expires in ((0, NOW_MS + 1000), (10_001, NOW_MS + 1000), (1, NOW_MS)):
        with pytest.raises(ConfigError):
            await one.create_invite(uses=uses, expires_at_ms=expires, now_ms=NOW_MS)


async def test_the_database_keeps_only_hashes_of_invite_codes(database: Database) -> None:
    node = await database.node()
    code = await node.create_invite(uses=1, expires_at_ms=NOW_MS + 60_000, now_ms=NOW_MS)
    if database.kind == "sqlite":
        dump = "\n".join(sqlite3.connect(database.root / "bastion.db").iterdump())
    else:
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            rows = await conn.fetch(f'SELECT * FROM "{database.schema}".invites')
            events = await conn.fetch(f'SELECT * FROM "{database.schema}".admin_events')
        finally:
            await conn.close()
        dump = repr([dict(r) for r in rows]) + repr([dict(r) for r in events])
    assert code not in dump
    assert code.encode().hex() not in dump


async def test_each_node_keeps_its_own_position_and_catches_up_after_a_stop(
    database: Database, tmp_path: Path
) -> None:
    """Two nodes with their own data folders apply and audit every event exactly once each."""
    await make_user(await database.store(), "bob")
    operator = await database.node()
    folders = [tmp_path / "node-1", tmp_path / "node-2"]
    channels = []
    for folder in folders:
        folder.mkdir()
        channels.append(await AdminChannel.open(await database.node(), folder, poll_s=1))
    signed_out: list[str] = []

    def sign_out(user: str, reason: str) -> int:
        signed_out.append(user)
        return 1

    await operator.set_disabled("bob", True, now_ms=NOW_MS)
    for channel in channels:
        assert [e.action for e in await channel.poll_once(NullAudit(), sign_out)] == [
            "user.disabled"
        ]
        assert await channel.poll_once(NullAudit(), sign_out) == []
    assert signed_out == ["bob", "bob"]

    # Node 2 stops; two changes happen; it comes back and applies both, once.
    await operator.set_disabled("bob", False, now_ms=NOW_MS)
    await operator.set_policy("file_transfer=off", now_ms=NOW_MS)
    restarted = await AdminChannel.open(await database.node(), folders[1], poll_s=1)
    assert restarted.policy.file_transfer is False
    assert [e.action for e in await restarted.poll_once(NullAudit(), sign_out)] == [
        "user.enabled",
        "policy.set",
    ]
    assert await restarted.poll_once(NullAudit(), sign_out) == []
    for channel in (*channels, restarted):
        channel._executor.shutdown()


async def test_a_node_joining_later_starts_at_the_present(
    database: Database, tmp_path: Path
) -> None:
    operator = await database.node()
    await operator.set_policy("file_transfer=off", now_ms=NOW_MS)
    folder = tmp_path / "late"
    folder.mkdir()
    channel = await AdminChannel.open(await database.node(), folder, poll_s=1)
    pending = await channel.poll_once(NullAudit(), lambda user, reason: 0)
    channel._executor.shutdown()
    if database.kind == "sqlite":
        # One server, one file: events made before its first start are its own, and audited.
        assert [e.action for e in pending] == ["policy.set"]
    else:
        # A node added to a running cluster has nothing older to apply or audit.
        assert pending == []


async def test_bastion_admin_audits_into_a_stopped_nodes_log(
    database: Database, tmp_path: Path
) -> None:
    folder = tmp_path / "node"
    folder.mkdir()
    backend = await database.node()
    cursor = EventCursor(folder)
    await cursor.start(backend)
    await backend.set_policy("registration=closed", now_ms=NOW_MS)
    log = AuditLog.open(folder / AUDIT_DIR, ensure_audit_key(folder), now=time.time())
    try:
        written = await audit_pending_events(backend, cursor, log, now=time.time())
        assert [e.target for e in written] == ["registration=closed"]
        assert await audit_pending_events(backend, cursor, log, now=time.time()) == []
    finally:
        log.close(time.time())
    changed = [r for r in read_records(folder / AUDIT_DIR) if r.event == "policy.changed"]
    assert [dict(r.fields)["value"] for r in changed] == ["closed"]


async def test_event_ids_become_visible_in_order_under_concurrent_writers(tmp_path: Path) -> None:
    """A node must never read event N+1 before an event N that commits later."""
    await postgres_or_skip()
    schema = fresh_schema()
    reader = await PgAdmin.open(f"{POSTGRES_URL}?schema={schema}")
    writer = await asyncpg.connect(POSTGRES_URL, server_settings={"search_path": schema})
    other = await PgAdmin.open(f"{POSTGRES_URL}?schema={schema}")
    try:
        slow = writer.transaction()
        await slow.start()
        await _event(writer, NOW_MS, "invite.created", "uses=1")  # id 1, not committed yet
        fast = asyncio.create_task(other.set_policy("file_transfer=off", now_ms=NOW_MS))
        await asyncio.sleep(0.5)
        seen = await reader.events_after(0)  # a node polling meanwhile
        await slow.commit()
        await fast
        seen += await reader.events_after(seen[-1].id if seen else 0)
        assert [e.action for e in seen] == ["invite.created", "policy.set"]
    finally:
        await writer.close()
        await reader.close()
        await other.close()
        await drop_schema(schema)


def test_a_saved_position_counts_only_in_its_own_database(tmp_path: Path) -> None:
    cursor = EventCursor(tmp_path)
    assert cursor.load("sqlite") is None
    cursor.save("postgresql/one", 41)
    assert cursor.load("postgresql/one") == 41
    assert cursor.load("postgresql/two") is None  # moved to another database: start afresh
    (tmp_path / CURSOR_FILE).write_text(json.dumps({"source": "sqlite", "last": "x"}))
    with pytest.raises(StorageError, match="event position"):
        cursor.load("sqlite")
    (tmp_path / CURSOR_FILE).write_text("{not json")
    with pytest.raises(StorageError):
        cursor.load("sqlite")


def test_a_database_from_an_older_release_resumes_at_its_first_unhandled_event(
    tmp_path: Path,
) -> None:
    db = AdminDB(tmp_path)
    try:
        for n in range(5):
            db.set_policy(f"max_file_mb={n + 1}", now_ms=NOW_MS)
        # Older releases marked what the server had applied and audited.
        db._conn.execute("UPDATE admin_events SET handled = 1 WHERE id <= 3")
        assert db.first_cursor() == 3
        db._conn.execute("UPDATE admin_events SET handled = 1")
        assert db.first_cursor() == 5
    finally:
        db.close()


def test_invite_codes_can_be_typed_after_an_option() -> None:
    codes = {new_invite_code() for _ in range(3000)}
    assert len(codes) == 3000
    assert all(len(code) == 24 and not code.startswith("-") for code in codes)
