"""The Store contract, run against every implementation: SQLite and PostgreSQL.

PostgreSQL tests use a fresh schema per test (dropped afterwards), so parallel
and repeated runs never meet. They are skipped, with the reason, when no
PostgreSQL answers at ``BASTION_TEST_POSTGRES`` (default: 127.0.0.1:5432/test).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from bastion.errors import StorageError
from bastion.server.core.contact_rules import ACCEPTED, ContactRow, Pair, Transition
from bastion.server.storage.contacts import ContactStore, PgContactStore, SQLiteContactStore
from bastion.server.storage.interfaces import (
    AccountRecord,
    Copy,
    DeviceMismatchError,
    DeviceRecord,
    DeviceRefusedError,
    KeyRecord,
    NotContactsError,
    QueueFullError,
    Store,
    StoredMessage,
    UnknownRecipientError,
    UsernameTakenError,
)
from bastion.server.storage.postgres.migrations import Migration, bundled_migrations, migrate
from bastion.server.storage.postgres.relay import PgStore, split_dsn
from bastion.server.storage.sqlite.relay import SQLiteStore

POSTGRES_URL = os.environ.get("BASTION_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")

Opener = Callable[[], Awaitable[Store]]


async def postgres_or_skip() -> None:
    """Skip the test unless PostgreSQL answers at POSTGRES_URL."""
    try:
        conn = await asyncpg.connect(POSTGRES_URL, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_URL}: {type(exc).__name__}")
    await conn.close()


async def drop_schema(schema: str) -> None:
    """Remove a test schema and everything in it."""
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def fresh_schema() -> str:
    """A schema name no other run uses."""
    return f"bastion_test_{secrets.token_hex(6)}"


@pytest.fixture(params=["sqlite", "postgres"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens stores on one database; every store opened is closed at the end."""
    opened: list[Store] = []
    schema = fresh_schema()
    if request.param == "postgres":
        await postgres_or_skip()

    async def open_store() -> Store:
        store: Store
        if request.param == "sqlite":
            store = SQLiteStore(tmp_path / "bastion.db")
        else:
            store = await PgStore.connect(f"{POSTGRES_URL}?schema={schema}")
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.close()
    if request.param == "postgres":
        await drop_schema(schema)


@pytest.fixture
async def store(opener: Opener) -> Store:
    return await opener()


def key(n: int) -> KeyRecord:
    return KeyRecord(b"key-%03d" % n + bytes(25), b"sig-%03d" % n + bytes(57))


def device(user: str, device_id: str) -> DeviceRecord:
    return DeviceRecord(user, device_id, b"e" * 32, b"c" * 32, 1000, b"cert" * 16)


async def make_user(
    store: Store, user: str, *devices: str, keys: int = 3, fallback: int = 900
) -> None:
    first, *more = devices or ("d1",)
    await store.create_account(
        AccountRecord(user, b"i" * 32, 1000),
        device(user, first),
        [key(n) for n in range(keys)],
        key(fallback),
    )
    for extra in more:
        await store.add_device(
            device(user, extra), [key(n) for n in range(keys)], key(fallback), max_devices=10
        )


def copies_for(body: bytes, *targets: tuple[str, str]) -> list[Copy]:
    return [Copy(user, dev, 0, body) for user, dev in targets]


async def send(store: Store, body: bytes, *, msg_id: bytes | None = None, ts: int = 5000) -> int:
    """alice/a1 -> bob/b1; returns the envelope's sequence number."""
    stored = await store.submit_message(
        sender="alice",
        sender_device="a1",
        client_msg_id=msg_id or secrets.token_bytes(16),
        recipient="bob",
        server_ts=ts,
        copies=copies_for(body, ("bob", "b1")),
    )
    return stored.envelopes[0].seq


# --- accounts and devices --------------------------------------------------------------------


async def test_accounts_and_devices_round_trip(store: Store) -> None:
    await make_user(store, "alice", "a2", "a1")
    account = await store.get_account("alice")
    assert account == AccountRecord("alice", b"i" * 32, 1000, False)
    assert await store.get_account("nobody") is None
    assert await store.get_device("alice", "a1") == device("alice", "a1")
    assert await store.get_device("alice", "zz") is None
    assert [d.device_id for d in await store.list_devices("alice")] == ["a1", "a2"]
    assert await store.list_devices("nobody") == []


