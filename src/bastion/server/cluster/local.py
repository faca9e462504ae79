"""The message bus: how a stored envelope reaches the connection of its device.

In-process by default. A clustered deployment puts a bus between nodes with
the same interface, so the relay core never knows where a device is connected.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from bastion.protocol import frames
from bastion.ratelimit import BackoffRules, FailureBackoff, RateLimiter
from bastion.server.core.link_slots import LINK_TTL_S, MAX_LINK_SLOTS, LinkDeliver, LinkSlots, Owner
from bastion.server.storage.interfaces import QueuedEnvelope


@dataclass(frozen=True, slots=True)
class KeysLow:
    """The device's one-time key stock fell below the threshold."""

    count: int


@dataclass(frozen=True, slots=True)
class Kick:
    """Close the device's connection (signed in elsewhere, revoked, disabled)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Push:
    """A server push frame for the device, sent only if its connection asked for ``topic``."""

    topic: str
    frame: frames.Frame


@dataclass(frozen=True, slots=True)
class RateHandover:
    """A node left the device's message-rate bucket for the one holding it now to take."""


BusEvent = QueuedEnvelope | KeysLow | Kick | Push | RateHandover
Subscriber = Callable[[BusEvent], None]
PresenceLost = Callable[[list[str]], None]


class Bus(Protocol):
    """Routes events to whichever connection holds a device."""

    def subscribe(self, user: str, device_id: str, subscriber: Subscriber) -> None:
        """Receive the device's events; replaces an earlier subscriber of that device."""
        ...

    def unsubscribe(self, user: str, device_id: str, subscriber: Subscriber) -> None:
        """Stop receiving (no effect if ``subscriber`` was replaced meanwhile)."""
        ...

    def publish(self, user: str, device_id: str, event: BusEvent) -> None:
        """Hand an event to the device's subscriber, if it is connected anywhere."""
        ...

    # Presence: which users have a receiving connection on some node. A node reports
    # only its own first and last connection of each user.

    async def presence_up(self, user: str) -> bool:
        """This node now holds a connection of ``user``; True if no node did before."""
        ...

    async def presence_down(self, user: str) -> bool:
        """This node holds no connection of ``user`` any more; True if no node does."""
        ...

    async def online(self, users: Sequence[str]) -> set[str]:
        """Which of ``users`` some node holds a connection of."""
        ...

    def on_presence_lost(self, listener: PresenceLost) -> None:
        """Call ``listener`` with users whose last node vanished without telling (it died)."""
        ...

    async def take(self, limit: str, key: str, rate: float, burst: float) -> bool:
        """Take a token from the bucket ``(limit, key)`` shared by every node.

        The bucket holds ``burst`` tokens and refills at ``rate`` per second; False
        means the request is over the limit.
        """
        ...

    # A device's message rate moves with the device. Each node checks it in memory;
    # the node a signed-in connection closes on hands the bucket over, and the node
    # the device signs in on next takes it.

    async def hand_over_rate(
        self, user: str, device_id: str, tokens: float, rate: float, burst: float
    ) -> None:
        """Leave the device's bucket, holding ``tokens`` now, for the node it signs in on next.

        Kept until the bucket would be full again, on a clock every node shares. A
        node holding the device meanwhile is told with :class:`RateHandover`. Never
        raises: a bucket that cannot be left is lost.
        """
        ...

    async def take_rate(self, user: str, device_id: str, rate: float, burst: float) -> float | None:
        """Take the device's handed-over bucket: its tokens now, refilled since it was left.

        None if no bucket was left (or it would be full by now), or none can be
        fetched; the node then keeps what it counted itself. A bucket is taken once.
        """
        ...

    # Failure back-off shared by every node, with the rules of FailureBackoff.

    async def failure_wait(self, limit: str, key: str) -> float:
        """Seconds ``(limit, key)`` must still wait before its next attempt (0.0: go ahead)."""
        ...

    async def record_failure(self, limit: str, key: str, rules: BackoffRules) -> None:
        """Count a failure of ``(limit, key)`` and block it for the next delay.

        The rules are those of :class:`~bastion.ratelimit.FailureBackoff`; a limit
        is always used with the same ``rules``.
        """
        ...

    async def clear_failures(self, limit: str, key: str) -> None:
        """Forget the failures of ``(limit, key)`` (a success)."""
        ...

    # Link slots (see bastion.server.core.link_slots): the two connections of a link may
    # be on different nodes. Each raises LinkError when the link cannot go on.

    async def link_open(self, slot: bytes, owner: Owner, to_owner: LinkDeliver) -> None:
        """Open ``slot`` for the owning device; what the joiner sends goes to ``to_owner``."""
        ...

    async def link_join(self, slot: bytes, blob: bytes, to_joiner: LinkDeliver) -> None:
        """Take the slot's one joiner place and hand ``blob`` to its owner."""
        ...

    async def link_more(self, slot: bytes, owner: Owner, blob: bytes) -> None:
        """Hand ``blob`` to the joiner of the owner's slot, which stays open."""
        ...

    async def link_answer(self, slot: bytes, owner: Owner, blob: bytes) -> None:
        """Close the owner's joined slot and hand ``blob`` to the joiner."""
        ...


