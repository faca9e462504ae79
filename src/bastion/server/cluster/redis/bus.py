"""The clustered bus: Redis pub/sub between server nodes.

Routing uses **one channel per connected device**. A node subscribes to the
channel of each device connected to it; publishing to a device is one
``PUBLISH``, and Redis itself knows which nodes listen. This was chosen over a
device-to-node table because a node that dies (kill -9, power loss) leaves
nothing stale behind: its subscriptions vanish with its Redis connection, with
no expiry to tune and no cleanup to run.

*One connection per device, cluster-wide.* When a device subscribes, the node
takes a claim number from a Redis counter for that device and publishes the
claim on the device's channel; a node holding the device under a lower claim
number kicks that connection. Claims are ordered by the counter, not by
arrival, so a device that hops from node A to B and back to A is never kicked
by B's stale claim.

*Failure.* ``publish`` never blocks: events for devices on this node are handed
over directly; the rest go to an outbox that one task sends in batches (one script call each). When
Redis is unreachable, local delivery goes on, remote events are dropped, and
the node retries with backoff. On reconnect it re-subscribes and re-claims its
devices, and tells every node (itself included) to call its reconnect listeners:
the relays re-read the queues of their connections from the database, which is
where every dropped event is still waiting.

*Presence.* Each user with a connection anywhere has a sorted set naming the
nodes that hold one, each with an expiry ``presence_ttl_s`` ahead that the node
renews every third of that; an index holds every such user with the latest expiry.
Lua scripts make "first node up" and "last node down" atomic across nodes.
Every node sweeps the index: a user whose nodes all expired (they died) is
removed by exactly one sweeping node, which tells its listeners, so contacts
are told "offline" within about ``presence_ttl_s`` of a node's death.

*Limits.* Token buckets and failure back-offs are hashes updated by Lua scripts
on Redis's clock, expiring once they no longer matter. While Redis is
unreachable a node counts on its own (:class:`~bastion.server.cluster.local.LocalLimits`);
it records every back-off failure there as well, so its own stay counted.

*A device's message rate* is checked in the memory of the node holding its
connection, and handed over through Redis when a signed-in connection closes
(:class:`~bastion.server.cluster.redis.rates.RedisDeviceRates`): the node it signs in on
next takes it before answering, and a node holding the device when a bucket is
left is told on the device's channel and takes it at once. While Redis is
unreachable a node keeps the bucket it counted itself (full if it has none).

*Link slots* are kept in Redis by :class:`~bastion.server.cluster.redis.links.RedisLinkSlots`;
each node listens on a channel of its own for the link blobs of its connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec
import redis.asyncio as redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from bastion.protocol import frames
from bastion.ratelimit import BackoffRules
from bastion.server.cluster.local import (
    BusEvent,
    KeysLow,
    Kick,
    LocalLimits,
    PresenceLost,
    Push,
    RateHandover,
    Subscriber,
)
from bastion.server.cluster.redis.links import RedisLinkSlots
from bastion.server.cluster.redis.rates import RedisDeviceRates
from bastion.server.core.link_slots import LINK_TTL_S, MAX_LINK_SLOTS, LinkDeliver, Owner
from bastion.server.storage.interfaces import QueuedEnvelope

log = logging.getLogger("bastion.server.cluster.local")

_CLOSE_WAIT_S = 2.0  # the longest a close waits on Redis or on its own tasks

DeviceKey = tuple[str, str]

# KEYS: the user's node set, the index. ARGV: node, now, expiry, user. 1 if no node was up.
_PRESENCE_UP = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local before = redis.call('ZCARD', KEYS[1])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[2], 'GT', ARGV[3], ARGV[4])
if before == 0 then return 1 end
return 0
"""
# KEYS: the user's node set, the index. ARGV: node, now, user. 1 if no node is left.
_PRESENCE_DOWN = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[3])
  return 1
end
return 0
"""
# KEYS: the index. ARGV: now, the node-set key prefix, how many. The users now gone.
_PRESENCE_SWEEP = """
local gone = {}
local users = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, user in ipairs(users) do
  local key = ARGV[2] .. user
  redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[1])
  local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if #top == 0 then
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[1], user)
    table.insert(gone, user)
  else
    redis.call('ZADD', KEYS[1], top[2], user)
  end
