"""The Bus contract, run against LocalBus and RedisBus, and RedisBus across nodes.

A "cluster" here is two bus instances: for LocalBus both are the same object
(one node); for RedisBus they are two nodes on a real Redis, with a channel
prefix of their own so that parallel runs never meet. The outage test starts
its own ``redis-server`` on a free port and never touches the machine's Redis.
RedisBus tests are skipped, with the reason, when Redis is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio as redis
from redis.exceptions import RedisError

from bastion.ratelimit import BackoffRules
from bastion.server.cluster.local import Bus, BusEvent, KeysLow, Kick, LocalBus, RateHandover
from bastion.server.cluster.redis.bus import RedisBus
from bastion.server.core.link_slots import LinkError
from bastion.server.storage.interfaces import QueuedEnvelope
from tests.conftest import free_port

REDIS_URL = os.environ.get("BASTION_TEST_REDIS", "redis://127.0.0.1:6379/0")


async def redis_or_skip(url: str = REDIS_URL) -> None:
    """Skip the test unless Redis answers at ``url``."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        pytest.skip(f"Redis is not reachable at {url}: {type(exc).__name__}")
    finally:
        await client.aclose()


class RedisProcess:
    """A private ``redis-server`` on a free port, which a test may stop and restart."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start on the same port as before and wait until it answers."""
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            probe = subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, check=False
            )
            if probe.stdout.strip() == b"PONG":
                return
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        """Stop it hard (every client connection drops)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.kill()


@dataclass
class Inbox:
    """A subscriber that records what it is handed; rate handovers are counted apart."""

    events: list[BusEvent] = field(default_factory=list)
    handovers: int = 0

    def __call__(self, event: BusEvent) -> None:
        if isinstance(event, RateHandover):
            self.handovers += 1
        else:
            self.events.append(event)

    def kicked(self) -> bool:
        return any(isinstance(e, Kick) for e in self.events)

    def envelopes(self) -> list[QueuedEnvelope]:
        return [e for e in self.events if isinstance(e, QueuedEnvelope)]


async def until(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the bus")
        await asyncio.sleep(0.01)


@dataclass
class Cluster:
    """Two nodes and a way to wait until what was handed to them reached everyone."""

    a: Bus
    b: Bus

    async def settle(self) -> None:
        for bus in (self.a, self.b):
            if isinstance(bus, RedisBus):
                await bus.flush()


def envelope(seq: int, body: bytes = b"ciphertext") -> QueuedEnvelope:
    return QueuedEnvelope(seq, "bob", "b1", "alice", "a1", 1234, 1, body)


@contextlib.asynccontextmanager
async def two_nodes(kind: str, **options: Any) -> AsyncIterator[Cluster]:
    """One LocalBus seen from both sides, or two RedisBus nodes with a prefix of their own."""
    if kind == "local":
        bus = LocalBus(**options)
        yield Cluster(bus, bus)
        return
    await redis_or_skip()
    prefix = f"bastion-test-{secrets.token_hex(6)}"
    nodes = [RedisBus(REDIS_URL, prefix=prefix, **options) for _ in range(2)]
    try:
        for node in nodes:
            assert await node.start()
        yield Cluster(nodes[0], nodes[1])
    finally:
        for node in nodes:
            await node.close()


@pytest.fixture(params=["local", "redis"])
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    async with two_nodes(request.param) as nodes:
        yield nodes


async def test_an_event_reaches_the_devices_subscriber_wherever_it_is(cluster: Cluster) -> None:
    inbox = Inbox()
    cluster.b.subscribe("bob", "b1", inbox)
    await cluster.settle()
    sent: list[BusEvent] = [envelope(7, bytes(range(256))), KeysLow(3), envelope(9)]
    for event in sent:
        cluster.a.publish("bob", "b1", event)
    await until(lambda: len(inbox.events) == 3)
    assert inbox.events == sent
    cluster.a.publish("bob", "b2", envelope(10))  # nobody holds b2: dropped, no error
    cluster.a.publish("carol", "b1", envelope(11))
    await cluster.settle()
    await asyncio.sleep(0.05)
    assert len(inbox.events) == 3


async def test_events_from_one_node_arrive_in_publish_order(cluster: Cluster) -> None:
    inbox = Inbox()
    cluster.b.subscribe("bob", "b1", inbox)
    await cluster.settle()
    for seq in range(1, 1001):
        cluster.a.publish("bob", "b1", envelope(seq))
    await until(lambda: len(inbox.events) == 1000)
    assert [e.seq for e in inbox.envelopes()] == list(range(1, 1001))


async def test_a_new_subscriber_anywhere_kicks_the_old_one(cluster: Cluster) -> None:
    old, new = Inbox(), Inbox()
    cluster.a.subscribe("bob", "b1", old)
    await cluster.settle()
    cluster.b.subscribe("bob", "b1", new)
    await cluster.settle()
    await until(old.kicked)
    cluster.a.publish("bob", "b1", envelope(1))
    cluster.b.publish("bob", "b1", envelope(2))
    await until(lambda: len(new.envelopes()) == 2)
    assert not new.kicked()
    assert old.envelopes() == []


async def test_a_device_moving_back_and_forth_keeps_only_its_latest_connection(
    cluster: Cluster,
) -> None:
    first, second, third = Inbox(), Inbox(), Inbox()
    cluster.a.subscribe("bob", "b1", first)
    await cluster.settle()
    cluster.b.subscribe("bob", "b1", second)
    await cluster.settle()
    await until(first.kicked)
    cluster.a.subscribe("bob", "b1", third)
    await cluster.settle()
    await until(second.kicked)
    await asyncio.sleep(0.1)
    await cluster.settle()
    assert not third.kicked()
    cluster.b.publish("bob", "b1", envelope(5))
    await until(lambda: len(third.envelopes()) == 1)


async def test_unsubscribe_stops_delivery_but_not_for_a_newer_subscriber(
    cluster: Cluster,
) -> None:
    old, new = Inbox(), Inbox()
    cluster.b.subscribe("bob", "b1", old)
    cluster.b.subscribe("bob", "b1", new)
    cluster.b.unsubscribe("bob", "b1", old)  # replaced already: no effect
    await cluster.settle()
    cluster.a.publish("bob", "b1", envelope(1))
    await until(lambda: len(new.envelopes()) == 1)
    cluster.b.unsubscribe("bob", "b1", new)
    await cluster.settle()
    cluster.a.publish("bob", "b1", envelope(2))
    await cluster.settle()
    await asyncio.sleep(0.05)
    assert [e.seq for e in new.envelopes()] == [1]
    assert old.envelopes() == []


async def test_publish_never_waits_even_when_redis_is_unreachable() -> None:
    bus = RedisBus(f"redis://127.0.0.1:{free_port()}/0", retry_min_s=0.05)
    assert await bus.start(wait_s=0.2) is False
    local = Inbox()
    bus.subscribe("bob", "b1", local)
    started = time.perf_counter()
    for seq in range(10_000):
        bus.publish("carol", "c1", envelope(seq))
    bus.publish("bob", "b1", envelope(1))
    assert time.perf_counter() - started < 1.0
    assert [e.seq for e in local.envelopes()] == [1]
    assert bus.dropped == 10_000
    await bus.close()


async def test_after_a_redis_restart_nodes_resubscribe_and_are_told_to_resync(
    private_redis: RedisProcess,
) -> None:
    prefix = "bastion-test"
    a = RedisBus(private_redis.url, prefix=prefix, retry_min_s=0.05, retry_max_s=0.2)
    b = RedisBus(private_redis.url, prefix=prefix, retry_min_s=0.05, retry_max_s=0.2)
    resyncs = {"a": 0, "b": 0}
    a.add_reconnect_listener(lambda: resyncs.__setitem__("a", resyncs["a"] + 1))
    b.add_reconnect_listener(lambda: resyncs.__setitem__("b", resyncs["b"] + 1))
    try:
        assert await a.start()
        assert await b.start()
        on_b, on_a = Inbox(), Inbox()
        b.subscribe("bob", "b1", on_b)
        a.subscribe("alice", "a1", on_a)
        await b.flush()
        private_redis.kill()
        await until(lambda: not a.connected and not b.connected)
        a.publish("alice", "a1", envelope(1))  # local devices keep being served
        assert [e.seq for e in on_a.envelopes()] == [1]
        a.publish("bob", "b1", envelope(2))  # lost with Redis; the store still has it
        private_redis.start()
        await until(lambda: a.connected and b.connected and resyncs["a"] > 0 and resyncs["b"] > 0)
        await a.flush()
        await b.flush()
        a.publish("bob", "b1", envelope(3))
        await until(lambda: len(on_b.envelopes()) == 1)
        assert [e.seq for e in on_b.envelopes()] == [3]
        # The device claims were renewed: a new connection on A still kicks the one on B.
        a.subscribe("bob", "b1", Inbox())
        await until(on_b.kicked)
    finally:
        await a.close()
        await b.close()


async def test_garbage_on_a_device_channel_is_ignored() -> None:
    await redis_or_skip()
    prefix = f"bastion-test-{secrets.token_hex(6)}"
    a, b = RedisBus(REDIS_URL, prefix=prefix), RedisBus(REDIS_URL, prefix=prefix)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        await a.start()
        await b.start()
        inbox = Inbox()
        b.subscribe("bob", "b1", inbox)
        await b.flush()
        channels = await client.pubsub_channels(f"{prefix}:*")
        assert channels
        for channel in channels:
            await client.publish(channel, b"\xc1not msgpack")
        a.publish("bob", "b1", envelope(4))
        await until(lambda: len(inbox.envelopes()) == 1)
        assert not inbox.kicked()
    finally:
        await client.aclose()
        await a.close()
        await b.close()


async def test_a_user_is_online_while_any_node_holds_them(cluster: Cluster) -> None:
    assert await cluster.a.presence_up("alice")  # first anywhere
    assert await cluster.b.online(["alice", "bob"]) == {"alice"}
    if cluster.a is not cluster.b:
        assert not await cluster.b.presence_up("alice")  # already online on node a
        assert not await cluster.a.presence_down("alice")  # still on node b
        assert await cluster.a.online(["alice"]) == {"alice"}
        assert await cluster.b.presence_down("alice")  # the last node let go
    else:
        assert await cluster.a.presence_down("alice")
    assert await cluster.a.online(["alice"]) == set()
    assert await cluster.b.online([]) == set()


T = TypeVar("T")


async def within(step: str, awaitable: Awaitable[T], seconds: float = 20.0) -> T:
    """Await a bus call, failing with the step's name if it takes longer than ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            return await awaitable
    except TimeoutError:
        raise AssertionError(f"the bus did not answer within {seconds} s: {step}") from None