class LocalLimits:
    """Limits of one node: a :class:`RateLimiter` and a :class:`FailureBackoff` per limit name.

    Their keys (addresses, accounts) can be minted by anyone, so a full table forgets
    its least recently used key rather than refuse every newcomer (``evict_when_full``).
    """

    def __init__(self) -> None:
        self._limiters: dict[str, RateLimiter[str]] = {}
        self._backoffs: dict[str, FailureBackoff[str]] = {}

    def take(self, limit: str, key: str, rate: float, burst: float) -> bool:
        """See :meth:`Bus.take`, counted on this node only."""
        limiter = self._limiters.get(limit)
        if limiter is None:
            limiter = self._limiters[limit] = RateLimiter(rate, burst, evict_when_full=True)
        return limiter.allow(key, time.monotonic())

    def failure_wait(self, limit: str, key: str) -> float:
        """See :meth:`Bus.failure_wait`, for failures counted on this node."""
        backoff = self._backoffs.get(limit)
        return 0.0 if backoff is None else backoff.blocked_for(key, time.monotonic())

    def record_failure(self, limit: str, key: str, rules: BackoffRules) -> None:
        """See :meth:`Bus.record_failure`, counted on this node only."""
        backoff = self._backoffs.get(limit)
        if backoff is None:
            backoff = self._backoffs[limit] = rules.backoff(evict_when_full=True)
        backoff.record_failure(key, time.monotonic())

    def clear_failures(self, limit: str, key: str) -> None:
        """See :meth:`Bus.clear_failures`."""
        backoff = self._backoffs.get(limit)
        if backoff is not None:
            backoff.record_success(key)


class LocalBus:
    """The in-process bus of a single server node."""

    def __init__(
        self, *, link_ttl_s: float = LINK_TTL_S, max_link_slots: int = MAX_LINK_SLOTS
    ) -> None:
        self._subscribers: dict[tuple[str, str], Subscriber] = {}
        self._present: set[str] = set()
        self._limits = LocalLimits()
        self._links = LinkSlots(ttl_s=link_ttl_s, max_slots=max_link_slots)

    def subscribe(self, user: str, device_id: str, subscriber: Subscriber) -> None:
        """Receive the device's events; the earlier subscriber is told to close."""
        previous = self._subscribers.get((user, device_id))
        self._subscribers[(user, device_id)] = subscriber
        if previous is not None and previous is not subscriber:
            previous(Kick("signed in on another connection"))

    def unsubscribe(self, user: str, device_id: str, subscriber: Subscriber) -> None:
        """Stop receiving, unless another connection took over meanwhile."""
        if self._subscribers.get((user, device_id)) is subscriber:
            del self._subscribers[(user, device_id)]

    def publish(self, user: str, device_id: str, event: BusEvent) -> None:
        """Call the subscriber of that device synchronously, if any."""
        subscriber = self._subscribers.get((user, device_id))
        if subscriber is not None:
            subscriber(event)

    def connected(self) -> int:
        """How many devices are subscribed."""
        return len(self._subscribers)

    async def presence_up(self, user: str) -> bool:
        """True: one node, so this is the user's first connection."""
        first = user not in self._present
        self._present.add(user)
        return first

    async def presence_down(self, user: str) -> bool:
        """True: one node, so this was the user's last connection."""
        self._present.discard(user)
        return True

    async def online(self, users: Sequence[str]) -> set[str]:
        """Which of ``users`` have a connection here."""
        return {user for user in users if user in self._present}

    def on_presence_lost(self, listener: PresenceLost) -> None:
        """Never called: a single node cannot outlive itself."""

    async def take(self, limit: str, key: str, rate: float, burst: float) -> bool:
        """One node: its own buckets are the whole count."""
        return self._limits.take(limit, key, rate, burst)

    async def hand_over_rate(
        self, user: str, device_id: str, tokens: float, rate: float, burst: float
    ) -> None:
        """One node: its own bucket of the device stays, with nobody to hand it to."""

    async def take_rate(self, user: str, device_id: str, rate: float, burst: float) -> float | None:
        """None: one node, so the device's bucket never left it."""
        return None

    async def failure_wait(self, limit: str, key: str) -> float:
        """One node: its own back-off is the whole count."""
        return self._limits.failure_wait(limit, key)

    async def record_failure(self, limit: str, key: str, rules: BackoffRules) -> None:
        """Count the failure in this node's back-off."""
        self._limits.record_failure(limit, key, rules)

    async def clear_failures(self, limit: str, key: str) -> None:
        """Forget the key in this node's back-off."""
        self._limits.clear_failures(limit, key)

    async def link_open(self, slot: bytes, owner: Owner, to_owner: LinkDeliver) -> None:
        """Open the slot in this process's table."""
        self._links.open(slot, owner, to_owner, time.monotonic())

    async def link_join(self, slot: bytes, blob: bytes, to_joiner: LinkDeliver) -> None:
        """Join the slot and hand ``blob`` to its owner's connection here."""
        self._links.join(slot, to_joiner, time.monotonic())(blob)

    async def link_more(self, slot: bytes, owner: Owner, blob: bytes) -> None:
        """Hand ``blob`` to the joiner's connection here; the slot stays open."""
        self._links.more(slot, owner, time.monotonic())(blob)

    async def link_answer(self, slot: bytes, owner: Owner, blob: bytes) -> None:
        """Close the slot and hand ``blob`` to the joiner's connection here."""
        self._links.answer(slot, owner, time.monotonic())(blob)