end
return gone
"""
_SWEEP_MAX = 500
# ARGV: channel, payload, channel, payload, ... One command for a batch of publishes:
# Redis parses one request and answers once instead of once per message.
_PUBLISH_MANY = """
for i = 1, #ARGV, 2 do
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return 0
"""
# KEYS: the bucket. ARGV: rate per second, burst. 1 if a token was taken. Redis's clock,
# so that nodes whose clocks differ share one bucket.
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1])
local at = tonumber(b[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
if now > at then
  tokens = math.min(burst, tokens + (now - at) * rate)
  at = now
end
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
  'at', string.format('%.17g', at))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return taken
"""

# KEYS: the back-off. ARGV: base delay, max delay, free failures, quiet period, max level.
# FailureBackoff.record_failure on Redis's clock; the key lives while it still matters
# (blocked, or a level that has not decayed to nothing).
_FAIL = """
local base = tonumber(ARGV[1])
local max_delay = tonumber(ARGV[2])
local free = tonumber(ARGV[3])
local quiet = tonumber(ARGV[4])
local max_level = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', KEYS[1], 'level', 'last', 'until')
local level = tonumber(s[1])
local last = tonumber(s[2])
local blocked = tonumber(s[3])
local at = now
if level == nil or last == nil or blocked == nil then
  level = 1
  blocked = now
else
  level = math.max(0, level - math.floor(math.max(0, now - last) / quiet))
  level = math.min(level + 1, max_level)
  at = math.max(now, last)
end
local steps = level - free
local delay = 0
if steps > 0 then delay = math.min(base * 2 ^ (steps - 1), max_delay) end
blocked = math.max(blocked, at + delay)
redis.call('HSET', KEYS[1], 'level', level, 'last', string.format('%.17g', at),
  'until', string.format('%.17g', blocked))
local keep = math.max(blocked - now, at - now + level * quiet)
redis.call('PEXPIRE', KEYS[1], math.ceil(keep * 1000) + 1000)
return string.format('%.17g', math.max(0, blocked - now))
"""
# KEYS: the back-off. Seconds still blocked, as text (a Lua number would be cut to an integer).
_FAIL_WAIT = """
local blocked = tonumber(redis.call('HGET', KEYS[1], 'until'))
if blocked == nil then return '0' end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return string.format('%.17g', math.max(0, blocked - now))
"""


class _Deliver(msgspec.Struct, tag="e", array_like=True):
    seq: int
    user: str
    device_id: str
    sender: str
    sender_device: str
    server_ts: int
    kind: int
    body: bytes


class _KeysLow(msgspec.Struct, tag="l", array_like=True):
    count: int


class _Kick(msgspec.Struct, tag="x", array_like=True):
    reason: str


class _Push(msgspec.Struct, tag="p", array_like=True):
    topic: str
    frame: bytes


class _Handover(msgspec.Struct, tag="h", array_like=True):
    pass


class _Claim(msgspec.Struct, tag="c", array_like=True):
    node: str
    claim: int


class _Resync(msgspec.Struct, tag="r", array_like=True):
    node: str


_Wire = _Deliver | _KeysLow | _Kick | _Push | _Handover | _Claim | _Resync
_decoder = msgspec.msgpack.Decoder(_Wire)
_encoder = msgspec.msgpack.Encoder()
_HANDOVER = _encoder.encode(_Handover())


def _to_wire(event: BusEvent) -> _Wire:
    if isinstance(event, QueuedEnvelope):
        return _Deliver(
            event.seq,
            event.user,
            event.device_id,
            event.sender,
            event.sender_device,
            event.server_ts,
            event.kind,
            event.body,
        )
    if isinstance(event, KeysLow):
        return _KeysLow(event.count)
    if isinstance(event, Push):
        return _Push(event.topic, frames.encode(event.frame))
    if isinstance(event, RateHandover):
        return _Handover()
    return _Kick(event.reason)