async def test_a_taken_username_is_refused_and_nothing_changes(store: Store) -> None:
    await make_user(store, "alice", "a1")
    with pytest.raises(UsernameTakenError):
        await store.create_account(
            AccountRecord("alice", b"X" * 32, 2000), device("alice", "a9"), [], key(1)
        )
    assert (await store.get_account("alice")) == AccountRecord("alice", b"i" * 32, 1000, False)
    assert [d.device_id for d in await store.list_devices("alice")] == ["a1"]


async def test_adding_devices_is_bounded_and_revoked_ids_never_return(store: Store) -> None:
    await make_user(store, "alice", "a1")
    with pytest.raises(DeviceRefusedError):
        await store.add_device(device("alice", "a1"), [], key(1), max_devices=10)
    await store.add_device(device("alice", "a2"), [], key(1), max_devices=2)
    with pytest.raises(DeviceRefusedError):
        await store.add_device(device("alice", "a3"), [], key(1), max_devices=2)
    with pytest.raises(DeviceRefusedError):
        await store.add_device(device("ghost", "g1"), [], key(1), max_devices=2)
    await make_user(store, "bob", "b1")
    await store.submit_message(
        sender="bob",
        sender_device="b1",
        client_msg_id=b"m",
        recipient="alice",
        server_ts=1,
        copies=copies_for(b"x", ("alice", "a1"), ("alice", "a2")),
    )
    assert await store.revoke_device("alice", "a2") is True
    assert await store.revoke_device("alice", "a2") is False
    assert await store.fetch_queue("alice", "a2", 0, 10) == []
    assert await store.count_one_time_keys("alice", "a2") == 0
    assert len(await store.fetch_queue("alice", "a1", 0, 10)) == 1
    with pytest.raises(DeviceRefusedError):
        await store.add_device(device("alice", "a2"), [], key(1), max_devices=10)


# --- key stock -------------------------------------------------------------------------------


async def test_key_stock_counts_ignores_duplicates_and_claims_fallback_last(store: Store) -> None:
    await make_user(store, "bob", "b1", "b2", keys=1)
    assert await store.add_one_time_keys("bob", "b1", [key(0), key(5)], None) == 2
    assert await store.count_one_time_keys("bob", "b1") == 2
    first = await store.claim_keys("bob")
    assert [(k.device_id, k.fallback) for k in first] == [("b1", False), ("b2", False)]
    second = await store.claim_keys("bob")
    assert [(k.device_id, k.fallback) for k in second] == [("b1", False), ("b2", True)]
    assert second[1].key == key(900).key
    assert {first[0].key, second[0].key} == {key(0).key, key(5).key}
    await store.add_one_time_keys("bob", "b2", [], key(901))
    third = await store.claim_keys("bob")
    assert [(k.fallback, k.key) for k in third] == [(True, key(900).key), (True, key(901).key)]
    assert await store.claim_keys("nobody") == []


async def test_concurrent_claims_never_hand_out_a_key_twice(opener: Opener) -> None:
    stores = [await opener() for _ in range(2)]
    await make_user(stores[0], "bob", "b1", keys=30)
    results = await asyncio.gather(*(stores[i % 2].claim_keys("bob") for i in range(50)))
    one_time = [r[0].key for r in results if not r[0].fallback]
    assert len(one_time) == 30
    assert len(set(one_time)) == 30
    assert all(r[0].key == key(900).key for r in results if r[0].fallback)
    assert await stores[0].count_one_time_keys("bob", "b1") == 0


# --- messages --------------------------------------------------------------------------------


