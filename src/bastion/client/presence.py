"""Presence on the client: online/offline from the server, away/busy and status end to end.

The server knows only whether an account has a receiving connection (it must,
to route) and whether it chose to be invisible; it tells accepted contacts
when that changes. Away, busy and the status text are sent as a
``presence.update`` Olm payload to each accepted contact, one by one, so only
current contacts can read them: a removed contact gets no further updates and
holds no key that would open them. (A Megolm session shared with contacts would
save work with many contacts but must be replaced on every removal; Olm needs
no such care, and the server already refuses sends to non-contacts.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec

from bastion.client import contacts
from bastion.client._util import json_object, now_ms
from bastion.client.events import FeatureEvent
from bastion.client.feature import ClientCore, FeatureSpec, Hooks
from bastion.client.records import DeviceEntry
from bastion.crypto.payload import Payload
from bastion.errors import RejectedMessageError, ServerRefusedError
from bastion.protocol import frames

UPDATE_KIND = "presence.update"
STATES = ("online", "away", "busy", "invisible")
SHARED_STATES = ("online", "away", "busy")
MAX_STATUS_CHARS = 140
_SELF = "presence.self"


class OwnPresence(msgspec.Struct, frozen=True, kw_only=True):
    """What this account last set."""

    state: str = "online"
    status: str | None = None


@dataclass(frozen=True, slots=True)
class PresenceEvent(FeatureEvent):
    """A contact's presence as it is to be shown now."""

    user: str
    state: str  # online | away | busy | offline
    status: str | None
    at: int

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form."""
        return {
            "type": "presence",
            "user": self.user,
            "state": self.state,
            "status": self.status,
            "at": contacts.iso(self.at),
        }

    def describe(self) -> str:
        """One sentence."""
        status = f" ({self.status})" if self.status else ""
        return f"{self.user} is {self.state}{status}"


def own(client: ClientCore) -> OwnPresence:
    """What this account last set (online with no status by default)."""
    return client.profile.get(_SELF, OwnPresence) or OwnPresence()


def _event(client: ClientCore, user: str, at: int) -> PresenceEvent:
    state, status = contacts.combined(
        contacts.buddy(client, user), contacts.presence_record(client, user)
    )
    return PresenceEvent(user=user, state=state, status=status, at=at)


def current(client: ClientCore) -> list[PresenceEvent]:
    """The presence of every accepted contact, as last heard."""
    now = now_ms()
    return [_event(client, user, now) for user in contacts.accepted(client)]


async def watch(client: ClientCore) -> list[PresenceEvent]:
    """Ask the server for contact and presence pushes on this connection; returns a snapshot.

    From then on :meth:`Client.receive` yields :class:`PresenceEvent` and
    contact events as they happen. Raises ServerRefusedError when disconnected.
    """
    reply = await client.request(frames.PresenceWatch(req=0))
    if not isinstance(reply, frames.ContactListResult):
        raise RejectedMessageError("the server answered a presence watch with something else")
    contacts.merge(client, reply)
    return current(client)


async def set_presence(client: ClientCore, state: str, status: str | None = None) -> list[str]:
    """Set this account's presence; returns the contacts the update could not reach.

    ``invisible`` shows the account offline to everyone (the server stops
    announcing it) and sends nothing else. Other states are sent end to end
    encrypted to every accepted contact. Raises ValueError for a bad state or a
    status past 140 characters, ServerRefusedError when the server refuses.
    """
    if state not in STATES:
        raise ValueError(f"presence is one of {', '.join(STATES)}")
    if status is not None and len(status) > MAX_STATUS_CHARS:
        raise ValueError(f"the status is longer than {MAX_STATUS_CHARS} characters")
    await client.request(frames.PresenceVisibility(req=0, invisible=state == "invisible"))
    with client.profile.transaction():
        client.profile.put(_SELF, OwnPresence(state=state, status=status))
    if state == "invisible":
        return []
    body = json.dumps({"state": state, "status": status})
    missed = []
    for user in [c.user for c in await contacts.sync(client) if c.state == "accepted"]:
        try:
            await client.send_payload(user, UPDATE_KIND, body, history=False)
        except ServerRefusedError as exc:
            if exc.code in ("disconnected", "timeout"):
                raise
            missed.append(user)  # removed us meanwhile, or no device: they see nothing
    return missed


def install(client: ClientCore, hooks: Hooks) -> None:
    """Register the presence payload kind and push handler for ``client``."""

    def on_update(
        payload: Payload, sender: DeviceEntry, deliver: frames.Deliver
    ) -> FeatureEvent | None:
        del sender
        user = payload.sender
        if user == client.account.username:
            return None  # our own copy, sent to our other devices
        raw = json_object(payload.body)
        state, status = raw.get("state"), raw.get("status")
        if state not in SHARED_STATES or not (
            status is None or (isinstance(status, str) and len(status) <= MAX_STATUS_CHARS)
        ):
            raise RejectedMessageError("malformed presence update")
        old = contacts.presence_record(client, user)
        if payload.sent_at < old.at:
            return None  # an older update delivered late
        contacts.put_presence(
            client,
            user,
            msgspec.structs.replace(old, state=state, status=status, at=payload.sent_at),
        )
        record = contacts.buddy(client, user)
        if record is None or record.state != "accepted":
            # Kept (this device may not have heard of the acceptance yet), never shown:
            # presence is shown only for contacts the list says are accepted.
            return None
        return _event(client, user, deliver.server_ts)

    async def on_changed(frame: frames.Frame) -> FeatureEvent | None:
        if not isinstance(frame, frames.PresenceChanged):
            return None
        with client.profile.transaction():
            record = contacts.buddy(client, frame.user)
            if record is None or record.state != "accepted":
                return None
            old = contacts.presence_record(client, frame.user)
            contacts.put_presence(
                client, frame.user, msgspec.structs.replace(old, online=frame.online)
            )
            return _event(client, frame.user, frame.at)

    hooks.payloads.add(UPDATE_KIND, on_update)
    hooks.pushes.add(frames.PresenceChanged, on_changed)


FEATURE = FeatureSpec("presence", install)
