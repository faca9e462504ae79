"""Invitations to groups on the client: see them, accept (join) or decline.

Someone who is not your accepted contact (or anyone, to a group you left or
declined before) cannot simply put you in a group: the server keeps you out of
it, delivers nothing of it to you and lets no room key of it reach you until you
accept. An invitation arrives as a group item (shown as a
:class:`GroupInviteEvent`) and waits on the server until answered. Accepting
fetches and verifies the group's chain like any member's client.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from bastion.client import group_state
from bastion.client.events import Event, FeatureEvent
from bastion.client.feature import ClientCore, FeatureSpec, Hooks
from bastion.errors import ServerRefusedError, StateError
from bastion.groups import chain
from bastion.protocol import frames


@dataclass(frozen=True, slots=True)
class GroupInviteEvent(FeatureEvent):
    """An invitation to a group, as the server describes it (verified once accepted)."""

    group_id: str
    name: str
    inviter: str
    members: int
    at: int

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form."""
        when = datetime.datetime.fromtimestamp(self.at / 1000, datetime.UTC)
        return {
            "type": "group_invite",
            "group": self.group_id,
            "name": self.name,
            "by": self.inviter,
            "members": self.members,
            "at": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }

    def describe(self) -> str:
        """One sentence."""
        return (
            f"{self.inviter} invites you to the group {self.name!r} ({self.members} members);"
            f" bastion group accept {self.group_id[:16]} (or decline)"
        )


def _event(invite: frames.GroupInvite) -> GroupInviteEvent:
    return GroupInviteEvent(
        group_id=invite.group_id.hex(),
        name=invite.name,
        inviter=invite.inviter,
        members=invite.members,
        at=invite.at,
    )


def on_invite(deliver: frames.Deliver, item: frames.GroupItem) -> Event | None:
    """An invitation delivered to this device."""
    del deliver
    if not isinstance(item, frames.GroupInviteItem):
        return None
    return _event(item.invite)


def install(client: ClientCore, hooks: Hooks) -> None:
    """Show the invitations delivered to ``client`` (answering them is :func:`accept`'s)."""
    del client
    hooks.group_items.add(frames.GroupInviteItem, on_invite)


FEATURE = FeatureSpec("group_invites", install)


async def pending(client: ClientCore) -> list[GroupInviteEvent]:
    """The invitations that wait for this account's answer, oldest first."""
    reply = await client.request(frames.GroupInvites(req=0))
    if not isinstance(reply, frames.GroupInviteList):
        raise ServerRefusedError("bad_reply", "the server answered with something else")
    return [_event(invite) for invite in reply.invites]


def _find(invites: list[GroupInviteEvent], ref: str) -> GroupInviteEvent:
    by_id = [i for i in invites if len(ref) >= 8 and i.group_id.startswith(ref.lower())]
    matches = by_id or [i for i in invites if i.name == ref]
    if not matches:
        raise StateError(f"no invitation to a group called {ref!r}")
    if len(matches) > 1:
        raise StateError(f"several invitations are to groups called {ref!r}; use the group id")
    return matches[0]


async def accept(client: ClientCore, ref: str) -> chain.GroupState:
    """Join the group of an invitation (hex id, 8+ digit prefix, or name): its verified state.

    Raises StateError (no such invitation, or its chain does not verify),
    ServerRefusedError.
    """
    invite = _find(await pending(client), ref)
    group_id = bytes.fromhex(invite.group_id)
    await client.request(frames.GroupRespond(req=0, group_id=group_id, accept=True))
    client.notify(*await group_state.sync(client, group_id))
    state = group_state.state_of(client, group_id)
    if state is None or client.account.username not in state.members:
        raise StateError("the group's chain does not show you as a member")
    return state


async def decline(client: ClientCore, ref: str) -> GroupInviteEvent:
    """Decline an invitation (silently: the inviter is not told). Raises like :func:`accept`."""
    invite = _find(await pending(client), ref)
    group_id = bytes.fromhex(invite.group_id)
    await client.request(frames.GroupRespond(req=0, group_id=group_id, accept=False))
    return invite