async def test_a_message_is_queued_once_per_device_and_retries_are_idempotent(
    store: Store,
) -> None:
    await make_user(store, "alice", "a1", "a2")
    await make_user(store, "bob", "b1", "b2")
    targets = [("bob", "b1"), ("bob", "b2"), ("alice", "a2")]
    stored = await store.submit_message(
        sender="alice",
        sender_device="a1",
        client_msg_id=b"id-1",
        recipient="bob",
        server_ts=7000,
        copies=copies_for(b"hello", *targets),
    )
    assert stored.server_ts == 7000
    assert [(e.user, e.device_id) for e in stored.envelopes] == targets
    assert len({e.seq for e in stored.envelopes}) == 3
    again = await store.submit_message(
        sender="alice",
        sender_device="a1",
        client_msg_id=b"id-1",
        recipient="bob",
        server_ts=9000,
        copies=copies_for(b"hello", *targets),
    )
    assert again.server_ts == 7000
    assert again.envelopes == []
    queued = await store.fetch_queue("bob", "b1", 0, 10)
    assert [(q.sender, q.sender_device, q.server_ts, q.body) for q in queued] == [
        ("alice", "a1", 7000, b"hello")
    ]


async def test_wrong_device_sets_and_unknown_recipients_store_nothing(store: Store) -> None:
    await make_user(store, "alice", "a1", "a2")
    await make_user(store, "bob", "b1", "b2")
    cases = [
        [("bob", "b1"), ("alice", "a2")],  # missing bob/b2
        [("bob", "b1"), ("bob", "b2")],  # missing the sender's other device
        [("bob", "b1"), ("bob", "b2"), ("alice", "a2"), ("bob", "b9")],  # extra
        [("bob", "b1"), ("bob", "b1"), ("bob", "b2"), ("alice", "a2")],  # duplicate
        [("bob", "b1"), ("bob", "b2"), ("alice", "a2"), ("alice", "a1")],  # to itself
    ]
    for targets in cases:
        with pytest.raises(DeviceMismatchError) as caught:
            await store.submit_message(
                sender="alice",
                sender_device="a1",
                client_msg_id=b"same-id",
                recipient="bob",
                server_ts=1,
                copies=copies_for(b"x", *targets),
            )
        assert caught.value.missing or caught.value.extra or len(set(targets)) < len(targets)
    with pytest.raises(DeviceMismatchError) as caught:
        await store.submit_message(
            sender="alice",
            sender_device="a1",
            client_msg_id=b"same-id",
            recipient="bob",
            server_ts=1,
            copies=copies_for(b"x", ("bob", "b1")),
        )
    assert caught.value.missing == ["alice/a2", "bob/b2"]
    with pytest.raises(UnknownRecipientError):
        await store.submit_message(
            sender="alice",
            sender_device="a1",
            client_msg_id=b"other",
            recipient="carol",
            server_ts=1,
            copies=copies_for(b"x", ("carol", "c1"), ("alice", "a2")),
        )
    for user, dev in [("bob", "b1"), ("bob", "b2"), ("alice", "a2")]:
        assert await store.fetch_queue(user, dev, 0, 10) == []
    # The refused id was not remembered: a corrected retry is stored.
    stored = await store.submit_message(
        sender="alice",
        sender_device="a1",
        client_msg_id=b"same-id",
        recipient="bob",
        server_ts=2,
        copies=copies_for(b"x", ("bob", "b1"), ("bob", "b2"), ("alice", "a2")),
    )
    assert len(stored.envelopes) == 3


async def test_fetch_pages_in_order_and_ack_deletes_only_that_devices_envelopes(
    store: Store,
) -> None:
    await make_user(store, "alice", "a1")
    await make_user(store, "bob", "b1")
    await make_user(store, "carol", "c1")
    seqs = [await send(store, b"m%d" % i) for i in range(5)]
    assert seqs == sorted(seqs)
    page = await store.fetch_queue("bob", "b1", 0, 3)
    assert [q.body for q in page] == [b"m0", b"m1", b"m2"]
    rest = await store.fetch_queue("bob", "b1", page[-1].seq, 10)
    assert [q.body for q in rest] == [b"m3", b"m4"]
    assert await store.ack("carol", "c1", seqs) == 0
    assert await store.ack("bob", "b1", [seqs[0], seqs[2], 10**12]) == 2
    assert [q.body for q in await store.fetch_queue("bob", "b1", 0, 10)] == [b"m1", b"m3", b"m4"]
    assert await store.count_queued("bob") == 3
    assert await store.count_queued("carol") == 0
    assert await store.count_queued("nobody") == 0


