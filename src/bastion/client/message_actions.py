"""Reactions, edits and delete-for-everyone on the messages of a 1:1 conversation.

Each action is an ordinary signed, end-to-end encrypted payload that names the
message it changes by id (the server cannot tell it from a message):

- ``message.react`` ``{"id": ..., "emoji": "..."}``: the sender's one reaction
  to a message of the conversation; a new one replaces it, ``""`` removes it.
- ``message.edit`` ``{"id": ..., "text": "..."}``: the sender's new text for a
  message they sent; the earlier text is kept in the record's edit trail.
- ``message.delete`` ``{"id": ...}``: the sender deletes a message they sent,
  for everyone, at most :data:`DELETE_WINDOW_MS` after sending it. The record
  keeps a "deleted" marker and no text, trail or reactions; the profile
  overwrites the old row (SQLite ``secure_delete``, rollback journal, no WAL).

The receiving device applies an action only if the message is in its history,
in the conversation the payload was signed for, not deleted, and (for an edit
or a delete) sent by the payload's sender; a delete also must come within the
window by the sender's clock and by the server's. Anything else is rejected
like a bad payload: a warning, and nothing changes (docs/protocol.md §8.6).
"""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from bastion.client._util import check_username, now_ms
from bastion.client.events import Event, FeatureEvent
from bastion.client.feature import ClientCore, FeatureSpec, Hooks
from bastion.client.records import DeviceEntry, Edit, HistoryRecord
from bastion.crypto.payload import MAX_TEXT_CHARS, Payload, direct_conversation
from bastion.errors import RejectedMessageError
from bastion.protocol import frames

REACT = "message.react"
EDIT = "message.edit"
DELETE = "message.delete"
DELETE_WINDOW_MS = 24 * 3600 * 1000
"""How long after sending a message its sender may delete it for everyone (24 hours)."""
MAX_EMOJI_CHARS = 32
"""The longest reaction, in code points (a family emoji with skin tones fits)."""
MAX_EDITS = 100
"""The most edits one message keeps in its trail; later edits are refused."""

_HexId = Annotated[str, Meta(pattern=r"^[0-9a-f]{32}\Z")]


class ReactBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The JSON body of a reaction (``emoji`` empty: the reaction is taken back)."""

    id: _HexId
    emoji: Annotated[str, Meta(max_length=MAX_EMOJI_CHARS)]


class EditBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The JSON body of an edit."""

    id: _HexId
    text: Annotated[str, Meta(min_length=1, max_length=MAX_TEXT_CHARS)]


class DeleteBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The JSON body of a delete for everyone."""

    id: _HexId


@dataclass(frozen=True)
class MessageChangedEvent(FeatureEvent):
    """A message of the history was reacted to, edited or deleted (by ``by``).

    ``record`` is the message as it is stored now; ``emoji`` is the reaction
    (empty when it was taken back).
    """

    change: str  # reaction | edited | deleted
    by: str
    record: HistoryRecord
    emoji: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.change,
            "from": self.by,
            "id": self.record.id.hex(),
            "conversation": self.record.conversation,
        }
        if self.change == "reaction":
            out["emoji"] = self.emoji
        elif self.change == "edited":
            out["text"] = self.record.text
        return out

    def describe(self) -> str:
        ref = f"message {self.record.id.hex()}"
        if self.change == "reaction":
            if not self.emoji:
                return f"{self.by} took back their reaction to {ref}"
            return f"{self.by} reacted {self.emoji} to {ref}"
        if self.change == "edited":
            return f"{self.by} edited {ref}: {self.record.text}"
        return f"{self.by} deleted {ref}"


def install(client: ClientCore, hooks: Hooks) -> None:
    """Understand reactions, edits and deletes of 1:1 messages."""
    hooks.payloads.add(REACT, functools.partial(_on_action, client, REACT))
    hooks.payloads.add(EDIT, functools.partial(_on_action, client, EDIT))
    hooks.payloads.add(DELETE, functools.partial(_on_action, client, DELETE))


FEATURE = FeatureSpec("message_actions", install)


def check_emoji(emoji: str) -> str:
    """Return ``emoji`` if it can be a reaction; raise ValueError saying why not.

    One to :data:`MAX_EMOJI_CHARS` code points, none of them ASCII, a space,
    a control or formatting character (bidi overrides), except the zero-width
    joiner and tag characters that emoji sequences are made of.
    """
    if not emoji:
        raise ValueError("the reaction is empty")
    if len(emoji) > MAX_EMOJI_CHARS:
        raise ValueError(f"a reaction is at most {MAX_EMOJI_CHARS} characters")
    for char in emoji:
        code = ord(char)
        category = unicodedata.category(char)
        if code == 0x200D or 0xE0020 <= code <= 0xE007F:
            continue
        if code < 0x80 or category[0] in "CZ":
            raise ValueError("a reaction is an emoji: no letters, spaces or control characters")
    return emoji


async def react(client: ClientCore, peer: str, message_id: bytes, emoji: str) -> HistoryRecord:
    """React to a message of the conversation with ``peer`` (``""`` takes the reaction back).

    Returns the message as stored now. Raises ValueError (no such message here,
    a bad emoji, a deleted message), what sending raises (ServerRefusedError...).
    """
    if emoji:
        check_emoji(emoji)
    target = _target(client, peer, message_id)
    _check_or_value_error(REACT, target, client.account.username, target.conversation, now_ms())
    body = msgspec.json.encode(ReactBody(id=message_id.hex(), emoji=emoji)).decode()
    await client.send_payload(peer, REACT, body, history=False)
    return _store(client, message_id, lambda r: _with_reaction(r, client.account.username, emoji))


async def edit(client: ClientCore, peer: str, message_id: bytes, text: str) -> HistoryRecord:
    """Replace the text of a message this account sent to ``peer``; returns it as stored now.

    Raises ValueError (an empty or too long text, no such message, someone
    else's, deleted, or not yet on the server), what sending raises.
    """
    if not text:
        raise ValueError("the new text is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError("the message is longer than 16,000 characters")
    target = _target(client, peer, message_id)
    _check_or_value_error(EDIT, target, client.account.username, target.conversation, now_ms())
    body = msgspec.json.encode(EditBody(id=message_id.hex(), text=text)).decode()
    if len(body) > MAX_TEXT_CHARS:
        raise ValueError("the new text is too long to send; shorten it")
    await client.send_payload(peer, EDIT, body, history=False)
    at = now_ms()
    return _store(client, message_id, lambda r: _with_edit(r, text, at))


async def delete(
    client: ClientCore, peer: str, message_id: bytes, *, now: int | None = None
) -> HistoryRecord:
    """Delete a message this account sent to ``peer``, for everyone; returns the marker left.

    Allowed up to :data:`DELETE_WINDOW_MS` after it was sent (``now`` in epoch
    milliseconds, by default the clock). Raises ValueError (no such message,
    someone else's, already deleted, too old), what sending raises.
    """
    at = now_ms() if now is None else now
    target = _target(client, peer, message_id)
    _check_or_value_error(DELETE, target, client.account.username, target.conversation, at)
    body = msgspec.json.encode(DeleteBody(id=message_id.hex())).decode()
    await client.send_payload(peer, DELETE, body, history=False)
    return _store(client, message_id, lambda r: _deleted(r, at))


def _target(client: ClientCore, peer: str, message_id: bytes) -> HistoryRecord:
    check_username(peer)
    record = client.profile.message(message_id, HistoryRecord)
    if record is None or record.conversation != direct_conversation(client.account.username, peer):
        raise ValueError(f"no message with this id in the conversation with {peer}")
    return record


def _check_or_value_error(
    kind: str, target: HistoryRecord, sender: str, conversation: str, sent_at: int
) -> None:
    if target.direction == "out" and target.state not in ("sent", "delivered"):
        raise ValueError("that message has not reached the server yet")
    reason = _refusal(kind, target, sender, conversation, sent_at, server_ts=None)
    if reason is not None:
        raise ValueError(reason)


def _refusal(
    kind: str,
    target: HistoryRecord,
    sender: str,
    conversation: str,
    sent_at: int,
    *,
    server_ts: int | None,
) -> str | None:
    """Why ``sender`` may not apply ``kind`` to ``target`` (None: they may)."""
    if target.conversation != conversation:
        return "it changes a message of another conversation"
    if target.deleted_at:
        return "that message was deleted"
    if kind == REACT:
        return None
    if target.sender != sender:
        return "it changes a message someone else sent"
    if kind == EDIT:
        if len(target.edits) >= MAX_EDITS:
            return f"a message can be edited at most {MAX_EDITS} times"
        return None
    late = sent_at - target.sent_at > DELETE_WINDOW_MS
    if server_ts is not None and target.server_ts:
        late = late or server_ts - target.server_ts > DELETE_WINDOW_MS
    if late:
        return "a message can be deleted for everyone only within 24 hours of sending it"
    return None


def _on_action(
    client: ClientCore, kind: str, payload: Payload, sender: DeviceEntry, deliver: frames.Deliver
) -> Event | None:
    del sender
    body: ReactBody | EditBody | DeleteBody
    try:
        if kind == REACT:
            body = msgspec.json.decode(payload.body, type=ReactBody)
            if body.emoji:
                check_emoji(body.emoji)
        elif kind == EDIT:
            body = msgspec.json.decode(payload.body, type=EditBody)
        else:
            body = msgspec.json.decode(payload.body, type=DeleteBody)
    except (msgspec.MsgspecError, ValueError):
        raise RejectedMessageError(f"malformed {kind}") from None
    message_id = bytes.fromhex(body.id)
    target = client.profile.message(message_id, HistoryRecord)
    if target is None:
        raise RejectedMessageError(f"{kind} of a message not on this device")
    reason = _refusal(
        kind,
        target,
        payload.sender,
        payload.conversation,
        payload.sent_at,
        server_ts=deliver.server_ts,
    )
    if reason is not None:
        raise RejectedMessageError(f"{kind} refused: {reason}")
    if isinstance(body, ReactBody):
        changed = _with_reaction(target, payload.sender, body.emoji)
        change, emoji = "reaction", body.emoji
    elif isinstance(body, EditBody):
        changed = _with_edit(target, body.text, payload.sent_at)
        change, emoji = "edited", ""
    else:
        changed = _deleted(target, payload.sent_at)
        change, emoji = "deleted", ""
    # Runs inside the transaction that marks the payload seen (see bastion.client.feature).
    client.profile.update_message(message_id, changed)
    return MessageChangedEvent(change=change, by=payload.sender, record=changed, emoji=emoji)


def _store(client: ClientCore, message_id: bytes, change: Any) -> HistoryRecord:
    """Apply ``change`` to the stored record (read again: a receipt may have updated it)."""
    with client.profile.transaction():
        record = client.profile.message(message_id, HistoryRecord)
        if record is None:
            raise ValueError("the message is no longer in the history")
        changed: HistoryRecord = change(record)
        client.profile.update_message(message_id, changed)
    return changed


def _with_reaction(record: HistoryRecord, user: str, emoji: str) -> HistoryRecord:
    reactions = {k: v for k, v in record.reactions.items() if k != user}
    if emoji:
        reactions[user] = emoji
    return msgspec.structs.replace(record, reactions=reactions)


def _with_edit(record: HistoryRecord, text: str, at: int) -> HistoryRecord:
    trail = [*record.edits, Edit(text=record.text, replaced_at=at)]
    return msgspec.structs.replace(record, text=text, edits=trail, edited_at=at)


def _deleted(record: HistoryRecord, at: int) -> HistoryRecord:
    return msgspec.structs.replace(
        record,
        text="",
        edits=[],
        edited_at=0,
        reactions={},
        reply_to=None,
        deleted_at=max(at, 1),
    )
