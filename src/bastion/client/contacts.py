"""Contacts on the client: requests with an encrypted note, and the list kept in the profile.

The server keeps only each pair's state (it must, to route and to show presence);
the note of a request travels end to end encrypted as a ``contact.request``
payload, the one message the server lets a pending request carry. The client
keeps its own list (states, notes, what each contact's presence last said) in
the encrypted profile, and refreshes the states from the server with
:func:`sync`.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any, cast

import msgspec

from bastion.client._util import check_username, json_object, now_ms
from bastion.client.events import FeatureEvent
from bastion.client.feature import ClientCore, FeatureSpec, Hooks
from bastion.client.records import DeviceEntry
from bastion.crypto.payload import Payload
from bastion.errors import RejectedMessageError
from bastion.protocol import frames

MAX_NOTE_CHARS = 280
REQUEST_KIND = "contact.request"
ACTIONS = ("accept", "decline", "remove", "block", "unblock")
_INDEX = "contacts.index"


def iso(ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC."""
    when = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def shown_state(state: str) -> str:
    """A server state as users see it: ``pending_in`` becomes ``pending-in``."""
    return state.replace("_", "-")


class BuddyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One contact in the profile: the relation and the note of its request."""

    user: str
    state: str  # pending_in | pending_out | accepted | blocked (as the server names them)
    note: str = ""
    updated_at: int = 0


class PresenceRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What we last heard of a contact's presence: online from the server, the rest E2E."""

    online: bool = False
    state: str = "online"  # online | away | busy, as the contact set it
    status: str | None = None
    at: int = 0


@dataclass(frozen=True, slots=True)
class Contact:
    """A contact as a front end shows it."""

    user: str
    state: str  # pending-in | pending-out | accepted | blocked
    note: str
    presence: str  # online | away | busy | offline (offline unless accepted)
    status: str | None

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form."""
        return {
            "type": "contact",
            "user": self.user,
            "state": self.state,
            "note": self.note,
            "presence": self.presence,
            "status": self.status,
        }


@dataclass(frozen=True, slots=True)
class ContactRequestEvent(FeatureEvent):
    """Someone asked to become a contact, with a note only the two of you can read."""

    user: str
    note: str
    at: int

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form."""
        return {"type": "contact_request", "from": self.user, "note": self.note, "at": iso(self.at)}

    def describe(self) -> str:
        """One sentence."""
        note = f": {self.note}" if self.note else ""
        return f"{self.user} asks to be your contact{note} (bastion contacts accept {self.user})"


@dataclass(frozen=True, slots=True)
class ContactChangedEvent(FeatureEvent):
    """A contact's state changed (accepted, removed, or a change made on another device)."""

    user: str
    state: str  # as users see it, or "none"
    at: int

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form."""
        return {"type": "contact", "user": self.user, "state": self.state, "at": iso(self.at)}

    def describe(self) -> str:
        """One sentence."""
        if self.state == "none":
            return f"{self.user} is no longer in your contacts"
        return f"{self.user} is now {self.state} in your contacts"


# --- the list in the profile ------------------------------------------------------------------


def _names(client: ClientCore) -> list[str]:
    return client.profile.get(_INDEX, list[str]) or []


def buddy(client: ClientCore, user: str) -> BuddyRecord | None:
    """The profile's record of ``user``, if any."""
    record = client.profile.get("contacts.buddy:" + user, BuddyRecord)
    return None if record is None or record.state == "none" else record


def presence_record(client: ClientCore, user: str) -> PresenceRecord:
    """What we last heard of ``user``'s presence."""
    return client.profile.get("contacts.presence:" + user, PresenceRecord) or PresenceRecord()


def put_presence(client: ClientCore, user: str, record: PresenceRecord) -> None:
    """Store what we heard of ``user``'s presence (inside a profile transaction)."""
    client.profile.put("contacts.presence:" + user, record)


def _put(client: ClientCore, record: BuddyRecord | None, user: str) -> None:
    names = _names(client)
    if record is None:
        client.profile.put("contacts.buddy:" + user, BuddyRecord(user=user, state="none"))
        client.profile.put("contacts.presence:" + user, PresenceRecord())
        if user in names:
            client.profile.put(_INDEX, [n for n in names if n != user])
        return
    client.profile.put("contacts.buddy:" + user, record)
    if user not in names:
        client.profile.put(_INDEX, sorted([*names, user]))


def set_state(client: ClientCore, user: str, state: str, at: int) -> BuddyRecord | None:
    """Record the server's state for ``user`` (``none`` forgets them); inside a transaction."""
    if state == "none":
        _put(client, None, user)
        return None
    old = buddy(client, user)
    note = old.note if old is not None and state == "pending_in" else ""
    record = BuddyRecord(user=user, state=state, note=note, updated_at=at)
    _put(client, record, user)
    if state in ("none", "blocked"):
        client.profile.put("contacts.presence:" + user, PresenceRecord())
    return record


def combined(record: BuddyRecord | None, presence: PresenceRecord) -> tuple[str, str | None]:
    """The presence to show: offline unless an accepted contact the server says is online."""
    if record is None or record.state != "accepted" or not presence.online:
        return "offline", None
    return presence.state, presence.status