async def test_the_users_of_a_dead_node_go_offline_once_within_the_ttl() -> None:
    await redis_or_skip()
    prefix = f"bastion-test-{secrets.token_hex(6)}"
    # Renewals come every third of the ttl: 1.5 s leaves room for a loaded machine.
    dying, *sweepers = [RedisBus(REDIS_URL, prefix=prefix, presence_ttl_s=1.5) for _ in range(3)]
    lost: list[str] = []
    for node in (dying, *sweepers):
        node.on_presence_lost(lost.extend)
        assert await within("start", node.start())
    try:
        assert await within("presence_up", dying.presence_up("carol"))
        assert await within("presence_up", dying.presence_up("dave"))
        # dave is also on a live node
        assert not await within("presence_up", sweepers[0].presence_up("dave"))
        await asyncio.sleep(1.7)  # renewals keep them online past one ttl
        online = await within("online", sweepers[1].online(["carol", "dave"]))
        assert online == {"carol", "dave"}
        await within("close", dying.close())  # stops renewing and says nothing, as kill -9 would
        await until(lambda: lost == ["carol"], within_s=8.0)
        assert await within("online", sweepers[1].online(["carol", "dave"])) == {"dave"}
        await asyncio.sleep(1.5)
        assert lost == ["carol"]  # told by one sweeping node, once; dave stays online
    finally:
        for node in sweepers:
            await within("close", node.close())


