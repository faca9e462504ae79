"""When to try again after a connection was lost: exponential backoff with full jitter.

:class:`Backoff` is arithmetic only: it never sleeps and never reads a clock.
Whoever keeps the connection (:mod:`bastion.client.connection`) asks it for the
next pause and tells it, with times from its own clock, when a connection came
up and when it went down. The pause before attempt ``n`` (counting from 0) is
drawn uniformly from ``[0, min(cap_s, base_s * 2**n)]`` ("full jitter"), so
many clients that lost one server at the same moment do not all come back at
the same moment. A connection that stayed up for ``stable_s`` or longer starts
the count again; one that dropped sooner does not, so a server that accepts
and drops at once is not hammered.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

JITTER_STEPS = 1_000_000  # resolution of the jitter: a millionth of the largest pause


def secure_fraction() -> float:
    """A fraction in ``[0, 1]`` from the operating system's secure random source."""
    return secrets.randbelow(JITTER_STEPS + 1) / JITTER_STEPS


class Backoff:
    """How long to wait before the next connection attempt; see the module docstring.

    ``fraction`` draws the jitter (a float in ``[0, 1]``); tests pass a fixed one.
    Raises ValueError for a base or cap that is not positive, or a cap below the base.
    """

    def __init__(
        self,
        *,
        base_s: float = 1.0,
        cap_s: float = 30.0,
        stable_s: float = 60.0,
        fraction: Callable[[], float] = secure_fraction,
    ) -> None:
        if base_s <= 0 or cap_s < base_s:
            raise ValueError("the backoff needs 0 < base_s <= cap_s")
        self.base_s = base_s
        self.cap_s = cap_s
        self.stable_s = stable_s
        self._fraction = fraction
        self.attempt = 0  # failed attempts (or short-lived connections) since the last reset
        self._up_since: float | None = None

    def ceiling(self) -> float:
        """The largest pause the next :meth:`next_delay` may return."""
        # 2**attempt overflows a float long after it passed any cap: stop doubling at the cap.
        exponent = min(self.attempt, 64)
        return min(self.cap_s, self.base_s * 2.0**exponent)

    def next_delay(self) -> float:
        """The pause before the next attempt, in seconds; counts the attempt."""
        delay = self.ceiling() * min(1.0, max(0.0, self._fraction()))
        self.attempt += 1
        return delay

    def connected(self, now: float) -> None:
        """A connection came up at ``now`` (seconds on the caller's monotonic clock)."""
        self._up_since = now

    def disconnected(self, now: float) -> None:
        """The connection went down at ``now``: start over if it stayed up long enough."""
        if self._up_since is not None and now - self._up_since >= self.stable_s:
            self.reset()
        self._up_since = None

    def reset(self) -> None:
        """Forget earlier failures: the next pause is at most ``base_s`` again."""
        self.attempt = 0
