"""Live events, fanned out to every front end that subscribed.

The gateway publishes each event once, as the JSON object ``bastion listen
--json`` prints; each subscriber has its own bounded queue, so a slow front end
never holds up the connection or the others. One that falls :data:`QUEUE_LIMIT`
events behind is dropped with a last ``overflow`` event, and the door closes its
link: a front end learns it missed events instead of silently missing them
(it reads ``history`` again after subscribing anew).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

QUEUE_LIMIT = 10_000
OVERFLOW: dict[str, Any] = {
    "type": "overflow",
    "reason": "this front end fell too far behind; events were dropped: read history again",
}


class Subscription:
    """One subscriber's queue of events; iterate to receive them until closed."""

    def __init__(self, hub: EventHub) -> None:
        self._hub = hub
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUE_LIMIT + 1)
        self.overflowed = False

    def put(self, event: dict[str, Any]) -> None:
        if self.overflowed:
            return
        if self._queue.qsize() >= QUEUE_LIMIT:
            self.overflowed = True
            self._queue.put_nowait(OVERFLOW)
            self._queue.put_nowait(None)
            self._hub.unsubscribe(self)
            return
        self._queue.put_nowait(event)

    def close(self) -> None:
        """End the iteration (after what is queued) and leave the hub."""
        self._hub.unsubscribe(self)
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            event = await self._queue.get()
            if event is None:
                return
            yield event


class EventHub:
    """The set of subscriptions; :meth:`publish` copies an event to each."""

    def __init__(self) -> None:
        self._subs: set[Subscription] = set()

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def publish(self, event: dict[str, Any]) -> None:
        for sub in list(self._subs):
            sub.put(event)

    @property
    def count(self) -> int:
        return len(self._subs)
