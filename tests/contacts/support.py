"""Helpers for the contact and presence tests: watching clients and timed event collection."""

from __future__ import annotations

import asyncio
import contextlib

from bastion.client import Client, Event, presence
from tests.conftest import Profiles


async def watching(profiles: Profiles, name: str) -> Client:
    """``name`` online, receiving, and asking for contact and presence pushes."""
    client = await profiles.online(name)
    await presence.watch(client)
    return client


async def events_within(client: Client, seconds: float) -> list[Event]:
    """Every event the client receives in the next ``seconds``."""
    events: list[Event] = []

    async def collect() -> None:
        async for event in client.receive():
            events.append(event)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(collect(), seconds)
    return events


async def next_of(client: Client, kind: type, *, wait_s: float = 10.0) -> Event:
    """The next event of type ``kind`` (others are skipped)."""

    async def find() -> Event:
        async for event in client.receive():
            if isinstance(event, kind):
                return event
        raise AssertionError("the connection closed")

    return await asyncio.wait_for(find(), wait_s)