async def test_a_limit_is_one_bucket_for_every_node(cluster: Cluster) -> None:
    rate, burst = 0.001, 3.0  # no refill within the test
    takes = [
        await cluster.a.take("claims", "alice", rate, burst),
        await cluster.b.take("claims", "alice", rate, burst),
        await cluster.a.take("claims", "alice", rate, burst),
        await cluster.b.take("claims", "alice", rate, burst),  # the burst is spent everywhere
        await cluster.a.take("claims", "alice", rate, burst),
    ]
    assert takes == [True, True, True, False, False]
    assert await cluster.b.take("claims", "bob", rate, burst)  # another key
    assert await cluster.b.take("other", "alice", rate, burst)  # another limit


async def test_a_shared_bucket_refills_at_its_rate() -> None:
    await redis_or_skip()
    prefix = f"bastion-test-{secrets.token_hex(6)}"
    a, b = RedisBus(REDIS_URL, prefix=prefix), RedisBus(REDIS_URL, prefix=prefix)
    try:
        assert await a.take("sends", "alice", 5.0, 1.0)
        assert not await b.take("sends", "alice", 5.0, 1.0)
        await asyncio.sleep(0.25)  # 5 per second: one token back
        assert await b.take("sends", "alice", 5.0, 1.0)
        assert not await a.take("sends", "alice", 5.0, 1.0)
    finally:
        await a.close()
        await b.close()


