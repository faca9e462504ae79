"""Link slots of a cluster, kept in Redis (see :mod:`bastion.server.core.link_slots`).

A slot is a hash naming its owning device and, for each side, the node and a
random token of the connection; an index of slot expiries bounds their number
and a key per owning device keeps one slot per device. Lua scripts make
opening, taking the one joiner place and answering atomic, on Redis's clock.
A blob for the other side is published on that node's own channel with the
token, and the node hands it to the connection (:meth:`RedisLinkSlots.arrived`).
Without Redis no link can be made: every call fails with :class:`LinkError` at
once. What passes through is sealed end to end; Redis sees what the server sees.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict

import msgspec
import redis.asyncio as redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError
from redis.typing import EncodableT

from bastion.server.core.link_slots import (
    BUSY,
    MAX_LINK_PIECES,
    NOT_WAITING,
    TOO_MANY_PIECES,
    UNAVAILABLE,
    UNKNOWN,
    LinkDeliver,
    LinkError,
    Owner,
)

log = logging.getLogger("bastion.server.cluster.local")

# KEYS: the slot, the owner's key, the slot index. ARGV: slot id, owner, node, token,
# ttl in ms, most slots, the slot-key prefix. 1 if opened; the owner's earlier slot goes.
_LINK_OPEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local previous = redis.call('GET', KEYS[2])
if previous then
  redis.call('DEL', ARGV[7] .. previous)
  redis.call('ZREM', KEYS[3], previous)
  redis.call('DEL', KEYS[2])
end
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[6]) then
  return 0
end
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'onode', ARGV[3], 'otoken', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[5])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[1])
return 1
"""
# KEYS: the slot. ARGV: node, token. The owner's node and token, or nil if the slot is
# unknown, expired or already joined.
_LINK_JOIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
if redis.call('HSETNX', KEYS[1], 'jnode', ARGV[1]) == 0 then return nil end
redis.call('HSET', KEYS[1], 'jtoken', ARGV[2])
return redis.call('HMGET', KEYS[1], 'onode', 'otoken')
"""
# KEYS: the slot, the owner's key, the slot index. ARGV: owner, slot id. The joiner's node
# and token, or nil unless the owner answers a joined slot; the slot is closed.
_LINK_ANSWER = """
local s = redis.call('HMGET', KEYS[1], 'owner', 'jnode', 'jtoken')
if not s[1] or s[1] ~= ARGV[1] or not s[2] or not s[3] then return nil end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return {s[2], s[3]}
"""

# KEYS: the slot. ARGV: owner, most pieces. The joiner's node and token, or nil unless the
# owner's slot was joined; 0 once the slot relayed the most pieces. The slot stays open.
_LINK_MORE = """
local s = redis.call('HMGET', KEYS[1], 'owner', 'jnode', 'jtoken')
if not s[1] or s[1] ~= ARGV[1] or not s[2] or not s[3] then return nil end
if redis.call('HINCRBY', KEYS[1], 'pieces', 1) > tonumber(ARGV[2]) then return 0 end
return {s[2], s[3]}
"""


class _LinkBlob(msgspec.Struct, array_like=True):
    token: str  # the receiving connection's, on the node whose channel this is
    blob: bytes


_decoder = msgspec.msgpack.Decoder(_LinkBlob)
_encoder = msgspec.msgpack.Encoder()


def node_channel(prefix: bytes, node_id: str) -> bytes:
    """The channel on which the node ``node_id`` receives link blobs."""
    return prefix + b":node:" + node_id.encode()


class RedisLinkSlots:
    """The cluster's link slots, for one node; bounded in number, time and memory."""

    def __init__(
        self, client: redis.Redis, *, prefix: bytes, node_id: str, ttl_s: float, max_slots: int
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self.node_id = node_id
        self.channel = node_channel(prefix, node_id)
        self._slot_key = prefix + b":link:"
        self._owner_key = prefix + b":linkowner:"
        self._index = prefix + b":links"
        self._ttl_s = ttl_s
        self._ttl_ms = int(ttl_s * 1000)
        self._max_slots = max_slots
        # token -> (connection, when to forget it): the link ends of this node's connections,
        # at most two per slot the cluster may hold; and each owner's latest token here.
        self._ends: OrderedDict[str, tuple[LinkDeliver, float]] = OrderedDict()
        self._owners: dict[Owner, str] = {}
        self._open = client.register_script(_LINK_OPEN)
        self._join = client.register_script(_LINK_JOIN)
        self._answer = client.register_script(_LINK_ANSWER)
        self._more = client.register_script(_LINK_MORE)

    async def open(self, slot: bytes, owner: Owner, to_owner: LinkDeliver) -> None:
        """Open the slot, owned by this device through this node.

        Raises :class:`LinkError` if the slot exists, the cluster holds the most
        slots, or Redis is unreachable.
        """
        previous = self._owners.pop(owner, None)
        if previous is not None:
            self._ends.pop(previous, None)
        token = self._end(to_owner)
        owner_id = self._owner_id(owner)
        slot_id = slot.hex()
        try:
            opened = await self._call(
                self._open,
                keys=[self._slot_key + slot_id.encode(), self._owner_key + owner_id, self._index],
                args=[
                    slot_id,
                    owner_id,
                    self.node_id,
                    token,
                    self._ttl_ms,
                    self._max_slots,
                    self._slot_key,
                ],
            )
            if not opened:
                raise LinkError(BUSY)
        except LinkError:
            self._ends.pop(token, None)
            raise
        self._owners[owner] = token

    async def join(self, slot: bytes, blob: bytes, to_joiner: LinkDeliver) -> None:
        """Take the slot's one joiner place and send ``blob`` to the owner's node.

        Raises :class:`LinkError` if the slot is unknown, expired or taken, its
        owner's node is gone, or Redis is unreachable.
        """
        token = self._end(to_joiner)
        try:
            found = await self._call(
                self._join,
                keys=[self._slot_key + slot.hex().encode()],
                args=[self.node_id, token],
            )
            if not await self._send(found, blob):
                raise LinkError(UNKNOWN)
        except LinkError:
            self._ends.pop(token, None)
            raise

    async def answer(self, slot: bytes, owner: Owner, blob: bytes) -> None:
        """Close the owner's joined slot and send ``blob`` to the joiner's node.

        Raises :class:`LinkError` unless this device owns the slot and a device
        joined it, or if Redis is unreachable.
        """
        owner_id = self._owner_id(owner)
        slot_id = slot.hex()
        found = await self._call(
            self._answer,
            keys=[self._slot_key + slot_id.encode(), self._owner_key + owner_id, self._index],
            args=[owner_id, slot_id],
        )
        if not await self._send(found, blob):
            raise LinkError(NOT_WAITING)

    async def more(self, slot: bytes, owner: Owner, blob: bytes) -> None:
        """Send one more ``blob`` to the joiner's node; the slot stays open.

        Raises :class:`LinkError` unless this device owns the slot and a device
        joined it, once the slot relayed :data:`MAX_LINK_PIECES`, or if Redis is
        unreachable.
        """
        found = await self._call(
            self._more,
            keys=[self._slot_key + slot.hex().encode()],
            args=[self._owner_id(owner), MAX_LINK_PIECES],
        )
        if found == 0:
            raise LinkError(TOO_MANY_PIECES)
        if not await self._send(found, blob):
            raise LinkError(NOT_WAITING)

    @staticmethod
    def _owner_id(owner: Owner) -> bytes:
        user, device_id = owner
        return b"%d:%s:%s" % (len(user), user.encode(), device_id.encode())

    def _end(self, deliver: LinkDeliver) -> str:
        """Register a connection's end of a link under a fresh token, for a slot's lifetime.

        Raises :class:`LinkError` while this node holds two ends for every slot the
        cluster may hold (the memory bound).
        """
        now = time.monotonic()
        while self._ends:
            oldest = next(iter(self._ends.values()))
            if oldest[1] > now:
                break
            self._ends.popitem(last=False)
        if len(self._ends) >= 2 * self._max_slots:
            raise LinkError(BUSY)
        token = secrets.token_hex(16)
        self._ends[token] = (deliver, now + self._ttl_s)
        return token

    async def _call(
        self, script: AsyncScript, *, keys: list[bytes], args: list[EncodableT]
    ) -> object:
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            log.warning("bus.link_failed", extra={"error": type(exc).__name__})
            raise LinkError(UNAVAILABLE) from None

    async def _send(self, found: object, blob: bytes) -> bool:
        """Hand ``blob`` to the link end ``found`` names (node, token); False if there is none.

        Raises :class:`LinkError` if Redis is unreachable.
        """
        if not (
            isinstance(found, list)
            and len(found) == 2  # node and token
            and all(isinstance(v, bytes) for v in found)
        ):
            return False
        node, token = (v.decode() for v in found)
        if node == self.node_id:
            return self._hand_over(token, blob)
        try:
            listeners = await self._redis.publish(
                node_channel(self._prefix, node), _encoder.encode(_LinkBlob(token, blob))
            )
        except (RedisError, OSError) as exc:
            log.warning("bus.link_failed", extra={"error": type(exc).__name__})
            raise LinkError(UNAVAILABLE) from None
        return bool(listeners)

    def arrived(self, data: bytes) -> None:
        """A message on this node's channel: hand its blob to the connection it names."""
        try:
            message = _decoder.decode(data)
        except msgspec.DecodeError:
            log.warning("bus.bad_message")
            return
        try:
            self._hand_over(message.token, message.blob)
        except Exception:
            log.exception("bus.subscriber_failed")

    def _hand_over(self, token: str, blob: bytes) -> bool:
        """Hand a link blob to this node's connection with that token; False if none."""
        end = self._ends.get(token)
        if end is None or end[1] <= time.monotonic():
            return False
        end[0](blob)
        return True
