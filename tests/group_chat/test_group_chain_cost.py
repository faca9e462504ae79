"""A long chain costs the relay nothing extra per post: no denial of service through the chain.

The relay checks a posted change against the verified state it keeps at the
head (one signature), never by replaying the chain. Here a group's chain is made
20,000 changes long directly in the server's SQLite file (signed and checked
exactly as posts would be, and with the head state the relay keeps), then one
more change is posted through the real server while a probe connection asks for
the signed policy over and over: how long the probe's answer is held up is how
long the post kept the relay's event loop busy. Before heads were kept, each
post replayed the chain (about 1.6 s of event-loop time at 20,000 changes).
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import time

import pytest

from bastion.client import Client, groups
from bastion.crypto.signing import AccountIdentity
from bastion.groups import chain
from bastion.protocol import frames
from bastion.server.storage.group_heads import encode_head
from tests.conftest import Profiles, ServerProcess
from tests.group_chat.test_group_chat import fresh

pytestmark = pytest.mark.network

CHAIN_CHANGES = 20_000
POSTS = 5
PROBE_LIMIT = 5000
# Generous: the relay spends well under 5 ms of loop time per post (docs/benchmarks.md);
# replaying a 20,000-change chain took over a second.
WORST_PROBE_DELAY_S = 0.1


def grow_chain(
    server: ServerProcess,
    identity: AccountIdentity,
    author: str,
    start: chain.GroupState,
    count: int,
) -> chain.GroupState:
    """Append ``count`` signed renames to the stored chain and head; the new head state."""
    state = start
    rows = []
    for n in range(count):
        change = chain.make_change(
            identity, state, author, chain.Rename(name=f"r{n}"), now=1.9e9 + n
        )
        state = chain.apply_change(state, change)
        rows.append((state.group_id, change.seq, chain.encode_change(change)))
    db = sqlite3.connect(server.data_dir / "bastion.db", timeout=30)
    try:
        with db:
            db.executemany(
                "INSERT INTO group_changes (group_id, seq, change) VALUES (?, ?, ?)", rows
            )
            db.execute(
                "UPDATE group_heads SET seq = ?, state = ? WHERE group_id = ?",
                (state.seq, encode_head(state), state.group_id),
            )
    finally:
        db.close()
    return state


async def probe_while(client: Client, work: asyncio.Task[object]) -> list[float]:
    """Round trips of back-to-back policy requests until ``work`` is done."""
    conn = client.conn
    assert conn is not None
    trips: list[float] = []
    while not work.done() and len(trips) < PROBE_LIMIT:
        req = conn.next_req()
        started = time.perf_counter()
        await conn.request(frames.GetPolicy(req=req), req)
        trips.append(time.perf_counter() - started)
    return trips


async def test_one_more_change_on_a_20000_change_chain_costs_the_relay_little(
    profiles: Profiles, server: ServerProcess
) -> None:
    alice = await fresh(profiles, "alice")
    probe = await profiles.online("probe", receive=False)
    big = await groups.create(alice, "big", [])
    state = await asyncio.to_thread(
        grow_chain, server, alice.identity(), "alice", big, CHAIN_CHANGES
    )
    conn = alice.conn
    assert conn is not None

    idle = await probe_while(probe, asyncio.create_task(asyncio.sleep(0.3)))
    baseline = statistics.median(idle)
    delays, posts = [], []
    for n in range(POSTS):
        change = chain.make_change(
            alice.identity(), state, "alice", chain.Rename(name=f"post {n}"), now=2e9 + n
        )
        req = conn.next_req()
        started = time.perf_counter()
        post = asyncio.create_task(
            conn.request(frames.GroupPost(req=req, change=chain.encode_change(change)), req)
        )
        trips = await probe_while(probe, post)
        reply = await post
        posts.append(time.perf_counter() - started)
        assert isinstance(reply, frames.GroupPosted)
        assert reply.seq == CHAIN_CHANGES + 1 + n
        state = chain.apply_change(state, change)
        delays.append(max(trips) - baseline)
    print(
        f"chain of {CHAIN_CHANGES} changes: probe round trip idle {baseline * 1000:.2f} ms;"
        f" worst extra delay per post {', '.join(f'{d * 1000:.2f}' for d in delays)} ms;"
        f" post round trips {', '.join(f'{p * 1000:.2f}' for p in posts)} ms"
    )
    assert statistics.median(delays) < WORST_PROBE_DELAY_S
    # The stored chain ends with the posts, each following the one before.
    req = conn.next_req()
    tail = await conn.request(
        frames.GroupFetch(req=req, group_id=big.group_id, after_seq=CHAIN_CHANGES), req
    )
    assert isinstance(tail, frames.GroupChain)
    assert [chain.decode_change(raw).args for raw in tail.changes] == [
        chain.Rename(name=f"post {n}") for n in range(POSTS)
    ]
    assert state.name == f"post {POSTS - 1}"
