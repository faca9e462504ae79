"""The relay's group store on SQLite and PostgreSQL: chain, member list, fan-out, retries.

PostgreSQL runs in a fresh schema per test and is skipped when it does not answer
(see tests/server/test_store_contract.py).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bastion.protocol.frames import GROUP_KIND
from bastion.server.storage.groups import (
    DECLINED,
    PENDING,
    WITHHELD,
    Appended,
    GroupConflictError,
    GroupStore,
    Invitation,
    SQLiteGroupStore,
)
from bastion.server.storage.interfaces import Store
from bastion.server.storage.postgres.groups import PgGroupStore
from bastion.server.storage.postgres.relay import PgStore
from bastion.server.storage.sqlite.relay import SQLiteStore
from tests.server.test_store_contract import (
    POSTGRES_URL,
    drop_schema,
    fresh_schema,
    make_user,
    postgres_or_skip,
)

GROUP = b"g" * 32
OTHER_GROUP = b"h" * 32


@dataclass
class Stores:
    """The relay's main store (accounts, devices, queues) and the group store beside it."""

    main: Store
    groups: GroupStore


@pytest.fixture(params=["sqlite", "postgres"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    if request.param == "sqlite":
        sqlite = SQLiteStore(tmp_path / "bastion.db")
        groups = SQLiteGroupStore(sqlite)
        await groups.open()
        try:
            yield Stores(sqlite, groups)
        finally:
            await sqlite.close()
        return
    await postgres_or_skip()
    schema = fresh_schema()
    pg = await PgStore.connect(f"{POSTGRES_URL}?schema={schema}")
    try:
        pg_groups = PgGroupStore(pg)
        await pg_groups.open()
        yield Stores(pg, pg_groups)
    finally:
        await pg.close()
        await drop_schema(schema)


async def append(
    stores: Stores,
    seq: int,
    members: list[str],
    *,
    notify: list[str] | None = None,
    group: bytes = GROUP,
    change: bytes | None = None,
) -> list[tuple[str, str]]:
    """Append change ``seq`` by alice/a1; returns (user, device) of every queued notice."""
    envelopes = await stores.groups.append_change(
        group_id=group,
        seq=seq,
        change=change or b"change-%d" % seq,
        appended=Appended(
            head=b"head-%d" % seq,
            members=members,
            named=members,
            invites=[],
            inviter="alice",
            invite_item=b"",
        ),
        notify=notify if notify is not None else members,
        sender="alice",
        sender_device="a1",
        server_ts=1000 + seq,
        item=b"notice-%d" % seq,
    )
    return sorted((e.user, e.device_id) for e in envelopes)


async def test_chain_is_kept_in_order_and_paged(stores: Stores) -> None:
    await make_user(stores.main, "alice", "a1")
    for seq in range(5):
        await append(stores, seq, ["alice"])
    assert await stores.groups.changes(GROUP, -1, 100) == [b"change-%d" % s for s in range(5)]
    assert await stores.groups.changes(GROUP, 1, 2) == [b"change-2", b"change-3"]
    assert await stores.groups.changes(GROUP, 4, 10) == []
    assert await stores.groups.changes(OTHER_GROUP, -1, 10) == []


async def test_a_second_change_at_the_same_place_is_refused_and_changes_nothing(
    stores: Stores,
) -> None:
    # Two admins racing: the second post for seq 1 must not overwrite the first.
    await make_user(stores.main, "alice", "a1")
    await make_user(stores.main, "bob", "b1")
    await append(stores, 0, ["alice", "bob"])
    await append(stores, 1, ["alice"], notify=["alice", "bob"])
    with pytest.raises(GroupConflictError):
        await append(stores, 1, ["alice", "bob"], change=b"other change")
    assert await stores.groups.changes(GROUP, -1, 10) == [b"change-0", b"change-1"]
    assert await stores.groups.active_members(GROUP) == ["alice"]
    assert await stores.main.fetch_queue("bob", "b1", -1, 10) != []


async def test_member_list_follows_the_chain(stores: Stores) -> None:
    for user in ("alice", "bob", "carol", "dave"):
        await make_user(stores.main, user, user[0] + "1")
    await append(stores, 0, ["alice", "bob", "carol"])
    await append(stores, 1, ["alice", "bob"], group=OTHER_GROUP)
    assert await stores.groups.active_members(GROUP) == ["alice", "bob", "carol"]
    await append(stores, 1, ["alice", "bob", "dave"], notify=["alice", "bob", "carol", "dave"])
    assert await stores.groups.active_members(GROUP) == ["alice", "bob", "dave"]
    assert await stores.groups.membership(GROUP, "dave") is True
    assert await stores.groups.membership(GROUP, "carol") is False  # former: may fetch
    assert await stores.groups.membership(GROUP, "nobody") is None
    await append(stores, 2, ["alice", "bob", "carol"], notify=["alice", "bob", "carol", "dave"])
    assert await stores.groups.membership(GROUP, "carol") is True  # added again
    assert await stores.groups.membership(GROUP, "dave") is False


async def test_notices_reach_every_device_of_the_notified_but_not_the_posting_one(
    stores: Stores,
) -> None:
    await make_user(stores.main, "alice", "a1", "a2")
    await make_user(stores.main, "bob", "b1", "b2")
    await make_user(stores.main, "carol", "c1")
    queued = await append(stores, 0, ["alice", "bob"], notify=["alice", "bob"])
    assert queued == [("alice", "a2"), ("bob", "b1"), ("bob", "b2")]
    [notice] = await stores.main.fetch_queue("bob", "b2", -1, 10)
    assert (notice.kind, notice.body, notice.sender) == (GROUP_KIND, b"notice-0", "alice")
    assert await stores.main.fetch_queue("carol", "c1", -1, 10) == []
    assert await stores.main.fetch_queue("alice", "a1", -1, 10) == []


async def test_fan_out_queues_one_copy_per_member_device_once_per_message_id(
    stores: Stores,
) -> None:
    await make_user(stores.main, "alice", "a1", "a2")
    await make_user(stores.main, "bob", "b1", "b2")
    await make_user(stores.main, "carol", "c1")
    msg_id = secrets.token_bytes(16)

    async def post(ts: int) -> tuple[int, list[tuple[str, str]]]:
        at, envelopes = await stores.groups.fan_out(
            members=["alice", "bob"],
            sender="alice",
            sender_device="a1",
            client_msg_id=msg_id,
            server_ts=ts,
            item=b"megolm",
        )
        return at, sorted((e.user, e.device_id) for e in envelopes)

    assert await post(5000) == (5000, [("alice", "a2"), ("bob", "b1"), ("bob", "b2")])
    # A retry of the same message (lost reply) is stored once and keeps its first time.
    assert await post(6000) == (5000, [])
    assert [e.body for e in await stores.main.fetch_queue("bob", "b1", -1, 10)] == [b"megolm"]
    assert await stores.main.fetch_queue("carol", "c1", -1, 10) == []
    # Queued group copies are acknowledged like any other envelope.
    [copy] = await stores.main.fetch_queue("bob", "b2", -1, 10)
    assert await stores.main.ack("bob", "b2", [copy.seq]) == 1
    assert await stores.main.fetch_queue("bob", "b2", -1, 10) == []
    assert len(await stores.main.fetch_queue("bob", "b1", -1, 10)) == 1


async def test_invitations_are_kept_answered_and_dropped_with_the_member(stores: Stores) -> None:
    for user in ("alice", "carol"):
        await make_user(stores.main, user, user[0] + "1")
    await make_user(stores.main, "bob", "b1", "b2")
    queued = await stores.groups.append_change(
        group_id=GROUP,
        seq=0,
        change=b"change-0",
        appended=Appended(
            head=b"head-0",
            members=["alice"],
            named=["alice", "bob", "carol"],
            invites=[("bob", PENDING), ("carol", WITHHELD)],
            inviter="alice",
            invite_item=b"invite",
        ),
        notify=["alice"],
        sender="alice",
        sender_device="a1",
        server_ts=1000,
        item=b"notice-0",
    )
    # The invitee's devices get the invitation; a withheld one gets nothing at all.
    assert sorted((e.user, e.device_id, e.body) for e in queued) == [
        ("bob", "b1", b"invite"),
        ("bob", "b2", b"invite"),
    ]
    assert await stores.main.fetch_queue("carol", "c1", -1, 10) == []
    assert await stores.groups.not_joined(GROUP) == {"bob": PENDING, "carol": WITHHELD}
    assert await stores.groups.active_members(GROUP) == ["alice"]
    assert await stores.groups.membership(GROUP, "bob") is None  # no chain for him yet
    assert await stores.groups.pending_invites("bob", 10) == [Invitation(GROUP, "alice", 1000)]
    assert await stores.groups.pending_invites("carol", 10) == []
    assert (
        await stores.groups.respond(GROUP, "carol", "c1", accept=True, server_ts=1001, item=b"x")
        is None
    )

    joined = await stores.groups.respond(
        GROUP, "bob", "b1", accept=True, server_ts=1002, item=b"joined"
    )
    assert joined is not None
    assert [(e.user, e.device_id, e.body) for e in joined] == [("bob", "b2", b"joined")]
    assert await stores.groups.membership(GROUP, "bob") is True
    assert await stores.groups.active_members(GROUP) == ["alice", "bob"]
    assert await stores.groups.not_joined(GROUP) == {"carol": WITHHELD}
    assert (
        await stores.groups.respond(GROUP, "bob", "b1", accept=False, server_ts=1003, item=b"x")
        is None
    )  # answered already

    # Carol is removed without having joined: a former member from now on (a new add
    # invites her again), and her withheld invitation is gone.
    await stores.groups.append_change(
        group_id=GROUP,
        seq=1,
        change=b"change-1",
        appended=Appended(
            head=b"head-1",
            members=["alice", "bob"],
            named=["alice", "bob"],
            invites=[],
            inviter="alice",
            invite_item=b"",
        ),
        notify=["alice", "bob"],
        sender="alice",
        sender_device="a1",
        server_ts=1004,
        item=b"notice-1",
    )
    assert await stores.groups.not_joined(GROUP) == {}
    assert await stores.groups.membership(GROUP, "carol") is False
    assert await stores.groups.head(GROUP) == b"head-1"
    await stores.groups.set_head(GROUP, 0, b"rebuilt")  # never replaces a stored head
    assert await stores.groups.head(GROUP) == b"head-1"


async def test_a_declined_invitation_stays_declined(stores: Stores) -> None:
    for user in ("alice", "bob"):
        await make_user(stores.main, user, user[0] + "1")
    await stores.groups.append_change(
        group_id=GROUP,
        seq=0,
        change=b"change-0",
        appended=Appended(
            head=b"head-0",
            members=["alice"],
            named=["alice", "bob"],
            invites=[("bob", PENDING)],
            inviter="alice",
            invite_item=b"invite",
        ),
        notify=["alice"],
        sender="alice",
        sender_device="a1",
        server_ts=1000,
        item=b"notice-0",
    )
    declined = await stores.groups.respond(
        GROUP, "bob", "b1", accept=False, server_ts=1001, item=b"x"
    )
    assert declined == []
    assert await stores.groups.pending_invites("bob", 10) == []
    assert await stores.groups.not_joined(GROUP) == {"bob": DECLINED}
    assert (
        await stores.groups.respond(GROUP, "bob", "b1", accept=True, server_ts=1002, item=b"x")
        is None
    )
    assert await stores.groups.active_members(GROUP) == ["alice"]