async def test_limits_still_hold_on_a_node_that_cannot_reach_redis() -> None:
    bus = RedisBus(f"redis://127.0.0.1:{free_port()}/0", retry_min_s=0.05)
    try:
        takes = [await bus.take("claims", "alice", 0.001, 2.0) for _ in range(3)]
        assert takes == [True, True, False]  # counted on this node alone, never waved through
    finally:
        await bus.close()


# --- link slots ---------------------------------------------------------------------------------

SLOT = bytes(range(32))
ALICE_1 = ("alice", "a1")


@dataclass
class LinkEnd:
    """One connection's end of a link: the blobs handed to it."""

    blobs: list[bytes] = field(default_factory=list)

    def __call__(self, blob: bytes) -> None:
        self.blobs.append(blob)


async def test_a_link_pairs_an_owner_and_a_joiner_on_any_nodes(cluster: Cluster) -> None:
    owner, joiner = LinkEnd(), LinkEnd()
    await cluster.a.link_open(SLOT, ALICE_1, owner)
    await cluster.b.link_join(SLOT, b"sealed request", joiner)
    await until(lambda: owner.blobs == [b"sealed request"])
    await cluster.a.link_answer(SLOT, ALICE_1, b"sealed grant")
    await until(lambda: joiner.blobs == [b"sealed grant"])
    # The answer closed the slot: it can neither be answered nor joined again.
    with pytest.raises(LinkError, match="no device is waiting"):
        await cluster.a.link_answer(SLOT, ALICE_1, b"again")
    with pytest.raises(LinkError, match="unknown, expired or already used"):
        await cluster.b.link_join(SLOT, b"late", LinkEnd())
    await cluster.settle()
    assert owner.blobs == [b"sealed request"]
    assert joiner.blobs == [b"sealed grant"]


async def test_pieces_reach_the_joiner_in_order_before_the_answer_closes_the_slot(
    cluster: Cluster,
) -> None:
    joiner = LinkEnd()
    await cluster.a.link_open(SLOT, ALICE_1, LinkEnd())
    with pytest.raises(LinkError, match="no device is waiting"):
        await cluster.a.link_more(SLOT, ALICE_1, b"too early")
    await cluster.b.link_join(SLOT, b"request", joiner)
    with pytest.raises(LinkError, match="no device is waiting"):
        await cluster.a.link_more(SLOT, ("mallory", "a1"), b"forged piece")
    pieces = [b"piece %d" % i for i in range(5)]
    for piece in pieces:
        await cluster.a.link_more(SLOT, ALICE_1, piece)
    await cluster.a.link_answer(SLOT, ALICE_1, b"grant")
    await until(lambda: joiner.blobs == [*pieces, b"grant"])
    with pytest.raises(LinkError, match="no device is waiting"):
        await cluster.a.link_more(SLOT, ALICE_1, b"after the answer")
    await cluster.settle()
    assert joiner.blobs == [*pieces, b"grant"]


