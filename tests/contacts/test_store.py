"""The contact store on SQLite and PostgreSQL: one pair changes atomically, lists and flags."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bastion.server.core.contact_rules import (
    ACCEPTED,
    PENDING_IN,
    PENDING_OUT,
    Pair,
    Transition,
    apply_action,
)
from bastion.server.storage.contacts import ContactStore, PgContactStore, SQLiteContactStore
from bastion.server.storage.postgres.relay import PgStore
from bastion.server.storage.sqlite.relay import SQLiteStore
from tests.server.test_store_contract import (
    POSTGRES_URL,
    drop_schema,
    fresh_schema,
    postgres_or_skip,
)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ContactStore]:
    if request.param == "sqlite":
        sqlite = SQLiteStore(tmp_path / "bastion.db")
        contacts = SQLiteContactStore(sqlite)
        await contacts.open()
        yield contacts
        await sqlite.close()
        return
    await postgres_or_skip()
    schema = fresh_schema()
    pg = await PgStore.connect(f"{POSTGRES_URL}?schema={schema}")
    try:
        yield PgContactStore(pg)
    finally:
        await pg.close()
        await drop_schema(schema)


def rule(action: str) -> Callable[[Pair], Transition]:
    def apply(pair: Pair) -> Transition:
        return apply_action(action, pair, peer="p", now=7, pending_max=2, contacts_max=5)

    return apply


async def test_a_request_and_its_acceptance_write_both_rows(store: ContactStore) -> None:
    sent = await store.update("alice", "bob", rule("request"), counts=True)
    assert sent.result == PENDING_OUT
    assert [(p, r.state) for p, r in await store.contacts("alice")] == [("bob", PENDING_OUT)]
    assert [(p, r.state) for p, r in await store.contacts("bob")] == [("alice", PENDING_IN)]
    await store.update("bob", "alice", rule("accept"))
    assert await store.accepted("alice") == ["bob"]
    assert await store.accepted("bob") == ["alice"]
    pair = await store.pair("alice", "bob")
    assert (pair.mine and pair.mine.state, pair.theirs and pair.theirs.state) == (
        ACCEPTED,
        ACCEPTED,
    )


async def test_counts_feed_the_limits_and_refusals_write_nothing(store: ContactStore) -> None:
    await store.update("u1", "target", rule("request"), counts=True)
    await store.update("u2", "target", rule("request"), counts=True)
    third = await store.update("u3", "target", rule("request"), counts=True)
    assert third.error is not None
    assert third.error.code == "rate_limited"
    assert await store.contacts("u3") == []
    assert [p for p, _ in await store.contacts("target")] == ["u1", "u2"]


async def test_remove_deletes_both_rows_and_invisibility_is_kept(store: ContactStore) -> None:
    await store.update("alice", "bob", rule("request"), counts=True)
    await store.update("bob", "alice", rule("accept"))
    await store.update("alice", "bob", rule("remove"))
    assert await store.contacts("alice") == []
    assert await store.contacts("bob") == []
    assert await store.invisible("alice") is False
    await store.set_invisible("alice", True)
    assert await store.invisible("alice") is True
    await store.set_invisible("alice", False)
    assert await store.invisible("alice") is False
