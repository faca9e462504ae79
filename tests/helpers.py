"""Small helpers shared by the integration tests."""

from __future__ import annotations

import asyncio

from bastion.client.client import Client, Event, MessageEvent, WarningEvent


async def drain(client: Client) -> list[Event]:
    """Everything queued for the client when it signed in (it must have connected with receive)."""
    return [event async for event in client.receive(until_synced=True)]


async def next_events(client: Client, count: int, *, wait_s: float = 10.0) -> list[Event]:
    """The next ``count`` events of a live connection."""
    events: list[Event] = []

    async def collect() -> None:
        async for event in client.receive():
            events.append(event)
            if len(events) >= count:
                return

    await asyncio.wait_for(collect(), wait_s)
    return events


def texts(events: list[Event]) -> list[str]:
    """The texts of the message events, in order."""
    return [e.record.text for e in events if isinstance(e, MessageEvent)]


def warnings(events: list[Event]) -> list[WarningEvent]:
    """The warning events."""
    return [e for e in events if isinstance(e, WarningEvent)]
