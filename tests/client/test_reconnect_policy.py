"""The reconnect backoff: pauses double up to a cap, are jittered within bounds, and start over."""

from __future__ import annotations

import pytest

from bastion.client import Backoff
from bastion.client.reconnect import secure_fraction


def test_the_ceiling_doubles_from_the_base_and_stops_at_the_cap() -> None:
    backoff = Backoff(base_s=1.0, cap_s=30.0, fraction=lambda: 1.0)
    assert [backoff.next_delay() for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.attempt == 8


def test_full_jitter_scales_the_ceiling_by_the_drawn_fraction() -> None:
    draws = iter([0.0, 0.5, 0.25, 1.0])
    backoff = Backoff(base_s=2.0, cap_s=100.0, fraction=lambda: next(draws))
    assert [backoff.next_delay() for _ in range(4)] == [0.0, 2.0, 2.0, 16.0]


def test_a_fraction_outside_zero_to_one_never_leaves_the_bounds() -> None:
    too_big = Backoff(base_s=1.0, cap_s=5.0, fraction=lambda: 7.0)
    too_small = Backoff(base_s=1.0, cap_s=5.0, fraction=lambda: -1.0)
    assert [too_big.next_delay() for _ in range(5)] == [1, 2, 4, 5, 5]
    assert [too_small.next_delay() for _ in range(5)] == [0, 0, 0, 0, 0]


def test_the_secure_jitter_stays_within_bounds_and_varies() -> None:
    backoff = Backoff(base_s=1.0, cap_s=30.0)
    for _ in range(6):
        backoff.next_delay()
    delays = []
    for _ in range(200):
        backoff.attempt = 6
        delays.append(backoff.next_delay())
    assert all(0.0 <= d <= 30.0 for d in delays)
    assert len(set(delays)) > 150  # drawn, not a constant
    assert min(secure_fraction() for _ in range(100)) >= 0.0
    assert max(secure_fraction() for _ in range(100)) <= 1.0


def test_a_connection_that_stayed_up_starts_the_pauses_over() -> None:
    backoff = Backoff(base_s=1.0, cap_s=30.0, stable_s=60.0, fraction=lambda: 1.0)
    for _ in range(5):
        backoff.next_delay()
    backoff.connected(1000.0)
    backoff.disconnected(1060.0)
    assert backoff.next_delay() == 1.0


def test_a_connection_that_dropped_at_once_keeps_the_pauses_growing() -> None:
    backoff = Backoff(base_s=1.0, cap_s=30.0, stable_s=60.0, fraction=lambda: 1.0)
    for _ in range(3):
        backoff.next_delay()
    backoff.connected(1000.0)
    backoff.disconnected(1001.0)  # accepted, then dropped: the server is not well yet
    assert backoff.next_delay() == 8.0
    backoff.disconnected(5000.0)  # no connection came up in between: nothing to reset
    assert backoff.next_delay() == 16.0


def test_many_attempts_never_overflow() -> None:
    backoff = Backoff(base_s=0.5, cap_s=30.0, fraction=lambda: 1.0)
    backoff.attempt = 10_000
    assert backoff.next_delay() == 30.0


@pytest.mark.parametrize(("base_s", "cap_s"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_a_nonsense_base_or_cap_is_refused(base_s: float, cap_s: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(base_s=base_s, cap_s=cap_s)