async def test_a_slot_takes_one_joiner_even_when_two_race_on_two_nodes(cluster: Cluster) -> None:
    await cluster.a.link_open(SLOT, ALICE_1, LinkEnd())
    first, second = LinkEnd(), LinkEnd()
    results = await asyncio.gather(
        cluster.a.link_join(SLOT, b"one", first),
        cluster.b.link_join(SLOT, b"two", second),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["LinkError", "NoneType"]
    winner = first if results[0] is None else second
    await cluster.b.link_answer(SLOT, ALICE_1, b"grant")  # the owner may answer through any node
    await until(lambda: winner.blobs == [b"grant"])
    await cluster.settle()
    assert (first.blobs + second.blobs) == [b"grant"]


async def test_only_the_owning_device_may_answer_and_only_after_a_join(cluster: Cluster) -> None:
    await cluster.a.link_open(SLOT, ALICE_1, LinkEnd())
    with pytest.raises(LinkError, match="no device is waiting"):
        await cluster.a.link_answer(SLOT, ALICE_1, b"too early")
    joiner = LinkEnd()
    await cluster.b.link_join(SLOT, b"request", joiner)
    for other in (("alice", "a2"), ("mallory", "a1")):
        with pytest.raises(LinkError, match="no device is waiting"):
            await cluster.b.link_answer(SLOT, other, b"forged grant")
    await cluster.a.link_answer(SLOT, ALICE_1, b"grant")
    await until(lambda: joiner.blobs == [b"grant"])


async def test_a_device_holds_one_slot_and_a_taken_slot_cannot_be_opened_again(
    cluster: Cluster,
) -> None:
    other_slot = bytes(32)
    await cluster.a.link_open(SLOT, ALICE_1, LinkEnd())
    await cluster.b.link_open(other_slot, ALICE_1, LinkEnd())  # replaces the first
    with pytest.raises(LinkError, match="unknown"):
        await cluster.a.link_join(SLOT, b"request", LinkEnd())
    with pytest.raises(LinkError, match="cannot open a link now"):
        await cluster.a.link_open(other_slot, ("bob", "b1"), LinkEnd())
    await cluster.a.link_join(other_slot, b"request", LinkEnd())


@pytest.mark.parametrize("kind", ["local", "redis"])
async def test_slots_are_bounded_in_number_and_time(kind: str) -> None:
    async with two_nodes(kind, link_ttl_s=0.5, max_link_slots=2) as nodes:
        await nodes.a.link_open(bytes([1]) * 32, ("ann", "d1"), LinkEnd())
        await nodes.b.link_open(bytes([2]) * 32, ("ben", "d1"), LinkEnd())
        with pytest.raises(LinkError, match="cannot open a link now"):
            await nodes.a.link_open(bytes([3]) * 32, ("cat", "d1"), LinkEnd())
        await asyncio.sleep(0.6)  # both expired: the cluster has room again, and they are gone
        with pytest.raises(LinkError, match="unknown, expired"):
            await nodes.b.link_join(bytes([1]) * 32, b"request", LinkEnd())
        await nodes.a.link_open(bytes([3]) * 32, ("cat", "d1"), LinkEnd())
        await nodes.b.link_open(bytes([4]) * 32, ("dan", "d1"), LinkEnd())


async def test_linking_fails_at_once_on_a_node_that_cannot_reach_redis() -> None:
    bus = RedisBus(f"redis://127.0.0.1:{free_port()}/0", retry_min_s=0.05)
    try:
        started = time.perf_counter()
        with pytest.raises(LinkError, match="unavailable") as caught:
            await bus.link_open(SLOT, ALICE_1, LinkEnd())
        assert caught.value.code == "link_failed"
        with pytest.raises(LinkError, match="unavailable"):
            await bus.link_join(SLOT, b"request", LinkEnd())
        with pytest.raises(LinkError, match="unavailable"):
            await bus.link_more(SLOT, ALICE_1, b"piece")
        with pytest.raises(LinkError, match="unavailable"):
            await bus.link_answer(SLOT, ALICE_1, b"grant")
        assert time.perf_counter() - started < 10.0
    finally:
        await bus.close()


# --- failure back-off ---------------------------------------------------------------------------

BACKOFF = BackoffRules(base_delay=10.0, max_delay=40.0, free_failures=2, quiet_period=1000.0)


async def test_a_failure_back_off_is_one_count_for_every_node(cluster: Cluster) -> None:
    async def fail(bus: Bus, key: str = "1.2.3.4/alice") -> None:
        await bus.record_failure("signin", key, BACKOFF)

    await fail(cluster.a)
    await fail(cluster.b)  # the free failures are spent across the nodes
    assert await cluster.a.failure_wait("signin", "1.2.3.4/alice") == 0.0
    await fail(cluster.a)
    assert 9.0 < await cluster.b.failure_wait("signin", "1.2.3.4/alice") <= 10.0
    await fail(cluster.b)
    assert 19.0 < await cluster.a.failure_wait("signin", "1.2.3.4/alice") <= 20.0
    for _ in range(3):
        await fail(cluster.a)
    assert 39.0 < await cluster.b.failure_wait("signin", "1.2.3.4/alice") <= 40.0  # the most
    assert await cluster.b.failure_wait("signin", "1.2.3.4/bob") == 0.0  # another key
    assert await cluster.b.failure_wait("other", "1.2.3.4/alice") == 0.0  # another limit
    await cluster.b.clear_failures("signin", "1.2.3.4/alice")
    assert await cluster.a.failure_wait("signin", "1.2.3.4/alice") == 0.0


async def test_a_failure_back_off_steps_down_once_per_quiet_period(cluster: Cluster) -> None:
    rules = BackoffRules(base_delay=0.1, max_delay=100.0, free_failures=0, quiet_period=0.5)
    for bus in (cluster.a, cluster.b, cluster.a):
        await bus.record_failure("signin", "alice", rules)  # level 3: blocked 0.4 s
    assert 0.3 < await cluster.b.failure_wait("signin", "alice") <= 0.4
    await asyncio.sleep(1.1)  # over, and two quiet periods: level 1
    assert await cluster.b.failure_wait("signin", "alice") == 0.0
    await cluster.b.record_failure("signin", "alice", rules)
    # Level 2 (0.2 s), where no decay would give level 4 (0.8 s).
    assert 0.05 < await cluster.a.failure_wait("signin", "alice") < 0.5


async def test_a_back_off_leaves_redis_once_it_no_longer_matters() -> None:
    await redis_or_skip()
    prefix = f"bastion-test-{secrets.token_hex(6)}"
    bus = RedisBus(REDIS_URL, prefix=prefix)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        rules = BackoffRules(base_delay=1.0, max_delay=8.0, free_failures=0, quiet_period=5.0)
        for _ in range(3):
            await bus.record_failure("signin", "alice", rules)
        [key] = await client.keys(f"{prefix}:backoff:*")
        # Level 3 decays to nothing 15 s after the last failure (plus a second of slack).
        assert 14_000 < await client.pttl(key) <= 16_000
    finally:
        await client.aclose()
        await bus.close()


async def test_a_back_off_still_holds_while_redis_is_away(private_redis: RedisProcess) -> None:
    rules = BackoffRules(base_delay=30.0, max_delay=60.0, free_failures=1, quiet_period=1000.0)
    a = RedisBus(private_redis.url, prefix="bastion-test", retry_min_s=0.05)
    b = RedisBus(private_redis.url, prefix="bastion-test", retry_min_s=0.05)
    try:
        await a.record_failure("signin", "alice", rules)
        await a.record_failure("signin", "alice", rules)
        assert await b.failure_wait("signin", "alice") > 29.0
        private_redis.kill()
        # Node a counted its own failures too: it keeps refusing, never waves them through.
        assert await a.failure_wait("signin", "alice") > 29.0
        # Node b saw none; failures made during the outage count on it alone.
        assert await b.failure_wait("signin", "bob") == 0.0
        await b.record_failure("signin", "bob", rules)
        await b.record_failure("signin", "bob", rules)
        assert await b.failure_wait("signin", "bob") > 29.0
    finally:
        await a.close()
        await b.close()


# --- a device's message rate, handed from node to node ------------------------------------------


async def test_one_node_keeps_a_devices_rate_to_itself() -> None:
    bus = LocalBus()
    await bus.hand_over_rate("alice", "a1", 0.0, 1.0, 10.0)
    assert await bus.take_rate("alice", "a1", 1.0, 10.0) is None  # nothing left the node


async def test_a_bucket_left_by_one_node_is_taken_once_by_the_next() -> None:
    async with two_nodes("redis") as nodes:
        rate, burst = 0.001, 10.0  # no refill to speak of within the test
        await nodes.a.hand_over_rate("alice", "a1", 2.0, rate, burst)
        taken = await nodes.b.take_rate("alice", "a1", rate, burst)
        assert taken is not None
        assert 2.0 <= taken < 2.01
        assert await nodes.a.take_rate("alice", "a1", rate, burst) is None  # taken once
        assert await nodes.b.take_rate("alice", "a1", rate, burst) is None
        # Two nodes racing for one bucket: exactly one gets it.
        await nodes.a.hand_over_rate("alice", "a1", 1.0, rate, burst)
        race = await asyncio.gather(
            *(node.take_rate("alice", "a1", rate, burst) for node in (nodes.a, nodes.b))
        )
        assert sorted(t is None for t in race) == [False, True]
        # Another device of the same user left nothing.
        assert await nodes.b.take_rate("alice", "a2", rate, burst) is None


async def test_a_handed_over_bucket_refills_for_the_time_it_waited() -> None:
    async with two_nodes("redis") as nodes:
        await nodes.a.hand_over_rate("alice", "a1", 0.0, 10.0, 5.0)
        await asyncio.sleep(0.3)  # three tokens at 10 per second
        taken = await nodes.b.take_rate("alice", "a1", 10.0, 5.0)
        assert taken is not None
        assert 2.9 <= taken < 4.0


async def test_a_bucket_left_twice_before_it_is_taken_keeps_the_lower_count() -> None:
    async with two_nodes("redis") as nodes:
        await nodes.a.hand_over_rate("alice", "a1", 1.0, 0.001, 10.0)
        await nodes.b.hand_over_rate("alice", "a1", 6.0, 0.001, 10.0)
        taken = await nodes.a.take_rate("alice", "a1", 0.001, 10.0)
        assert taken is not None
        assert 1.0 <= taken < 1.01


async def test_a_bucket_stays_in_redis_only_until_it_would_be_full() -> None:
    await redis_or_skip()
    prefix = f"bastion-test-{secrets.token_hex(6)}"
    bus = RedisBus(REDIS_URL, prefix=prefix)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        await bus.hand_over_rate("alice", "a1", 5.0, 2.0, 5.0)  # full: nothing to keep
        assert await client.keys(f"{prefix}:rate:*") == []
        await bus.hand_over_rate("alice", "a1", 1.0, 2.0, 5.0)  # four tokens short at 2/s
        [key] = await client.keys(f"{prefix}:rate:*")
        assert 1_500 < await client.pttl(key) <= 2_000
        await bus.hand_over_rate("bob", "b1", 4.98, 1.0, 5.0)  # full again in 20 ms
        await asyncio.sleep(0.1)
        assert await bus.take_rate("bob", "b1", 1.0, 5.0) is None
    finally:
        await client.aclose()
        await bus.close()


async def test_the_node_holding_the_device_is_told_when_a_bucket_is_left() -> None:
    async with two_nodes("redis") as nodes:
        inbox = Inbox()
        nodes.b.subscribe("alice", "a1", inbox)
        await nodes.settle()
        await until(lambda: inbox.handovers == 1)  # its channel is heard: look once
        await nodes.a.hand_over_rate("alice", "a1", 3.0, 0.001, 10.0)
        await until(lambda: inbox.handovers == 2)
        assert await nodes.b.take_rate("alice", "a1", 0.001, 10.0) is not None  # as a relay does
        await nodes.a.hand_over_rate("alice", "a1", 10.0, 0.001, 10.0)  # full: nothing left
        await nodes.a.hand_over_rate("bob", "b1", 3.0, 0.001, 10.0)  # another device
        await nodes.settle()
        await asyncio.sleep(0.1)
        assert inbox.handovers == 2
        assert inbox.events == []


async def test_without_redis_a_bucket_is_neither_left_nor_taken_and_nothing_waits(
    private_redis: RedisProcess,
) -> None:
    a = RedisBus(private_redis.url, prefix="bastion-test", retry_min_s=0.05)
    b = RedisBus(private_redis.url, prefix="bastion-test", retry_min_s=0.05)
    try:
        await a.hand_over_rate("alice", "a1", 1.0, 0.001, 10.0)
        private_redis.kill()
        started = time.monotonic()
        await a.hand_over_rate("bob", "b1", 1.0, 0.001, 10.0)  # lost, and says so in the log
        assert await b.take_rate("alice", "a1", 0.001, 10.0) is None  # keep what b counted
        assert time.monotonic() - started < 5.0
    finally:
        await a.close()
        await b.close()
