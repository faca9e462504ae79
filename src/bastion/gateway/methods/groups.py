"""Group chats: the list, create and change, members' devices, send and history, invitations.

Every answer is the object ``bastion group ... --json`` prints, built by the same
function. What a change or a sync of the chain learned (a member added by
someone else, a forged change refused) goes to the subscribed front ends as
``group_change`` and ``group_warning`` events, as ``bastion group`` prints them.
"""

from __future__ import annotations

from typing import Any

from bastion.cli._common import event_json, iso, message_json
from bastion.cli.groups import declined_json, group_info_json, group_json, group_sent_json
from bastion.client import group_invites, groups
from bastion.gateway.context import GatewayContext
from bastion.gateway.methods._base import ContextMethod
from bastion.gateway.rpc import Session


def publish_notices(ctx: GatewayContext) -> None:
    """Send what a group operation learned to the subscribed front ends, and take it off.

    Device changes stay in the client's notices: the receive loop shows those.
    """
    kept = []
    for event in ctx.client.notices:
        if isinstance(event, groups.GroupWarningEvent | groups.GroupChangeEvent):
            ctx.hub.publish(event_json(event))
        else:
            kept.append(event)
    ctx.client.notices[:] = kept


async def groups_list(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every group this device knows, by name (from the encrypted local store)."""
    return [group_json(state) for state in groups.groups(ctx.client)]


async def groups_create(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Create a group with this account as its admin and the given members."""
    ctx.require_online()
    state = await groups.create(ctx.client, params["name"], params.get("members", []))
    publish_notices(ctx)
    return group_json(state)


async def groups_show(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Members, admins and each member's devices, after a sync of the chain when online."""
    client = ctx.client
    group = groups.resolve(client, params["group"])
    if ctx.online:
        client.notices.extend(await groups.sync(client, group.group_id))
        publish_notices(ctx)
    state = groups.state_of(client, group.group_id) or group
    return group_info_json(client, state)


async def groups_changes(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """The group's signed change history (its verified chain), oldest first."""
    client = ctx.client
    group = groups.resolve(client, params["group"])
    return [
        {**event.to_json(), "at": iso(event.at)}
        for event in groups.change_log(client, group.group_id)
    ]


def _change(action: str) -> ContextMethod:
    """A method that makes one signed change to a group's chain and answers its new state."""

    async def run(ctx: GatewayContext, session: Session, params: dict[str, Any]) -> dict[str, Any]:
        ctx.require_online()
        client = ctx.client
        group = groups.resolve(client, params["group"])
        if action == "add":
            state = await groups.add_member(client, group, params["user"])
        else:
            state = await groups.change(client, group, _member_change(action, params))
        publish_notices(ctx)
        return group_json(state)

    run.__doc__ = f"The {action} change to a group (see docs/gateway.md)."
    return run


def _member_change(action: str, params: dict[str, Any]) -> groups.MemberChange:
    if action == "remove":
        return groups.RemoveMember(user=params["user"])
    if action == "leave":
        return groups.Leave()
    if action == "rename":
        return groups.Rename(name=params["name"])
    if action == "promote":
        return groups.Promote(user=params["user"])
    return groups.Demote(user=params["user"])


async def groups_send(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Send a text to every member's devices under the group's room key."""
    ctx.require_online()
    client = ctx.client
    group = groups.resolve(client, params["group"])
    record = await groups.send_text(client, group, params["text"])
    publish_notices(ctx)
    return group_sent_json(record)


async def groups_history(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """A group's conversation from the encrypted local store, oldest first.

    ``verified`` is whether its sender is a contact this account verified.
    """
    client = ctx.client
    group = groups.resolve(client, params["group"])
    out = []
    for record in groups.history(client, group, limit=params.get("limit", 1000)):
        contact = client.contact(record.sender)
        out.append(message_json(record, contact is not None and contact.trust == "verified"))
    return out


async def groups_invites(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """The invitations waiting for this account's answer, oldest first."""
    ctx.require_online()
    return [invite.to_json() for invite in await group_invites.pending(ctx.client)]


async def groups_accept(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Join the group of an invitation: its verified state."""
    ctx.require_online()
    state = await group_invites.accept(ctx.client, params["group"])
    publish_notices(ctx)
    return group_json(state)


async def groups_decline(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Decline an invitation; the inviter is not told."""
    ctx.require_online()
    return declined_json(await group_invites.decline(ctx.client, params["group"]))


METHODS: dict[str, ContextMethod] = {
    "groups.list": groups_list,
    "groups.create": groups_create,
    "groups.show": groups_show,
    "groups.changes": groups_changes,
    **{
        f"groups.{a}": _change(a) for a in ("add", "remove", "promote", "demote", "rename", "leave")
    },
    "groups.send": groups_send,
    "groups.history": groups_history,
    "groups.invites": groups_invites,
    "groups.accept": groups_accept,
    "groups.decline": groups_decline,
}