async def set_pair(store: Store, a: str, b: str, state: str | None) -> None:
    """Write both rows of a pair through the contacts feature's store (None removes them)."""
    contacts: ContactStore
    if isinstance(store, SQLiteStore):
        contacts = SQLiteContactStore(store)
    else:
        assert isinstance(store, PgStore)
        contacts = PgContactStore(store)
    row = None if state is None else ContactRow(state=state, updated_at=1)

    def rule(_: Pair) -> Transition:
        return Transition(mine=row, theirs=row, result=state or "none")

    await contacts.update(a, b, rule)


async def gated(
    store: Store,
    msg_id: bytes,
    *targets: tuple[str, str],
    queue_max: int | None = None,
    contacts_only: bool = True,
) -> int:
    """alice/a1 -> bob with both checks asked for; returns how many envelopes were queued."""
    stored = await store.submit_message(
        sender="alice",
        sender_device="a1",
        client_msg_id=msg_id,
        recipient="bob",
        server_ts=7000,
        copies=copies_for(b"x", *(targets or (("bob", "b1"),))),
        queue_max=queue_max,
        contacts_only=contacts_only,
    )
    return len(stored.envelopes)


async def test_contacts_only_follows_every_change_of_the_pair_and_refusals_store_nothing(
    store: Store,
) -> None:
    await make_user(store, "alice", "a1")
    await make_user(store, "bob", "b1", "b2")
    with pytest.raises(NotContactsError):
        await gated(store, b"first")
    # A stranger learns nothing of the recipient's devices: the contact check comes first.
    with pytest.raises(NotContactsError):
        await gated(store, b"first", ("bob", "b9"))
    await set_pair(store, "alice", "bob", "pending_out")
    with pytest.raises(NotContactsError):
        await gated(store, b"first")
    assert await store.count_queued("bob") == 0
    await set_pair(store, "alice", "bob", ACCEPTED)
    assert await gated(store, b"first", ("bob", "b1"), ("bob", "b2")) == 2  # id not remembered
    assert await gated(store, b"second", ("bob", "b1"), ("bob", "b2")) == 2
    await set_pair(store, "bob", "alice", None)  # removed, from either side
    with pytest.raises(NotContactsError):
        await gated(store, b"third", ("bob", "b1"), ("bob", "b2"))
    assert await gated(store, b"second", ("bob", "b1"), ("bob", "b2")) == 0  # a retry, not new
    await set_pair(store, "bob", "alice", ACCEPTED)
    assert await gated(store, b"third", ("bob", "b1"), ("bob", "b2")) == 2
    await set_pair(store, "alice", "bob", "blocked")
    with pytest.raises(NotContactsError):
        await gated(store, b"fourth", ("bob", "b1"), ("bob", "b2"))
    assert await store.count_queued("bob") == 6


async def test_a_full_queue_refuses_new_messages_until_one_is_acknowledged(store: Store) -> None:
    await make_user(store, "alice", "a1")
    await make_user(store, "bob", "b1", "b2")
    both = (("bob", "b1"), ("bob", "b2"))
    assert await gated(store, b"m1", *both, queue_max=3, contacts_only=False) == 2
    assert (
        await gated(store, b"m2", *both, queue_max=3, contacts_only=False) == 2
    )  # 2 < 3 waited before it
    with pytest.raises(QueueFullError):
        await gated(store, b"m3", *both, queue_max=3, contacts_only=False)
    assert await store.count_queued("bob") == 4
    assert (
        await gated(store, b"m2", *both, queue_max=3, contacts_only=False) == 0
    )  # a retry still answers
    first = await store.fetch_queue("bob", "b1", 0, 10)
    second = await store.fetch_queue("bob", "b2", 0, 10)
    assert await store.ack("bob", "b1", [first[0].seq]) == 1
    with pytest.raises(QueueFullError):  # 3 still wait, over both devices
        await gated(store, b"m3", *both, queue_max=3, contacts_only=False)
    assert await store.ack("bob", "b2", [second[0].seq]) == 1
    assert await gated(store, b"m3", *both, queue_max=3, contacts_only=False) == 2
    assert (
        await gated(store, b"m4", *both, queue_max=None, contacts_only=False) == 2
    )  # no limit asked for


