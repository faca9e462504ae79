"""Contacts and presence: the list, requests and answers, blocking, setting and seeing presence."""

from __future__ import annotations

from typing import Any

from bastion.client import contacts, presence
from bastion.gateway.context import GatewayContext
from bastion.gateway.methods._base import ContextMethod
from bastion.gateway.rpc import Session


def contact_json(user: str, state: str) -> dict[str, Any]:
    """A contact's new state, as ``bastion contacts add|accept|... --json``."""
    return {"type": "contact", "user": user, "state": contacts.shown_state(state)}


async def contacts_list(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every contact with state, presence and note (fresh from the server when online)."""
    client = ctx.client
    listing = await contacts.sync(client) if ctx.online else contacts.local_contacts(client)
    return [c.to_json() for c in listing]


async def contacts_add(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Ask a user to be a contact, with an optional note they are told end to end."""
    ctx.require_online()
    state = await contacts.request(ctx.client, params["user"], params.get("note", ""))
    return contact_json(params["user"], state)


def _action(action: str) -> ContextMethod:
    async def run(ctx: GatewayContext, session: Session, params: dict[str, Any]) -> dict[str, Any]:
        ctx.require_online()
        return contact_json(params["user"], await contacts.act(ctx.client, params["user"], action))

    run.__doc__ = f"{action.capitalize()} a contact (see docs/gateway.md)."
    return run


async def presence_show(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """Your presence first, then each accepted contact's, as ``bastion presence --json``."""
    client = ctx.client
    mine = presence.own(client)
    events = await presence.watch(client) if ctx.online else presence.current(client)
    return [
        {"type": "presence_self", "state": mine.state, "status": mine.status},
        *(e.to_json() for e in events),
    ]


async def presence_set(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Set this account's presence; says which contacts could not be told."""
    ctx.require_online()
    state, status = params["state"], params.get("status")
    missed = await presence.set_presence(ctx.client, state, status)
    return {"type": "presence_set", "state": state, "status": status, "not_told": missed}


METHODS: dict[str, ContextMethod] = {
    "contacts.list": contacts_list,
    "contacts.add": contacts_add,
    **{f"contacts.{a}": _action(a) for a in ("accept", "decline", "remove", "block", "unblock")},
    "presence.show": presence_show,
    "presence.set": presence_set,
}
