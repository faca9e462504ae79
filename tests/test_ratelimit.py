"""Token buckets and failure back-off: exact numbers with a fake clock, eviction, and a bound."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bastion.errors import ConfigError
from bastion.ratelimit import (
    DEFAULT_MAX_KEYS,
    BackoffRules,
    FailureBackoff,
    RateLimiter,
    TokenBucket,
    address_key,
)
from bastion.server.cluster.local import LocalLimits

# -- TokenBucket ---------------------------------------------------------------------------


def test_bucket_allows_burst_then_refuses_then_refills_at_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0)
    assert [bucket.allow(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after(100.0) == pytest.approx(0.5)
    assert not bucket.allow(100.25)
    assert bucket.allow(100.5)
    assert not bucket.allow(100.5)
    # A long pause refills to burst, never beyond.
    assert bucket.tokens(1000.0) == 3.0


def test_bucket_cost_larger_than_burst_never_passes() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0)
    assert not bucket.allow(0.0, cost=3.0)
    assert bucket.retry_after(0.0, cost=3.0) == math.inf
    assert bucket.tokens(0.0) == 2.0


def test_clock_stepping_back_does_not_refill() -> None:
    bucket = TokenBucket(rate=1.0, burst=1.0)
    assert bucket.allow(50.0)
    assert not bucket.allow(10.0)
    assert not bucket.allow(50.5)
    assert bucket.allow(51.0)


@pytest.mark.parametrize(
    ("rate", "burst"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (math.nan, 1.0), (1.0, math.inf)]
)
def test_invalid_limits_are_refused(rate: float, burst: float) -> None:
    with pytest.raises(ConfigError):
        TokenBucket(rate, burst)
    with pytest.raises(ConfigError):
        RateLimiter[str](rate, burst)


@pytest.mark.parametrize("cost", [0.0, -1.0, math.nan])
def test_invalid_cost_is_refused(cost: float) -> None:
    limiter = RateLimiter[str](1.0, 5.0)
    with pytest.raises(ConfigError):
        limiter.allow("a", 0.0, cost)


def test_nan_clock_is_refused() -> None:
    with pytest.raises(ConfigError):
        RateLimiter[str](1.0, 5.0).allow("a", math.nan)


# -- RateLimiter ---------------------------------------------------------------------------


def test_keys_are_independent() -> None:
    limiter = RateLimiter[str](rate=1.0, burst=2.0)
    assert limiter.allow("alice", 0.0)
    assert limiter.allow("alice", 0.0)
    assert not limiter.allow("alice", 0.0)
    assert limiter.allow("bob", 0.0)
    assert limiter.retry_after("alice", 0.0) == pytest.approx(1.0)
    assert limiter.retry_after("bob", 0.0) == 0.0
    assert limiter.retry_after("carol", 0.0) == 0.0


def test_tuple_keys_and_weighted_cost() -> None:
    limiter = RateLimiter[tuple[str, str]](rate=0.5, burst=10.0)
    assert limiter.allow(("mallory", "alice"), 0.0, cost=10.0)
    assert not limiter.allow(("mallory", "alice"), 1.0, cost=1.0)
    assert limiter.allow(("mallory", "bob"), 1.0, cost=1.0)
    assert limiter.retry_after(("mallory", "alice"), 1.0, cost=1.0) == pytest.approx(1.0)
    assert limiter.allow(("mallory", "alice"), 2.0, cost=1.0)


def test_full_buckets_are_forgotten_so_memory_stays_bounded() -> None:
    limiter = RateLimiter[int](rate=1.0, burst=1.0, max_keys=10)
    for i in range(1000):
        # Each key is used once; one second later its bucket is full again.
        assert limiter.allow(i, float(i))
        assert len(limiter) <= 10
    assert len(limiter) <= 3


def test_limited_key_is_never_evicted_to_make_room_for_new_keys() -> None:
    limiter = RateLimiter[str](rate=1.0, burst=1.0, max_keys=3)
    for name in ("a", "b", "c"):
        assert limiter.allow(name, 0.0)
    # Table full of drained buckets: a newcomer is refused rather than "a" forgotten.
    assert not limiter.allow("newcomer", 0.5)
    assert limiter.retry_after("newcomer", 0.5) == pytest.approx(0.5)
    assert not limiter.allow("a", 0.5)
    assert len(limiter) == 3
    # Once the oldest bucket is full it is dropped and the newcomer gets in.
    assert limiter.allow("newcomer", 1.0)
    assert len(limiter) <= 3


def test_flooding_with_fresh_keys_does_not_reset_a_limited_key() -> None:
    limiter = RateLimiter[str](rate=0.1, burst=2.0, max_keys=50)
    assert limiter.allow("victim-target", 0.0)
    assert limiter.allow("victim-target", 0.0)
    for i in range(10_000):
        limiter.allow(f"sybil-{i}", 0.001 * i)
        assert len(limiter) <= 50
    # Ten seconds at 0.1/s gives back exactly one token, not a fresh bucket.
    now = 10.0
    assert limiter.allow("victim-target", now)
    assert not limiter.allow("victim-target", now)


def test_a_carried_over_bucket_lowers_a_key_and_refills_from_there() -> None:
    limiter = RateLimiter[str](rate=2.0, burst=10.0, max_keys=10)
    assert limiter.tokens("alice", 0.0) == 10.0  # no bucket: full
    limiter.lower("alice", 1.5, 0.0)
    assert limiter.tokens("alice", 0.0) == 1.5
    assert limiter.allow("alice", 0.0)
    assert not limiter.allow("alice", 0.0)  # 0.5 left
    assert limiter.allow("alice", 0.25)  # half a second at 2/s: one more
    assert limiter.tokens("bob", 0.25) == 10.0  # other keys untouched


def test_lowering_never_adds_tokens_and_a_full_bucket_takes_no_room() -> None:
    limiter = RateLimiter[str](rate=1.0, burst=5.0, max_keys=10)
    for _ in range(4):
        assert limiter.allow("alice", 0.0)
    limiter.lower("alice", 4.0, 0.0)  # more than it holds: no gain
    assert limiter.tokens("alice", 0.0) == 1.0
    limiter.lower("bob", 5.0, 0.0)  # a full bucket is the same as none
    assert len(limiter) == 1
    limiter.lower("carol", -3.0, 0.0)  # never below empty
    assert limiter.tokens("carol", 0.0) == 0.0
    assert limiter.tokens("carol", 1.0) == 1.0


def test_a_lowered_bucket_does_not_refill_when_the_clock_steps_back() -> None:
    limiter = RateLimiter[str](rate=1.0, burst=5.0)
    limiter.lower("alice", 0.0, 100.0)
    assert limiter.tokens("alice", 50.0) == 0.0
    assert not limiter.allow("alice", 50.0)
    limiter.lower("alice", 3.0, 50.0)
    assert not limiter.allow("alice", 99.0)
    assert limiter.allow("alice", 101.0)


def test_lowering_a_new_key_respects_the_table_bound() -> None:
    limiter = RateLimiter[str](rate=1.0, burst=1.0, max_keys=2)
    assert limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)
    limiter.lower("c", 0.0, 0.5)  # no room: not stored, and "c" stays refused
    assert len(limiter) == 2
    assert not limiter.allow("c", 0.5)
    with pytest.raises(ConfigError):
        limiter.lower("a", math.nan, 0.5)


@st.composite
def _traffic(draw: st.DrawFn) -> list[tuple[float, int, float]]:
    steps = draw(st.integers(min_value=1, max_value=60))
    return [
        (
            draw(st.floats(min_value=0.0, max_value=3.0)),
            draw(st.integers(min_value=0, max_value=5)),
            draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])),
        )
        for _ in range(steps)
    ]


@settings(max_examples=200, deadline=None)
@example(  # a newcomer must not push out a drained bucket that is still refilling
    rate=0.5,
    burst=1.0,
    max_keys=1,
    traffic=[(0.0, 0, 0.5), (0.0, 0, 0.5), (0.0, 1, 0.5), (0.0, 0, 0.5)],
)
@given(
    rate=st.sampled_from([0.5, 1.0, 3.0]),
    burst=st.sampled_from([1.0, 2.0, 5.0]),
    max_keys=st.integers(min_value=1, max_value=4),
    traffic=_traffic(),
)
def test_never_allows_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: float, max_keys: int, traffic: list[tuple[float, int, float]]
) -> None:
    limiter = RateLimiter[int](rate, burst, max_keys=max_keys)
    now = 0.0
    granted: dict[int, list[tuple[float, float]]] = {}
    for gap, key, cost in traffic:
        now += gap
        if limiter.allow(key, now, cost):
            granted.setdefault(key, []).append((now, cost))
        assert len(limiter) <= max_keys
    for events in granted.values():
        for i, (start, _) in enumerate(events):
            total = 0.0
            for end, cost in events[i:]:
                total += cost
                assert total <= burst + rate * (end - start) + 1e-9


def test_limiter_clock_stepping_back_does_not_refill() -> None:
    limiter = RateLimiter[str](rate=1.0, burst=1.0)
    assert limiter.allow("a", 50.0)
    assert not limiter.allow("a", 10.0)
    assert not limiter.allow("a", 50.5)
    assert limiter.allow("a", 51.0)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 3.0]),
    burst=st.sampled_from([1.0, 2.0, 5.0]),
    max_keys=st.integers(min_value=1, max_value=4),
    traffic=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=3.0),
            st.integers(min_value=0, max_value=5),
            st.sampled_from([0.5, 1.0, 2.0, 3.0, 6.0]),
        ),
        max_size=60,
    ),
)
def test_limiter_decides_as_one_token_bucket_per_key(
    rate: float, burst: float, max_keys: int, traffic: list[tuple[float, int, float]]
) -> None:
    # Dropping a full bucket never changes a decision; a bounded table only adds refusals,
    # and only for keys it does not hold while its oldest bucket is still refilling.
    limiter = RateLimiter[int](rate, burst, max_keys=max_keys)
    reference: dict[int, TokenBucket] = {}
    now = 100.0
    for step, key, cost in traffic:
        now += step
        held = len(limiter) < max_keys or limiter.retry_after(key, now, burst) == 0.0
        expected = reference.setdefault(key, TokenBucket(rate, burst))
        if held or expected.tokens(now) < burst:
            assert limiter.allow(key, now, cost) == expected.allow(now, cost)
        else:  # a newcomer to a full table: refused, while a fresh bucket would not have been
            assert not limiter.allow(key, now, cost)
        assert len(limiter) <= max_keys


# -- FailureBackoff ------------------------------------------------------------------------


def test_backoff_doubles_from_base_up_to_the_cap() -> None:
    backoff = FailureBackoff[str](base_delay=1.0, max_delay=10.0, quiet_period=1000.0)
    now = 0.0
    waits = []
    for _ in range(7):
        assert backoff.blocked_for("203.0.113.9", now) == 0.0
        backoff.record_failure("203.0.113.9", now)
        waits.append(backoff.blocked_for("203.0.113.9", now))
        now += waits[-1]
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_blocked_for_counts_down_and_other_keys_are_free() -> None:
    backoff = FailureBackoff[str](base_delay=2.0, max_delay=60.0)
    backoff.record_failure("alice", 100.0)
    backoff.record_failure("alice", 100.0)
    assert backoff.blocked_for("alice", 100.0) == 4.0
    assert backoff.blocked_for("alice", 103.0) == 1.0
    assert backoff.blocked_for("alice", 104.0) == 0.0
    assert backoff.blocked_for("bob", 100.0) == 0.0


def test_success_forgets_the_key() -> None:
    backoff = FailureBackoff[str](base_delay=1.0, max_delay=60.0)
    for t in range(5):
        backoff.record_failure("alice", float(t))
    backoff.record_success("alice")
    assert backoff.blocked_for("alice", 5.0) == 0.0
    backoff.record_failure("alice", 5.0)
    assert backoff.blocked_for("alice", 5.0) == 1.0


def test_quiet_periods_halve_the_next_delay_and_then_forget() -> None:
    backoff = FailureBackoff[str](base_delay=1.0, max_delay=100.0, quiet_period=60.0)
    for _ in range(5):  # level 5: 16 s
        backoff.record_failure("k", 0.0)
    assert backoff.blocked_for("k", 0.0) == 16.0
    # Two quiet periods: level 5 -> 3, so the next failure is level 4 (8 s).
    backoff.record_failure("k", 120.0)
    assert backoff.blocked_for("k", 120.0) == 8.0
    # A long quiet time decays to nothing: the next failure starts at the base.
    backoff.record_failure("k", 120.0 + 10 * 60.0)
    assert backoff.blocked_for("k", 720.0) == 1.0


def test_backoff_memory_is_bounded_and_a_blocked_key_is_never_forgotten() -> None:
    backoff = FailureBackoff[str](base_delay=10.0, max_delay=10.0, max_keys=3)
    for name in ("a", "b", "c"):
        backoff.record_failure(name, 0.0)
    backoff.record_failure("d", 1.0)
    assert len(backoff) == 3
    assert backoff.blocked_for("a", 1.0) == 9.0
    # The untracked newcomer is blocked too (fail closed) until room frees up.
    assert backoff.blocked_for("d", 1.0) == 9.0
    backoff.record_failure("d", 10.0)
    assert len(backoff) == 3
    assert backoff.blocked_for("d", 10.0) == 10.0
    for i in range(1000):
        backoff.record_failure(f"x{i}", 100.0 + 20.0 * i)
        assert len(backoff) <= 3


def test_invalid_backoff_limits_are_refused() -> None:
    with pytest.raises(ConfigError):
        FailureBackoff[str](base_delay=10.0, max_delay=1.0)
    with pytest.raises(ConfigError):
        FailureBackoff[str](max_keys=0)
    # The rules a cluster's back-off is kept by are refused just the same, up front.
    with pytest.raises(ConfigError):
        BackoffRules(base_delay=10.0, max_delay=1.0)
    with pytest.raises(ConfigError):
        BackoffRules(free_failures=-1)


# -- keys anyone can mint: client addresses --------------------------------------------------


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("unknown", "unknown"),
    ],
)
def test_an_ipv6_address_counts_as_its_64(address: str, key: str) -> None:
    assert address_key(address) == key


def test_a_full_evicting_table_forgets_its_least_recently_used_key() -> None:
    limiter = RateLimiter[str](rate=1.0, burst=1.0, max_keys=3, evict_when_full=True)
    for name in ("a", "b", "c"):
        assert limiter.allow(name, 0.0)
    assert limiter.allow("newcomer", 0.5)  # a full table of refilling buckets refuses no one
    assert limiter.retry_after("another", 0.5) == 0.0
    assert len(limiter) == 3
    assert not limiter.allow("c", 0.5)  # the recently used keys are still limited
    assert not limiter.allow("newcomer", 0.5)


def test_an_evicting_backoff_blocks_no_newcomer_when_full() -> None:
    backoff = FailureBackoff[str](
        base_delay=10.0, max_delay=10.0, free_failures=0, max_keys=3, evict_when_full=True
    )
    for name in ("a", "b", "c"):
        backoff.record_failure(name, 0.0)
    assert backoff.blocked_for("newcomer", 1.0) == 0.0
    backoff.record_failure("d", 1.0)
    assert len(backoff) == 3
    assert backoff.blocked_for("d", 1.0) == 10.0
    assert backoff.blocked_for("c", 1.0) == 9.0


def test_a_flood_of_addresses_does_not_lock_everyone_out_of_a_node() -> None:
    # One party with a large IPv6 range fills the node's tables with drained buckets and
    # blocked addresses: the next client must still be served.
    limits = LocalLimits()
    rules = BackoffRules(base_delay=300.0, max_delay=300.0)
    for i in range(DEFAULT_MAX_KEYS + 10):
        flooder = f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::/64"
        limits.take("registrations_per_address", flooder, 1 / 3600, 1)
        limits.record_failure("signin_by_address", flooder, rules)
    assert limits.take("registrations_per_address", "198.51.100.9", 1 / 3600, 1)
    assert limits.failure_wait("signin_by_address", "198.51.100.9") == 0.0
