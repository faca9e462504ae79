"""Invitations to groups on the relay: list them, accept (join) or decline.

An invitation is made when a change names someone who must consent first
(:mod:`bastion.server.handlers.groups`); it is queued to their devices as a group item
and kept until answered. Accepting makes them a joined member, from then on
delivered to like any other; declining is silent: to the group it looks like an
invitation never answered, and it stays so until an admin removes them.
"""

from __future__ import annotations

from bastion.protocol import frames
from bastion.protocol.codes import ErrorCode
from bastion.server.handlers._context import Route, Services
from bastion.server.handlers._request import Request
from bastion.server.handlers.groups import head_state


async def list_invites(request: Request, services: Services, frame: frames.GroupInvites) -> None:
    """Answer with the caller's invitations that wait for an answer, oldest first."""
    user, _ = request.signed_in()
    groups = services.groups
    max_members = services.limits.group_max_members
    invites = []
    for found in await groups.store.pending_invites(user, frames.MAX_GROUP_INVITES):
        state = await head_state(groups.store, found.group_id, max_members=max_members)
        if state is None or user not in state.members:
            continue
        invites.append(
            frames.GroupInvite(
                group_id=found.group_id,
                name=state.name,
                inviter=found.inviter,
                members=len(state.members),
                at=found.created_at,
            )
        )
    request.reply(frames.GroupInviteList(req=frame.req, invites=invites))


async def respond(request: Request, services: Services, frame: frames.GroupRespond) -> None:
    """Join a group one was invited to, or decline; ``no_invitation`` if none waits."""
    user, device = request.signed_in()
    groups = services.groups
    state = await head_state(
        groups.store, frame.group_id, max_members=services.limits.group_max_members
    )
    if state is None:
        request.refuse(
            frame.req, ErrorCode.NO_INVITATION, "no invitation to that group waits for you"
        )
        return
    notice = frames.GroupChangeItem(group_id=frame.group_id, seq=state.seq)
    envelopes = await groups.store.respond(
        frame.group_id,
        user,
        device,
        accept=frame.accept,
        server_ts=services.clock.now_ms(),
        item=frames.encode_item(notice),
    )
    if envelopes is None:
        request.refuse(
            frame.req, ErrorCode.NO_INVITATION, "no invitation to that group waits for you"
        )
        return
    request.reply(frames.Ok(req=frame.req))
    for envelope in envelopes:
        services.bus.publish(envelope.user, envelope.device_id, envelope)


ROUTES = (
    Route(frames.GroupInvites, list_invites),
    Route(frames.GroupRespond, respond),
)
