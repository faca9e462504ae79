"""A device's message rate handed from node to node through Redis.

The per-message check stays in the memory of the node that holds the device's
connection (:class:`~bastion.ratelimit.RateLimiter`); Redis is asked only when
a connection signs in or closes. The node a signed-in connection closes on
stores the device's bucket as ``tokens`` at ``at``, a time on Redis's clock, so
that nodes whose clocks differ agree on how far it has refilled. The record
expires once the bucket would be full again: a full bucket needs no record.
Storing over a record not yet taken keeps the lower of the two (refilled to the
same moment), and tells the device's channel, so that a node holding the device
meanwhile takes it at once. Taking is atomic: one node gets the record, once.
"""

from __future__ import annotations

import redis.asyncio as redis

# KEYS: the record. ARGV: tokens now, rate per second, burst, the device's channel, the
# notice. 1 if a record is left (and the channel told); a full bucket leaves none.
_RATE_STORE = """
local tokens = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local before = tonumber(b[1])
local at = tonumber(b[2])
if before ~= nil and at ~= nil then
  tokens = math.min(tokens, before + math.max(0, now - at) * rate)
end
tokens = math.max(0, tokens)
if tokens >= burst then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
  'at', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000))
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""
# KEYS: the record. ARGV: rate per second, burst. The tokens it holds now, as text (a Lua
# number would be cut to an integer), or nil without a record; the record is gone after.
_RATE_TAKE = """
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1])
local at = tonumber(b[2])
redis.call('DEL', KEYS[1])
if tokens == nil or at == nil then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
tokens = math.min(tonumber(ARGV[2]), tokens + math.max(0, now - at) * tonumber(ARGV[1]))
return string.format('%.17g', tokens)
"""


class RedisDeviceRates:
    """Message-rate buckets between a device's connections, kept in Redis.

    Both calls raise :class:`~redis.exceptions.RedisError` or :class:`OSError`
    when Redis is unreachable; the bus decides what that means.
    """

    def __init__(self, client: redis.Redis, *, prefix: bytes) -> None:
        self._prefix = prefix
        self._store = client.register_script(_RATE_STORE)
        self._take = client.register_script(_RATE_TAKE)

    def key(self, user: str, device_id: str) -> bytes:
        """The Redis key of the device's record."""
        return b"%s:rate:%d:%s:%s" % (self._prefix, len(user), user.encode(), device_id.encode())

    async def store(
        self,
        user: str,
        device_id: str,
        tokens: float,
        *,
        rate: float,
        burst: float,
        channel: bytes,
        notice: bytes,
    ) -> bool:
        """Leave the bucket (``tokens`` now) and publish ``notice`` on ``channel``.

        Returns whether a record was left (none for a full bucket).
        """
        left = await self._store(
            keys=[self.key(user, device_id)], args=[tokens, rate, burst, channel, notice]
        )
        return bool(left)

    async def take(self, user: str, device_id: str, *, rate: float, burst: float) -> float | None:
        """Take the record: the tokens it holds now, refilled since it was left; None if none."""
        tokens = await self._take(keys=[self.key(user, device_id)], args=[rate, burst])
        return None if tokens is None else float(tokens)