async def test_concurrent_senders_on_two_stores_never_overshoot_the_queue_limit(
    opener: Opener,
) -> None:
    """Two nodes (two stores on one database), eight senders at once: exactly the limit waits."""
    nodes = [await opener(), await opener()]
    await make_user(nodes[0], "bob", "b1")
    senders = [f"s{n}" for n in range(8)]
    for name in senders:
        await make_user(nodes[0], name, "d1")

    async def one(n: int, i: int) -> bool:
        try:
            await nodes[n % 2].submit_message(
                sender=senders[n],
                sender_device="d1",
                client_msg_id=b"%02d-%03d" % (n, i),
                recipient="bob",
                server_ts=7000 + i,
                copies=copies_for(b"x", ("bob", "b1")),
                queue_max=50,
            )
        except QueueFullError:
            return False
        return True

    stored = 0
    for i in range(20):  # rounds, so that the two stores' writes interleave
        stored += sum(await asyncio.gather(*(one(n, i) for n in range(8))))
    assert stored == 50
    assert await nodes[1].count_queued("bob") == 50
    assert len(await nodes[0].fetch_queue("bob", "b1", 0, 1000)) == 50


async def test_calls_from_one_sender_device_take_effect_in_call_order(store: Store) -> None:
    await make_user(store, "alice", "a1")
    await make_user(store, "bob", "b1")
    await asyncio.gather(*(send(store, b"%04d" % i) for i in range(300)))
    queued = await store.fetch_queue("bob", "b1", 0, 1000)
    assert [q.body for q in queued] == [b"%04d" % i for i in range(300)]


async def test_a_retry_sent_while_the_original_is_pending_is_stored_once_in_order(
    store: Store,
) -> None:
    """The PostgreSQL store batches a node's sends: a retry in the same batch waits its turn."""
    await make_user(store, "alice", "a1")
    await make_user(store, "bob", "b1")

    def submit(msg_id: bytes, body: bytes, ts: int) -> asyncio.Future[StoredMessage]:
        return store.submit_message(
            sender="alice",
            sender_device="a1",
            client_msg_id=msg_id,
            recipient="bob",
            server_ts=ts,
            copies=copies_for(body, ("bob", "b1")),
        )

    first, retry, after = await asyncio.gather(
        submit(b"id-1", b"one", 7000), submit(b"id-1", b"one", 7001), submit(b"id-2", b"two", 7002)
    )
    assert (first.server_ts, len(first.envelopes)) == (7000, 1)
    assert (retry.server_ts, retry.envelopes) == (7000, [])
    assert after.envelopes[0].seq > first.envelopes[0].seq
    queued = await store.fetch_queue("bob", "b1", 0, 10)
    assert [q.body for q in queued] == [b"one", b"two"]


async def test_acks_of_several_devices_at_once_each_delete_their_own(store: Store) -> None:
    await make_user(store, "alice", "a1")
    await make_user(store, "bob", "b1", "b2")
    for n in range(3):
        await store.submit_message(
            sender="alice",
            sender_device="a1",
            client_msg_id=b"m%d" % n,
            recipient="bob",
            server_ts=5000,
            copies=copies_for(b"x", ("bob", "b1"), ("bob", "b2")),
        )
    b1 = [q.seq for q in await store.fetch_queue("bob", "b1", 0, 10)]
    b2 = [q.seq for q in await store.fetch_queue("bob", "b2", 0, 10)]
    counts = await asyncio.gather(
        store.ack("bob", "b1", b1[:2]),
        store.ack("bob", "b2", b1[2:] + b2[:1]),  # b1's seq is not b2's to delete
        store.ack("bob", "b1", b1[:1]),  # already deleted (or deleted now): counted once
    )
    assert sum(counts) == 3
    assert counts[1] == 1
    assert [q.seq for q in await store.fetch_queue("bob", "b1", 0, 10)] == b1[2:]
    assert [q.seq for q in await store.fetch_queue("bob", "b2", 0, 10)] == b2[1:]


