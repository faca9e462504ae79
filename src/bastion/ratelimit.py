"""Token buckets and failure back-off, with bounded memory and no clock inside.

Every call takes ``now``: seconds on a monotonic clock (``time.monotonic()`` in
the server, a plain number in tests). A ``now`` earlier than one seen before is
treated as "no time has passed", so a clock that steps back never refills a bucket.

Memory is bounded by ``max_keys``. Entries are kept in least-recently-used order
and only the oldest end is ever looked at, so no call scans the table:

- :class:`RateLimiter` drops full buckets (a full bucket is the same as an absent
  one, so dropping it never lets anyone through early). When the table is full and
  its oldest bucket is still refilling, a *new* key is refused until that bucket is
  full: under a flood of more than ``max_keys`` distinct keys per refill period the
  limiter fails closed instead of forgetting a key that is being limited.
- :class:`FailureBackoff` forgets a key only once its block has ended (which at
  worst shortens that key's *next* delay, never a current one); when every tracked
  key is still blocked, a new key is blocked too, for the same reason.

Failing closed suits keys an attacker cannot mint cheaply (signed-in devices). For
keys that anyone can mint, such as client addresses (an IPv6 host may own 2**64 of
them), it would let one party refuse everyone: there ``evict_when_full`` makes a
full table forget its least recently used key instead, and :func:`address_key`
counts an IPv6 address under its /64 network, so that minting keys takes a network
per key. An evicted key starts again with a full bucket (or no block): a party
holding more networks than the table has rows can get one burst per network per
cycle through the table, which it could get from that many networks anyway.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from bastion.errors import ConfigError

K = TypeVar("K", bound=Hashable)

DEFAULT_MAX_KEYS = 100_000
_HOUSEKEEPING_PER_CALL = 2
_INF = math.inf


def address_key(address: str) -> str:
    """The key that per-address limits count ``address`` under.

    An IPv4 address (also when written as an IPv4-mapped IPv6 address) is its own
    key; an IPv6 address counts as its /64 network, the smallest block a network
    hands out (one host or household can use all of it). Anything else (``unknown``)
    is its own key.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive finite number")


def _check_now(now: float) -> None:
    if not math.isfinite(now):
        raise ConfigError("now must be a finite number of seconds")


def _check_max_keys(max_keys: int) -> None:
    if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
        raise ConfigError("max_keys must be a positive integer")


class TokenBucket:
    """One token bucket: ``burst`` tokens at most, refilled at ``rate`` tokens per second.

    It starts full. Raises :class:`ConfigError` for a non-positive or non-finite
    ``rate`` or ``burst``.
    """

    __slots__ = ("_tokens", "_updated", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        _check_positive("rate", rate)
        _check_positive("burst", burst)
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = self.burst
        self._updated: float | None = None

    def _refill(self, now: float) -> None:
        _check_now(now)
        if self._updated is None:
            self._updated = now
            return
        if now > self._updated:
            gained = (now - self._updated) * self.rate
            self._tokens = min(self.burst, self._tokens + gained)
            self._updated = now

    def tokens(self, now: float) -> float:
        """The tokens available at ``now``."""
        self._refill(now)
        return self._tokens

    def allow(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are enough and return True; else take none, return False.

        Raises :class:`ConfigError` for a non-positive or non-finite ``cost`` or ``now``.
        """
        _check_positive("cost", cost)
        self._refill(now)
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False

    def retry_after(self, now: float, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are available (0 if now; ``inf`` if cost > burst).

        Raises :class:`ConfigError` for a non-positive or non-finite ``cost`` or ``now``.
        """
        _check_positive("cost", cost)
        if cost > self.burst:
            return math.inf
        self._refill(now)
        return max(0.0, (cost - self._tokens) / self.rate)

    def is_full(self, now: float) -> bool:
        """True when the bucket holds ``burst`` tokens at ``now`` (it then equals a new one)."""
        return self.tokens(now) >= self.burst

    def lower_to(self, tokens: float, now: float) -> None:
        """Hold at most ``tokens`` at ``now`` (never more than it holds already).

        Raises :class:`ConfigError` for a non-finite ``tokens`` or ``now``.
        """
        if not math.isfinite(tokens):
            raise ConfigError("tokens must be a finite number")
        self._refill(now)
        self._tokens = min(self._tokens, max(0.0, tokens))

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate}, burst={self.burst}, tokens={self._tokens:.3f})"


