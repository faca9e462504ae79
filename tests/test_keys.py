"""The key directory: one-time key stock, automatic top-up, and claim limits."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from bastion.client import Client
from bastion.client.client import ONE_TIME_KEY_TARGET
from bastion.errors import ServerRefusedError
from bastion.protocol import frames
from tests.conftest import Profiles, ServerProcess
from tests.helpers import drain

pytestmark = pytest.mark.network


def stock(server: ServerProcess, username: str) -> int:
    with sqlite3.connect(server.data_dir / "bastion.db") as db:
        row = db.execute(
            "SELECT count(*) FROM one_time_keys WHERE username = ?", (username,)
        ).fetchone()
    return int(row[0])


async def claim(client: Client, user: str) -> frames.ClaimResult:
    conn = client.connection()
    req = conn.next_req()
    reply = await conn.request(frames.ClaimKeys(req=req, user=user), req)
    assert isinstance(reply, frames.ClaimResult)
    return reply


async def test_stranger_cannot_drain_one_time_keys(
    profiles: Profiles, server: ServerProcess
) -> None:
    await profiles.register("bob")
    mallory = await profiles.online("mallory", receive=False)
    assert stock(server, "bob") == ONE_TIME_KEY_TARGET

    for _ in range(5):  # the per-target burst; then one claim per three minutes
        reply = await claim(mallory, "bob")
        assert [k.fallback for k in reply.keys] == [False]
    with pytest.raises(ServerRefusedError) as limited:
        await claim(mallory, "bob")
    assert limited.value.code == "rate_limited"
    taken = 5
    assert stock(server, "bob") == ONE_TIME_KEY_TARGET - taken


async def test_stock_is_topped_up_when_it_runs_low(
    profiles: Profiles, server: ServerProcess
) -> None:
    bob = await profiles.online("bob")
    assert await drain(bob) == []
    claimers = [await profiles.online(f"user{i}", receive=False) for i in range(6)]
    for claimer in claimers:
        for _ in range(5):
            await claim(claimer, "bob")
    assert stock(server, "bob") == ONE_TIME_KEY_TARGET - 30

    # The server told bob once, when the stock fell below 15 (after the 26th claim); his
    # client refills to the target from that count while it receives: 10 + 26 = 36.
    receiving = asyncio.create_task(drain_forever(bob))
    try:
        for _ in range(100):
            if stock(server, "bob") > ONE_TIME_KEY_TARGET - 30:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a second (wrong) top-up would land by now
    finally:
        receiving.cancel()
    assert stock(server, "bob") == 36

    # Fresh keys work: a new contact starts a session and bob reads the message.
    alice = await profiles.online("alice", receive=False)
    await profiles.befriend("alice", "bob")
    await alice.send_text("bob", "after the top-up")


async def drain_forever(client: Client) -> None:
    async for _ in client.receive():
        pass


async def test_exhausted_stock_falls_back_to_the_signed_fallback_key(
    profiles: Profiles, server: ServerProcess
) -> None:
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    with sqlite3.connect(server.data_dir / "bastion.db") as db:
        db.execute("DELETE FROM one_time_keys WHERE username = 'bob'")
    alice = await profiles.online("alice", receive=False)
    reply = await claim(alice, "bob")
    assert [k.fallback for k in reply.keys] == [True]
    await alice.send_text("bob", "via the fallback key")
    bob = await profiles.online("bob")
    events = await drain(bob)
    assert [getattr(e, "record").text for e in events] == ["via the fallback key"]  # noqa: B009