async def test_a_cursor_reader_never_skips_a_message_from_concurrent_senders(
    opener: Opener,
) -> None:
    """Sequence order must be commit order per device, or cursor-based delivery loses some."""
    writers = [await opener() for _ in range(2)]
    reader = await opener()
    await make_user(writers[0], "bob", "b1")
    senders = [f"s{i}" for i in range(8)]
    for name in senders:
        await make_user(writers[0], name, f"{name}-d")
    done = asyncio.Event()

    async def sender(index: int, name: str) -> None:
        for n in range(40):
            await writers[index % 2].submit_message(
                sender=name,
                sender_device=f"{name}-d",
                client_msg_id=b"%d" % n,
                recipient="bob",
                server_ts=n,
                copies=copies_for(f"{name}:{n}".encode(), ("bob", "b1")),
            )

    seen: list[bytes] = []

    async def read() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            rows = await reader.fetch_queue("bob", "b1", cursor, 1000)
            seen.extend(r.body for r in rows)
            cursor = rows[-1].seq if rows else cursor
            if finished and not rows:
                return
            await asyncio.sleep(0)

    reading = asyncio.create_task(read())
    await asyncio.gather(*(sender(i, name) for i, name in enumerate(senders)))
    done.set()
    await reading
    assert len(seen) == len(set(seen)) == 8 * 40


async def test_a_new_store_on_the_same_database_sees_every_acknowledged_write(
    opener: Opener,
) -> None:
    first = await opener()
    await make_user(first, "alice", "a1")
    await make_user(first, "bob", "b1", keys=4)
    seqs = [await send(first, b"m%d" % i, msg_id=b"id%d" % i) for i in range(3)]
    await first.ack("bob", "b1", [seqs[0]])
    await first.claim_keys("bob")
    await first.close()
    second = await opener()
    assert (await second.get_account("alice")) is not None
    assert await second.count_one_time_keys("bob", "b1") == 3
    assert [q.body for q in await second.fetch_queue("bob", "b1", 0, 10)] == [b"m1", b"m2"]
    retry = await second.submit_message(
        sender="alice",
        sender_device="a1",
        client_msg_id=b"id2",
        recipient="bob",
        server_ts=99_999,
        copies=copies_for(b"m2", ("bob", "b1")),
    )
    assert retry.envelopes == []
    assert retry.server_ts == 5000
    assert await send(second, b"later") > seqs[-1]


async def test_a_closed_store_refuses_work(store: Store) -> None:
    await store.close()
    with pytest.raises(StorageError):
        await store.get_account("alice")


# --- PostgreSQL only: URLs, migrations, an unreachable database ------------------------------


def test_database_urls_name_a_schema_or_use_the_default() -> None:
    assert split_dsn("postgresql://u@h:5/db") == ("postgresql://u@h:5/db", "bastion")
    assert split_dsn("postgresql://u@h/db?schema=node_a&sslmode=require") == (
        "postgresql://u@h/db?sslmode=require",
        "node_a",
    )
    for bad in [
        "sqlite:///x.db",
        "postgresql://h/db?schema=Robert');DROP",
        "postgresql://h/d?schema=",
    ]:
        with pytest.raises(StorageError):
            split_dsn(bad)


async def test_migrations_apply_once_and_refuse_a_newer_database() -> None:
    await postgres_or_skip()
    schema = fresh_schema()
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        assert await migrate(conn, schema) == [m.version for m in bundled_migrations()]
        assert await migrate(conn, schema) == []
        future = [*bundled_migrations(), Migration(9999, "9999_future.sql", "SELECT 1")]
        assert await migrate(conn, schema, future) == [9999]
        with pytest.raises(StorageError, match="newer"):
            await migrate(conn, schema)
    finally:
        await conn.close()
        await drop_schema(schema)


async def test_concurrent_node_starts_migrate_exactly_once() -> None:
    await postgres_or_skip()
    schema = fresh_schema()
    try:
        stores = await asyncio.gather(
            *(PgStore.connect(f"{POSTGRES_URL}?schema={schema}") for _ in range(3))
        )
        for s in stores:
            await s.close()
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            rows = await conn.fetch(f'SELECT version FROM "{schema}".schema_migrations')
        finally:
            await conn.close()
        assert [r[0] for r in rows] == [m.version for m in bundled_migrations()]
    finally:
        await drop_schema(schema)


async def test_an_unreachable_database_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="cannot open the database"):
        await PgStore.connect("postgresql://postgres@127.0.0.1:1/test")
