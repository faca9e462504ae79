"""Commands through the profile's gateway when one runs: no passphrase, no second connection.

Each command states its two paths: ``via_gateway`` calls the gateway's methods,
whose results are the objects the command prints with ``--json``, and
``direct`` unlocks the profile and connects as without a gateway.
:func:`with_gateway_or_client` picks one: the gateway when it holds the
profile's gateway lock and answers on its socket, otherwise the direct path.
A command that must not go through the gateway (saving a blocked file, which
waits for the person's own "yes") passes ``via_gateway=None`` and works
directly; its connection then leaves receiving to the gateway (see
:func:`~bastion.cli._common.with_client`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bastion.cli._common import print_event, profile_dir, render_message
from bastion.client import (
    DevicesChangedEvent,
    Event,
    KeyChangedEvent,
    WarningEvent,
    contacts,
    files,
    group_invites,
    groups,
    presence,
    receipts,
    verification,
)
from bastion.errors import BastionError
from bastion.gateway import paths
from bastion.gateway.link import GatewayLink

PROBE_S = 2.0  # how long a running gateway has to answer before the command goes direct

ViaGateway = Callable[[GatewayLink], Awaitable[int]]
Direct = Callable[[], Awaitable[int]]


async def open_link(folder: Path) -> GatewayLink | None:
    """A link to the profile's gateway; None when none runs or it does not answer in time."""
    if not paths.gateway_running(folder):
        return None
    link: GatewayLink | None = None
    try:
        link = await asyncio.wait_for(GatewayLink.open(folder), PROBE_S)
        await asyncio.wait_for(link.call("status"), PROBE_S)
    except (OSError, TimeoutError, BastionError):
        if link is not None:
            await link.close()
        return None
    return link


def absolute(path: str | Path) -> str:
    """A path the user gave, made absolute here: the gateway's working folder is not theirs."""
    return str(Path(path).absolute())


def gateway_holds(args: argparse.Namespace) -> bool:
    """Whether a gateway holds the profile (running, whether or not its socket answers yet)."""
    return paths.gateway_running(profile_dir(args))


async def with_gateway_or_client(
    args: argparse.Namespace, *, via_gateway: ViaGateway | None, direct: Direct
) -> int:
    """Run the command through the running gateway if there is one, otherwise directly.

    A command the gateway gets a method for later changes from
    ``with_client(args, work)`` to::

        with_gateway_or_client(
            args, via_gateway=lambda link: ..., direct=lambda: with_client(args, work)
        )
    """
    link = await open_link(profile_dir(args)) if via_gateway is not None else None
    if link is None or via_gateway is None:
        return await direct()
    async with link:
        return await via_gateway(link)


# --- the gateway's events, shown as this process's own ------------------------------------------


def ms(at: Any) -> int:
    """An event's time (ISO 8601 as ``--json`` shows it, or milliseconds) in milliseconds."""
    if isinstance(at, int):
        return at
    if not isinstance(at, str):
        return 0
    return int(datetime.datetime.fromisoformat(at).timestamp() * 1000)


def event_of(obj: dict[str, Any]) -> Event | None:
    """The event a ``--json`` object describes, to show it as :func:`print_event` does.

    None for a message (see :func:`render_message`) or a kind this version does not know.
    """
    kind, at = obj.get("type"), ms(obj.get("at"))
    if kind == "key_changed":
        return KeyChangedEvent(user=obj["user"], at=at)
    if kind == "devices_changed":
        return DevicesChangedEvent(
            user=obj["user"],
            added=tuple(obj["added"]),
            removed=tuple(obj["removed"]),
            at=at,
            certified_at=tuple(ms(t) for t in obj["certified_at"]),
            own_account=bool(obj["own_account"]),
        )
    if kind == "warning":
        return WarningEvent(reason=obj["reason"], sender=obj["from"], device=obj["device"], at=at)
    if kind == "presence":
        return presence.PresenceEvent(
            user=obj["user"], state=obj["state"], status=obj["status"], at=at
        )
    if kind == "delivered":
        return receipts.DeliveredEvent(peer=obj["from"], ids=tuple(obj["ids"]), at=at)
    if kind == "contact_request":
        return contacts.ContactRequestEvent(user=obj["from"], note=obj["note"], at=at)
    if kind == "contact":
        return contacts.ContactChangedEvent(user=obj["user"], state=obj["state"], at=at)
    if kind == "verification_request":
        return verification.VerificationRequestEvent(
            user=obj["from"], device=obj["device"], txn=obj["txn"], at=at
        )
    if kind == "verification_cancelled":
        return verification.VerificationCancelledEvent(
            user=obj["from"], txn=obj["txn"], reason=obj["reason"]
        )
    if kind == "file":
        return files.FileEvent(
            id=obj["id"],
            sender=obj["from"],
            name=obj["name"],
            size=obj["size"],
            content_type=obj["content_type"],
            at=at,
        )
    if kind == "group_change":
        return groups.GroupChangeEvent(
            group_id=obj["group"],
            name=obj["name"],
            seq=obj["seq"],
            author=obj["by"],
            change=obj["change"],
            user=obj["user"],
            at=at,
        )
    if kind == "group_warning":
        return groups.GroupWarningEvent(group_id=obj["group"], reason=obj["reason"], at=at)
    if kind == "group_invite":
        return group_invites.GroupInviteEvent(
            group_id=obj["group"],
            name=obj["name"],
            inviter=obj["by"],
            members=obj["members"],
            at=at,
        )
    return None


def print_event_json(obj: dict[str, Any], as_json: bool, *, server_url: str | None = None) -> None:
    """Print an event the gateway published exactly as this process would print its own."""
    if as_json:
        print(json.dumps(obj), flush=True)
        return
    if obj.get("type") == "message":
        print(render_message(obj), flush=True)
        return
    try:
        event = event_of(obj)
    except (KeyError, TypeError, ValueError):
        event = None
    if event is None:
        # A kind this version cannot put in words: shown as it came, not dropped.
        print(json.dumps(obj), flush=True)
        return
    print_event(event, as_json, server_url=server_url)


def say(text: str) -> None:
    """A line about the command itself, on standard error."""
    print(text, file=sys.stderr, flush=True)