class RateLimiter(Generic[K]):
    """Token buckets keyed by device id, address, ``(requester, target)``...

    Every key gets its own bucket of ``burst`` tokens refilled at ``rate`` per
    second. At most ``max_keys`` buckets are held; see the module docstring for
    what happens when that many keys are active at once. Raises
    :class:`ConfigError` for invalid limits.

    The relay asks once per message, so :meth:`allow` does the arithmetic of
    :class:`TokenBucket` inline on a ``[tokens, updated]`` pair per key, and
    drops full buckets only when a key is added (the only time the table grows).
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
        evict_when_full: bool = False,
    ) -> None:
        _check_positive("rate", rate)
        _check_positive("burst", burst)
        _check_max_keys(max_keys)
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        self.evict_when_full = evict_when_full
        # key -> [tokens at ``updated``, updated]; least recently used first.
        self._buckets: OrderedDict[K, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: K, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``key``'s bucket; False means the request is over the limit.

        Also False for a new key while the table is full of buckets that are still
        refilling (fail closed). Raises :class:`ConfigError` for a bad ``cost`` or ``now``.
        """
        # Chained comparisons are False for NaN: the checks of _check_positive and _check_now.
        if not 0.0 < cost < _INF:
            raise ConfigError("cost must be a positive finite number")
        if not -_INF < now < _INF:
            raise ConfigError("now must be a finite number of seconds")
        buckets = self._buckets
        bucket = buckets.get(key)
        burst = self.burst
        if bucket is None:
            if cost > burst:
                return False
            # A full bucket is the same as an absent one: drop up to _HOUSEKEEPING_PER_CALL
            # of them from the least-recently-used end. If none could go and the table is
            # full, its oldest bucket is still refilling: refuse the newcomer (fail closed).
            for _ in range(_HOUSEKEEPING_PER_CALL):
                if not buckets:
                    break
                oldest = next(iter(buckets))
                tokens, updated = buckets[oldest]
                if now > updated:
                    tokens += (now - updated) * self.rate
                if tokens < burst:
                    break
                del buckets[oldest]
            if len(buckets) >= self.max_keys:
                if not self.evict_when_full:
                    return False
                del buckets[next(iter(buckets))]  # the least recently used
            buckets[key] = [burst - cost, now]
            return True
        buckets.move_to_end(key)
        tokens, updated = bucket
        if now > updated:  # a clock that steps back refills nothing
            tokens += (now - updated) * self.rate
            if tokens > burst:  # noqa: PLR1730 - cheaper than a call to min() once per message
                tokens = burst
            bucket[1] = now
        if tokens >= cost:
            bucket[0] = tokens - cost
            return True
        bucket[0] = tokens
        return False

    def retry_after(self, key: K, now: float, cost: float = 1.0) -> float:
        """Seconds until ``allow(key, ..., cost)`` can succeed (0 if it can now; ``inf`` never).

        Does not take tokens. Raises :class:`ConfigError` for a bad ``cost`` or ``now``.
        """
        _check_positive("cost", cost)
        _check_now(now)
        if cost > self.burst:
            return math.inf
        bucket = self._buckets.get(key)
        if bucket is not None:
            return max(0.0, (cost - self._tokens(bucket, now)) / self.rate)
        if len(self._buckets) < self.max_keys or self.evict_when_full:
            return 0.0
        oldest = next(iter(self._buckets.values()))
        return max(0.0, (self.burst - self._tokens(oldest, now)) / self.rate)

    def tokens(self, key: K, now: float) -> float:
        """The tokens ``key`` holds at ``now`` (``burst`` for a key without a bucket).

        Raises :class:`ConfigError` for a bad ``now``.
        """
        _check_now(now)
        bucket = self._buckets.get(key)
        return self.burst if bucket is None else self._tokens(bucket, now)

    def lower(self, key: K, tokens: float, now: float) -> None:
        """Leave ``key`` at most ``tokens`` at ``now``; a bucket never gains from this.

        For a bucket carried over from elsewhere (another node of a cluster). A new
        key needs room in the table; while the table is full of refilling buckets
        :meth:`allow` refuses that key anyway. Raises :class:`ConfigError` for a
        non-finite ``tokens`` or ``now``.
        """
        _check_now(now)
        if not math.isfinite(tokens):
            raise ConfigError("tokens must be a finite number")
        bucket = self._buckets.get(key)
        if bucket is None:
            if tokens >= self.burst or not self._make_room(now):
                return
            self._buckets[key] = [max(0.0, tokens), now]
            return
        self._buckets.move_to_end(key)
        held = self._tokens(bucket, now)
        bucket[0] = min(held, max(0.0, tokens))
        bucket[1] = max(bucket[1], now)  # a clock that steps back moves nothing

    def _tokens(self, bucket: list[float], now: float) -> float:
        """The tokens ``bucket`` holds at ``now`` (without storing the refill)."""
        tokens, updated = bucket
        if now > updated:
            return min(self.burst, tokens + (now - updated) * self.rate)
        return tokens

    def _make_room(self, now: float) -> bool:
        """Room for one more key, dropping full buckets as :meth:`allow` does; False if none."""
        buckets = self._buckets
        for _ in range(_HOUSEKEEPING_PER_CALL):
            if not buckets:
                break
            oldest = next(iter(buckets))
            if self._tokens(buckets[oldest], now) < self.burst:
                break
            del buckets[oldest]
        if len(buckets) >= self.max_keys and self.evict_when_full and buckets:
            del buckets[next(iter(buckets))]
        return len(buckets) < self.max_keys