def _from_wire(message: _Deliver | _KeysLow | _Kick | _Push | _Handover) -> BusEvent:
    if isinstance(message, _Deliver):
        return QueuedEnvelope(
            message.seq,
            message.user,
            message.device_id,
            message.sender,
            message.sender_device,
            message.server_ts,
            message.kind,
            message.body,
        )
    if isinstance(message, _KeysLow):
        return KeysLow(message.count)
    if isinstance(message, _Push):
        return Push(message.topic, frames.decode_server_frame(message.frame))
    if isinstance(message, _Handover):
        return RateHandover()
    return Kick(message.reason)


@dataclass(slots=True)
class _LocalDevice:
    subscriber: Subscriber
    claim: int | None = None  # None until this node's claim number arrived
    highest_rival: int = 0  # the highest rival claim seen while ours was pending
    heard: bool = False  # the subscriber was told its channel is heard (see _claim)


@dataclass(frozen=True, slots=True)
class _Command:
    kind: str  # "publish", "subscribe", "unsubscribe", "claim", "barrier"
    channel: bytes
    payload: bytes = b""
    device: DeviceKey | None = None
    entry: _LocalDevice | None = None  # the subscription a claim is for


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class RedisBus:
    """:class:`~bastion.server.cluster.local.Bus` across server nodes through Redis pub/sub."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "bastion",
        max_outbox: int = 100_000,
        max_pipeline: int = 512,
        retry_min_s: float = 0.1,
        retry_max_s: float = 2.0,
        presence_ttl_s: float = 30.0,
        link_ttl_s: float = LINK_TTL_S,
        max_link_slots: int = MAX_LINK_SLOTS,
    ) -> None:
        self.node_id = secrets.token_hex(8)
        self._prefix = prefix.encode()
        self._presence_key = self._prefix + b":presence:"
        self._presence_index = self._prefix + b":presence"
        self._presence_ttl_ms = int(presence_ttl_s * 1000)
        self._everyone = self._prefix + b":all"
        self._redis = redis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_keepalive=True, health_check_interval=5
        )
        self._max_outbox = max_outbox
        self._max_pipeline = max_pipeline
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._local: dict[DeviceKey, _LocalDevice] = {}
        self._by_channel: dict[bytes, DeviceKey] = {}
        self._outbox: deque[_Command] = deque()
        self._outbox_ready = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []
        self._barriers: dict[bytes, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._online = asyncio.Event()
        self.connected = False
        self.dropped = 0
        self._present_here: set[str] = set()
        self._presence_lock = asyncio.Lock()  # one presence change of this node at a time
        self._presence_listeners: list[PresenceLost] = []
        self._presence_task: asyncio.Task[None] | None = None
        self._up = self._redis.register_script(_PRESENCE_UP)
        self._down = self._redis.register_script(_PRESENCE_DOWN)
        self._sweep = self._redis.register_script(_PRESENCE_SWEEP)
        self._take = self._redis.register_script(_TAKE)
        self._fail = self._redis.register_script(_FAIL)
        self._fail_wait = self._redis.register_script(_FAIL_WAIT)
        self._publish_many = self._redis.register_script(_PUBLISH_MANY)
        self._links = RedisLinkSlots(
            self._redis,
            prefix=self._prefix,
            node_id=self.node_id,
            ttl_s=link_ttl_s,
            max_slots=max_link_slots,
        )
        self._rates = RedisDeviceRates(self._redis, prefix=self._prefix)
        self._local_limits = LocalLimits()  # while Redis is unreachable

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, *, wait_s: float = 5.0) -> bool:
        """Start the link to Redis; returns whether it came up within ``wait_s``.

        The node serves its own devices either way; the link keeps retrying.
        """
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        if self._presence_task is None:
            self._presence_task = asyncio.get_running_loop().create_task(self._keep_presence())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._online.wait(), wait_s)
        return self.connected

    async def close(self) -> None:
        """Stop the link and release the Redis connections, within a few seconds at most.

        A node's shutdown must not wait on Redis: a task that does not end
        promptly once cancelled, or connections that do not close, are left
        behind with a warning.
        """
        tasks = [t for t in (self._task, self._presence_task) if t is not None]
        self._task = self._presence_task = None
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=_CLOSE_WAIT_S)
            if stuck:
                log.warning("bus.close_stuck", extra={"tasks": len(stuck)})
        try:
            await asyncio.wait_for(self._redis.aclose(), _CLOSE_WAIT_S)
        except (TimeoutError, RedisError, OSError) as exc:
            log.warning("bus.close_failed", extra={"error": type(exc).__name__})

    async def flush(self) -> None:
        """Wait until Redis has processed everything handed to the bus so far.

        Returns at once while Redis is unreachable (then nothing is pending: the
        link redoes subscriptions when it comes back).
        """
        if not self.connected:
            return
        token = secrets.token_hex(8).encode()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[token] = future
        self._enqueue(_Command("barrier", b"", token))
        await future

    def add_reconnect_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` each time the link to Redis is restored after a loss."""
        self._listeners.append(listener)

    # --- the Bus interface --------------------------------------------------------------------

    def subscribe(self, user: str, device_id: str, subscriber: Subscriber) -> None:
        """Receive the device's events; its connection anywhere else is told to close."""
        key = (user, device_id)
        previous = self._local.get(key)
        entry = _LocalDevice(subscriber)
        self._local[key] = entry
        if previous is not None and previous.subscriber is not subscriber:
            previous.subscriber(Kick("signed in on another connection"))
        channel = self._channel(key)
        self._by_channel[channel] = key
        self._enqueue(_Command("subscribe", channel, device=key))
        self._enqueue(_Command("claim", channel, device=key, entry=entry))

    def unsubscribe(self, user: str, device_id: str, subscriber: Subscriber) -> None:
        """Stop receiving, unless another connection took over meanwhile."""
        key = (user, device_id)
        entry = self._local.get(key)
        if entry is not None and entry.subscriber is subscriber:
            self._forget(key)

    def publish(self, user: str, device_id: str, event: BusEvent) -> None:
        """Hand the event to the device's connection on this node or on any other; never waits."""
        entry = self._local.get((user, device_id))
        if entry is not None:
            entry.subscriber(event)
            return
        if not self.connected:
            self.dropped += 1  # still in the database; the device catches up from there
            return
        payload = _encoder.encode(_to_wire(event))
        self._enqueue(_Command("publish", self._channel((user, device_id)), payload))

    def connected_devices(self) -> int:
        """How many devices are subscribed on this node."""
        return len(self._local)

    # --- presence -----------------------------------------------------------------------------

    async def presence_up(self, user: str) -> bool:
        """Record this node for ``user``; True if no node held the user before.

        While Redis is unreachable the answer is True (the user's contacts may be
        told "online" twice, never not at all); the refresh restores the record.
        """
        async with self._presence_lock:
            self._present_here.add(user)
            now = _now_ms()
            try:
                first = await self._up(
                    keys=[self._presence_key + user.encode(), self._presence_index],
                    args=[self.node_id, now, now + self._presence_ttl_ms, user],
                )
            except (RedisError, OSError) as exc:
                log.warning("bus.presence_failed", extra={"error": type(exc).__name__})
                return True
            return bool(first)

    async def presence_down(self, user: str) -> bool:
        """Remove this node from ``user``; True if no node holds the user any more."""
        async with self._presence_lock:
            self._present_here.discard(user)
            try:
                last = await self._down(
                    keys=[self._presence_key + user.encode(), self._presence_index],
                    args=[self.node_id, _now_ms(), user],
                )
            except (RedisError, OSError) as exc:
                log.warning("bus.presence_failed", extra={"error": type(exc).__name__})
                return True
            return bool(last)

    async def online(self, users: Sequence[str]) -> set[str]:
        """Which of ``users`` some live node holds (this node's own, if Redis is unreachable)."""
        if not users:
            return set()
        now = _now_ms()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for user in users:
                    pipe.zcount(self._presence_key + user.encode(), now, "+inf")
                counts = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("bus.presence_failed", extra={"error": type(exc).__name__})
            return {user for user in users if user in self._present_here}
        return {user for user, count in zip(users, counts, strict=True) if count}

    def on_presence_lost(self, listener: PresenceLost) -> None:
        """Call ``listener`` with users whose every node died; this node swept them."""
        self._presence_listeners.append(listener)

    # --- limits -------------------------------------------------------------------------------

    async def take(self, limit: str, key: str, rate: float, burst: float) -> bool:
        """A token from the cluster's bucket; this node's own bucket while Redis is unreachable.

        The bucket expires from Redis once it would be full again, so idle keys
        cost nothing.
        """
        try:
            taken = await self._take(
                keys=[b"%s:limit:%s:%s" % (self._prefix, limit.encode(), key.encode())],
                args=[rate, burst],
            )
        except (RedisError, OSError) as exc:
            log.warning("bus.limit_failed", extra={"error": type(exc).__name__})
            return self._local_limits.take(limit, key, rate, burst)
        return bool(taken)

    async def hand_over_rate(
        self, user: str, device_id: str, tokens: float, rate: float, burst: float
    ) -> None:
        """Leave the bucket in Redis until it would be full; the device's channel is told.

        While Redis is unreachable the bucket stays on this node only.
        """
        try:
            await self._rates.store(
                user,
                device_id,
                tokens,
                rate=rate,
                burst=burst,
                channel=self._channel((user, device_id)),
                notice=_HANDOVER,
            )
        except (RedisError, OSError) as exc:
            log.warning("bus.rate_failed", extra={"error": type(exc).__name__})

    async def take_rate(self, user: str, device_id: str, rate: float, burst: float) -> float | None:
        """Take the bucket left in Redis, refilled on Redis's clock; None if it is unreachable."""
        try:
            return await self._rates.take(user, device_id, rate=rate, burst=burst)
        except (RedisError, OSError) as exc:
            log.warning("bus.rate_failed", extra={"error": type(exc).__name__})
            return None

    async def failure_wait(self, limit: str, key: str) -> float:
        """Seconds the cluster's back-off still blocks the key; this node's while Redis is away."""
        try:
            wait = await self._fail_wait(keys=[self._backoff_key(limit, key)])
        except (RedisError, OSError) as exc:
            log.warning("bus.limit_failed", extra={"error": type(exc).__name__})
            return self._local_limits.failure_wait(limit, key)
        return float(wait)

    async def record_failure(self, limit: str, key: str, rules: BackoffRules) -> None:
        """Count the failure in the cluster's back-off, and in this node's.

        This node's own count is what :meth:`failure_wait` answers while Redis is
        unreachable, so its failures keep counting through an outage.
        """
        self._local_limits.record_failure(limit, key, rules)
        try:
            await self._fail(
                keys=[self._backoff_key(limit, key)],
                args=[
                    rules.base_delay,
                    rules.max_delay,
                    rules.free_failures,
                    rules.quiet_period,
                    rules.max_level,
                ],
            )
        except (RedisError, OSError) as exc:
            log.warning("bus.limit_failed", extra={"error": type(exc).__name__})

    async def clear_failures(self, limit: str, key: str) -> None:
        """Forget the key's failures in the cluster and on this node."""
        self._local_limits.clear_failures(limit, key)
        try:
            await self._redis.delete(self._backoff_key(limit, key))
        except (RedisError, OSError) as exc:
            log.warning("bus.limit_failed", extra={"error": type(exc).__name__})

    def _backoff_key(self, limit: str, key: str) -> bytes:
        return b"%s:backoff:%s:%s" % (self._prefix, limit.encode(), key.encode())

    # --- link slots (kept by RedisLinkSlots) -------------------------------------------------

    async def link_open(self, slot: bytes, owner: Owner, to_owner: LinkDeliver) -> None:
        """Open the slot in Redis, owned by this device through this node.

        Raises :class:`LinkError` if the slot exists, the cluster holds the most
        slots, or Redis is unreachable.
        """
        await self._links.open(slot, owner, to_owner)

    async def link_join(self, slot: bytes, blob: bytes, to_joiner: LinkDeliver) -> None:
        """Take the slot's one joiner place and send ``blob`` to the owner's node.

        Raises :class:`LinkError` if the slot is unknown, expired or taken, its
        owner's node is gone, or Redis is unreachable.
        """
        await self._links.join(slot, blob, to_joiner)

    async def link_more(self, slot: bytes, owner: Owner, blob: bytes) -> None:
        """Send one more ``blob`` to the joiner's node; the slot stays open.

        Raises :class:`LinkError` unless this device owns the slot and a device
        joined it, once it relayed the most pieces, or if Redis is unreachable.
        """
        await self._links.more(slot, owner, blob)

    async def link_answer(self, slot: bytes, owner: Owner, blob: bytes) -> None:
        """Close the owner's joined slot and send ``blob`` to the joiner's node.

        Raises :class:`LinkError` unless this device owns the slot and a device
        joined it, or if Redis is unreachable.
        """
        await self._links.answer(slot, owner, blob)

    async def _keep_presence(self) -> None:
        period = self._presence_ttl_ms / 3000
        while True:
            await asyncio.sleep(period)
            try:
                await self._refresh_presence()
                gone = await self._sweep(
                    keys=[self._presence_index],
                    args=[_now_ms(), self._presence_key, _SWEEP_MAX],
                )
            except (RedisError, OSError) as exc:
                log.warning("bus.presence_failed", extra={"error": type(exc).__name__})
                continue
            users = [u.decode() if isinstance(u, bytes) else str(u) for u in gone]
            if users:
                for listener in self._presence_listeners:
                    try:
                        listener(users)
                    except Exception:
                        log.exception("bus.listener_failed")

    async def _refresh_presence(self) -> None:
        async with self._presence_lock:
            if not self._present_here:
                return
            expiry = _now_ms() + self._presence_ttl_ms
            async with self._redis.pipeline(transaction=False) as pipe:
                for user in self._present_here:
                    pipe.zadd(self._presence_key + user.encode(), {self.node_id: expiry})
                    pipe.zadd(self._presence_index, {user: expiry}, gt=True)
                await pipe.execute()

    # --- internals ------------------------------------------------------------------------------

    def _channel(self, key: DeviceKey) -> bytes:
        user, device_id = key
        return b"%s:dev:%d:%s:%s" % (self._prefix, len(user), user.encode(), device_id.encode())

    def _enqueue(self, command: _Command) -> None:
        if len(self._outbox) >= self._max_outbox:
            self.dropped += 1
            log.warning("bus.outbox_full")
            return
        self._outbox.append(command)
        self._outbox_ready.set()

    def _forget(self, key: DeviceKey) -> None:
        del self._local[key]
        channel = self._channel(key)
        self._by_channel.pop(channel, None)
        self._enqueue(_Command("unsubscribe", channel, device=key))

    async def _run(self) -> None:
        delay = self._retry_min_s
        first = True
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await self._resume(pubsub, first=first)
                first = False
                delay = self._retry_min_s
                await self._serve(pubsub)
            except (RedisError, OSError) as exc:
                if self.connected:
                    log.warning("bus.disconnected", extra={"error": type(exc).__name__})
            finally:
                self.connected = False
                for future in self._barriers.values():
                    if not future.done():
                        future.set_result(None)
                self._barriers.clear()
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await asyncio.wait_for(pubsub.aclose(), _CLOSE_WAIT_S)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max_s)

    async def _resume(self, pubsub: PubSub, *, first: bool) -> None:
        """(Re)connect: subscribe every local device, drop stale commands, claim again."""
        await self._redis.ping()
        await pubsub.subscribe(self._everyone, self._links.channel)
        # Commands queued while offline are stale: subscriptions and claims are redone
        # below for the devices connected now, and lost events are re-read from the store.
        self._outbox.clear()
        if self._by_channel:
            await pubsub.subscribe(*self._by_channel)
        for key in list(self._local):
            entry = self._local[key]
            entry.claim = None
            self._enqueue(_Command("claim", self._channel(key), device=key, entry=entry))
        self.connected = True
        self._online.set()
        if first and not self.dropped:
            return
        # Events for devices on this node and events this node dropped for other nodes
        # may both be missing: every node re-reads its connections' queues.
        log.info("bus.reconnected")
        await self._redis.publish(self._everyone, _encoder.encode(_Resync(self.node_id)))
        self._notify_listeners()

    def _notify_listeners(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("bus.listener_failed")

    async def _serve(self, pubsub: PubSub) -> None:
        reader = asyncio.get_running_loop().create_task(self._read(pubsub))
        writer = asyncio.get_running_loop().create_task(self._write(pubsub))
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)

    async def _write(self, pubsub: PubSub) -> None:
        while True:
            if not self._outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
                continue
            command = self._outbox.popleft()
            if command.kind == "subscribe":
                if command.channel in self._by_channel:
                    await pubsub.subscribe(command.channel)
            elif command.kind == "unsubscribe":
                if command.channel not in self._by_channel:
                    await pubsub.unsubscribe(command.channel)
            elif command.kind == "claim":
                await self._claim(command)
            elif command.kind == "barrier":
                # Commands on the subscriber connection run in order: the pong proves
                # every earlier SUBSCRIBE was processed.
                await pubsub.ping(command.payload)
            else:
                await self._publish_batch(command)

    async def _publish_batch(self, first: _Command) -> None:
        args = [first.channel, first.payload]
        while len(args) < 2 * self._max_pipeline and self._outbox:
            if self._outbox[0].kind != "publish":
                break
            command = self._outbox.popleft()
            args += (command.channel, command.payload)
        await self._publish_many(args=args)

    async def _claim(self, command: _Command) -> None:
        key, entry = command.device, command.entry
        if key is None or entry is None or self._local.get(key) is not entry:
            return  # replaced or gone meanwhile; a newer claim is queued if needed
        number = int(await self._redis.hincrby(self._prefix + b":claims", command.channel, 1))
        if self._local.get(key) is not entry:
            return
        entry.claim = number
        if entry.highest_rival > number:
            self._kick(key, entry)
            return
        claim = _Claim(self.node_id, number)
        await self._redis.publish(command.channel, _encoder.encode(claim))
        if not entry.heard:
            # The device's channel is heard from now on: a bucket left after the
            # connection took one when signing in, but before that, is taken now.
            entry.heard = True
            try:
                entry.subscriber(RateHandover())
            except Exception:
                log.exception("bus.subscriber_failed")

    def _on_broadcast(self, data: bytes) -> None:
        try:
            wire = _decoder.decode(data)
        except msgspec.DecodeError:
            log.warning("bus.bad_message")
            return
        if isinstance(wire, _Resync) and wire.node != self.node_id:
            self._notify_listeners()

    def _kick(self, key: DeviceKey, entry: _LocalDevice) -> None:
        self._forget(key)
        entry.subscriber(Kick("signed in on another connection"))

    async def _read(self, pubsub: PubSub) -> None:
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            if message.get("type") == "pong":
                barrier = self._barriers.pop(message["data"], None)
                if barrier is not None and not barrier.done():
                    barrier.set_result(None)
                continue
            if message.get("type") != "message":
                continue
            if message["channel"] == self._everyone:
                self._on_broadcast(message["data"])
                continue
            if message["channel"] == self._links.channel:
                self._links.arrived(message["data"])
                continue
            key = self._by_channel.get(message["channel"])
            entry = None if key is None else self._local.get(key)
            if key is None or entry is None:
                continue
            try:
                wire = _decoder.decode(message["data"])
            except msgspec.DecodeError:
                log.warning("bus.bad_message")
                continue
            if isinstance(wire, _Resync):
                continue
            if isinstance(wire, _Claim):
                if wire.node == self.node_id:
                    continue
                if entry.claim is None:
                    entry.highest_rival = max(entry.highest_rival, wire.claim)
                elif wire.claim > entry.claim:
                    self._kick(key, entry)
                continue
            try:
                entry.subscriber(_from_wire(wire))
            except Exception:
                log.exception("bus.subscriber_failed")