def local_contacts(client: ClientCore) -> list[Contact]:
    """The contact list as the profile holds it, sorted by name."""
    out = []
    for name in _names(client):
        record = buddy(client, name)
        if record is None:
            continue
        state, status = combined(record, presence_record(client, name))
        out.append(Contact(name, shown_state(record.state), record.note, state, status))
    return out


# --- talking to the server --------------------------------------------------------------------


async def _action(client: ClientCore, user: str, action: frames.ContactActionName) -> str:
    reply = await client.request(frames.ContactAction(req=0, user=user, action=action))
    if not isinstance(reply, frames.ContactResult) or reply.user != user:
        raise RejectedMessageError("the server answered a contact action for someone else")
    with client.profile.transaction():
        set_state(client, user, reply.state, now_ms())
    return str(reply.state)


async def request(client: ClientCore, user: str, note: str = "", *, notify: bool = True) -> str:
    """Ask ``user`` to become a contact; returns the new state as the server names it.

    With ``notify`` the note (at most 280 characters, possibly empty) is sent end
    to end encrypted, so the other side is told. Raises ValueError for a bad name
    or note, ServerRefusedError (``rate_limited``, ``unknown_user``, ``blocked``...).
    """
    check_username(user)
    if user == client.account.username:
        raise ValueError("you cannot be your own contact")
    if len(note) > MAX_NOTE_CHARS:
        raise ValueError(f"the note is longer than {MAX_NOTE_CHARS} characters")
    state = await _action(client, user, "request")
    if state == "pending_out":
        with client.profile.transaction():
            record = buddy(client, user)
            if record is not None:
                _put(client, msgspec.structs.replace(record, note=note), user)
        if notify:
            body = json.dumps({"note": note})
            await client.send_payload(user, REQUEST_KIND, body, history=False)
    return state


async def act(client: ClientCore, user: str, action: str) -> str:
    """Accept, decline, remove, block or unblock ``user``; returns the new state.

    Raises ValueError for an unknown action, ServerRefusedError if the server
    refuses (``no_request`` when accepting someone who did not ask).
    """
    check_username(user)
    if action not in ACTIONS:
        raise ValueError(f"unknown contact action {action!r}")
    return await _action(client, user, cast("frames.ContactActionName", action))


def merge(client: ClientCore, listing: frames.ContactListResult) -> list[Contact]:
    """Make the profile's list match the server's states (keeping notes and presence)."""
    now = now_ms()
    seen = set()
    with client.profile.transaction():
        for entry in listing.contacts:
            seen.add(entry.user)
            old = buddy(client, entry.user)
            if old is None or old.state != entry.state:
                set_state(client, entry.user, entry.state, now)
            if entry.state == "accepted":
                presence = presence_record(client, entry.user)
                if presence.online != entry.online:
                    put_presence(
                        client, entry.user, msgspec.structs.replace(presence, online=entry.online)
                    )
        for name in _names(client):
            if name not in seen:
                _put(client, None, name)
    return local_contacts(client)


async def sync(client: ClientCore) -> list[Contact]:
    """Fetch the server's contact list, update the profile, and return the list."""
    reply = await client.request(frames.ContactList(req=0))
    if not isinstance(reply, frames.ContactListResult):
        raise RejectedMessageError("the server answered a contact list with something else")
    return merge(client, reply)


def accepted(client: ClientCore) -> list[str]:
    """The accepted contacts, as the profile holds them."""
    return [c.user for c in local_contacts(client) if c.state == "accepted"]


# --- handlers ---------------------------------------------------------------------------------


def install(client: ClientCore, hooks: Hooks) -> None:
    """Register the contact payload kind and push handler for ``client``."""

    def on_request(
        payload: Payload, sender: DeviceEntry, deliver: frames.Deliver
    ) -> FeatureEvent | None:
        del sender
        user = payload.sender
        if user == client.account.username:
            return None  # our own copy, sent to our other devices
        note = json_object(payload.body).get("note")
        if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS:
            raise RejectedMessageError("malformed contact request")
        old = buddy(client, user)
        if old is not None and old.state != "pending_in":
            return None  # not a request we are waiting on: nothing to show
        at = deliver.server_ts
        _put(client, BuddyRecord(user=user, state="pending_in", note=note, updated_at=at), user)
        return ContactRequestEvent(user=user, note=note, at=at)

    async def on_changed(frame: frames.Frame) -> FeatureEvent | None:
        if not isinstance(frame, frames.ContactChanged):
            return None
        with client.profile.transaction():
            if frame.state == "pending_in" and buddy(client, frame.user) is not None:
                return None  # the encrypted request (with its note) already arrived
            set_state(client, frame.user, frame.state, frame.at)
        if frame.state == "pending_in":
            return None  # shown when the encrypted request with its note arrives
        return ContactChangedEvent(user=frame.user, state=shown_state(frame.state), at=frame.at)

    hooks.payloads.add(REQUEST_KIND, on_request)
    hooks.pushes.add(frames.ContactChanged, on_changed)


FEATURE = FeatureSpec("contacts", install)