def failure_levels(base_delay: float, max_delay: float, free_failures: int) -> int:
    """The failure level past which :class:`FailureBackoff` only reaches ``max_delay`` again."""
    return free_failures + 1 + math.ceil(math.log2(max_delay / base_delay))


@dataclass(frozen=True, slots=True)
class BackoffRules:
    """The rules of a :class:`FailureBackoff`, for a back-off kept elsewhere (a cluster's).

    Raises :class:`ConfigError` for invalid values, as :class:`FailureBackoff` does.
    """

    base_delay: float = 1.0
    max_delay: float = 300.0
    quiet_period: float = 900.0
    free_failures: int = 0

    def __post_init__(self) -> None:
        self.backoff()  # validates

    @property
    def max_level(self) -> int:
        """The failure level past which the delay only reaches ``max_delay`` again."""
        return failure_levels(self.base_delay, self.max_delay, self.free_failures)

    def backoff(
        self, *, max_keys: int = DEFAULT_MAX_KEYS, evict_when_full: bool = False
    ) -> FailureBackoff[str]:
        """A back-off of one process that follows these rules."""
        return FailureBackoff(
            base_delay=self.base_delay,
            max_delay=self.max_delay,
            quiet_period=self.quiet_period,
            free_failures=self.free_failures,
            max_keys=max_keys,
            evict_when_full=evict_when_full,
        )


class _FailureState:
    __slots__ = ("blocked_until", "last_failure", "level")

    def __init__(self, level: int, last_failure: float, blocked_until: float) -> None:
        self.level = level
        self.last_failure = last_failure
        self.blocked_until = blocked_until


class FailureBackoff(Generic[K]):
    """Exponential slow-down after repeated failures (sign-in attempts per address or account).

    After the n-th failure in a row (past ``free_failures``, default none) the key
    is blocked for ``min(base_delay * 2 ** (n - 1), max_delay)`` seconds from that failure. Each
    ``quiet_period`` without a failure lowers n by one (halving the next delay);
    a success forgets the key. At most ``max_keys`` keys are held (see the module
    docstring). Raises :class:`ConfigError` for invalid limits.

    A success resets the key it is recorded for. For a key shared by several
    users, such as an address, an attacker who owns one valid account could sign
    in with it to reset the address; record successes on account keys only and
    let address keys decay.
    """

    def __init__(
        self,
        *,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        quiet_period: float = 900.0,
        max_keys: int = DEFAULT_MAX_KEYS,
        free_failures: int = 0,
        evict_when_full: bool = False,
    ) -> None:
        _check_positive("base_delay", base_delay)
        if free_failures < 0:
            raise ConfigError("free_failures must not be negative")
        _check_positive("max_delay", max_delay)
        _check_positive("quiet_period", quiet_period)
        _check_max_keys(max_keys)
        if max_delay < base_delay:
            raise ConfigError("max_delay must not be below base_delay")
        self.base_delay = float(base_delay)
        self.max_delay = float(max_delay)
        self.quiet_period = float(quiet_period)
        self.max_keys = max_keys
        self.free_failures = free_failures
        self.evict_when_full = evict_when_full
        # Doubling past this level only reaches max_delay again.
        self._max_level = failure_levels(self.base_delay, self.max_delay, free_failures)
        self._states: OrderedDict[K, _FailureState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def delay_for_level(self, level: int) -> float:
        """The block, in seconds, that follows the ``level``-th failure in a row.

        The first ``free_failures`` failures cost nothing (a mistyped or stale
        credential should not lock anyone out); the blocks double after that.
        """
        steps = min(level, self._max_level) - self.free_failures
        if steps <= 0:
            return 0.0
        return min(self.base_delay * 2.0 ** (steps - 1), self.max_delay)

    def _decayed_level(self, state: _FailureState, now: float) -> int:
        quiet = max(0.0, now - state.last_failure)
        return max(0, state.level - int(quiet // self.quiet_period))

    def record_failure(self, key: K, now: float) -> None:
        """Count a failure for ``key`` at ``now`` and block it for the next delay.

        When the table is full of keys that are still blocked, the failure cannot
        be stored; :meth:`blocked_for` then blocks that key anyway (fail closed).
        Raises :class:`ConfigError` for a bad ``now``.
        """
        _check_now(now)
        self._housekeep(now)
        state = self._states.get(key)
        if state is None:
            if not self._make_room(now):
                return
            level = 1
        else:
            level = min(self._decayed_level(state, now) + 1, self._max_level)
            now = max(now, state.last_failure)
        until = now + self.delay_for_level(level)
        if state is not None:
            until = max(until, state.blocked_until)
        self._states[key] = _FailureState(level, now, until)
        self._states.move_to_end(key)

    def record_success(self, key: K) -> None:
        """Forget ``key``'s failures (see the class docstring for shared keys)."""
        self._states.pop(key, None)

    def blocked_for(self, key: K, now: float) -> float:
        """Seconds ``key`` must still wait before its next attempt (0.0 when allowed).

        Raises :class:`ConfigError` for a bad ``now``.
        """
        _check_now(now)
        state = self._states.get(key)
        if state is not None:
            return max(0.0, state.blocked_until - now)
        if len(self._states) < self.max_keys or self.evict_when_full:
            return 0.0
        oldest = next(iter(self._states.values()))
        return max(0.0, oldest.blocked_until - now)

    def _housekeep(self, now: float) -> None:
        """Drop up to a fixed number of fully decayed keys from the oldest end."""
        for _ in range(_HOUSEKEEPING_PER_CALL):
            if not self._states:
                return
            key, state = next(iter(self._states.items()))
            if state.blocked_until > now or self._decayed_level(state, now) > 0:
                return
            del self._states[key]

    def _make_room(self, now: float) -> bool:
        """Make room for one more key; False if the oldest key is still blocked."""
        if len(self._states) < self.max_keys:
            return True
        key, state = next(iter(self._states.items()))
        if state.blocked_until > now and not self.evict_when_full:
            return False
        del self._states[key]
        return True
