"""What the chat app shows, derived from the client library's records (no Textual here).

The conversation list lives in the encrypted profile next to the history, as one
record the app keeps up to date; a direct conversation is named by the other
person's username. Groups join the same list with ``kind="group"`` once the
groups feature exists on the client.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import msgspec

from bastion import display
from bastion.client import Client, ContactRecord, HistoryRecord, groups
from bastion.errors import StateError

INDEX_RECORD = "chat:conversations"
GROUP_PREFIX = "group:"  # usernames hold no ':', so a conversation key says what it is


class ConversationEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One line of the conversation list."""

    peer: str  # a username (direct) or ``group:<hex id>`` (group)
    kind: str = "direct"  # direct | group
    title: str = ""
    last_at: int = 0
    unread: int = 0

    @property
    def name(self) -> str:
        """What the list shows."""
        return self.title or self.peer


class ConversationIndex(msgspec.Struct, kw_only=True):
    """Every conversation this profile has seen, most recent first when listed."""

    entries: list[ConversationEntry] = msgspec.field(default_factory=list)

    @classmethod
    def load(cls, client: Client) -> ConversationIndex:
        """The stored list (empty for a new profile)."""
        return client.front_end_record(INDEX_RECORD, cls) or cls()

    def save(self, client: Client) -> None:
        """Store the list in the encrypted profile."""
        client.save_front_end_record(INDEX_RECORD, self)

    def find(self, peer: str) -> ConversationEntry | None:
        """The entry for ``peer``, if listed."""
        for entry in self.entries:
            if entry.peer == peer:
                return entry
        return None

    def ordered(self) -> list[ConversationEntry]:
        """Most recent activity first, then by name."""
        return sorted(self.entries, key=lambda e: (-e.last_at, e.name))

    def touch(
        self, peer: str, *, at: int, unread: bool = False, title: str | None = None
    ) -> ConversationEntry:
        """Record activity in a conversation (adding it if new); returns the new entry."""
        old = self.find(peer)
        kind = "group" if is_group(peer) else "direct"
        if old is None:
            entry = ConversationEntry(
                peer=peer, kind=kind, title=title or "", last_at=at, unread=int(unread)
            )
        else:
            self.entries.remove(old)
            entry = msgspec.structs.replace(
                old,
                title=old.title if title is None else title,
                last_at=max(old.last_at, at),
                unread=old.unread + int(unread),
            )
        self.entries.append(entry)
        return entry

    def mark_read(self, peer: str) -> bool:
        """Clear the unread count; True if it changed."""
        old = self.find(peer)
        if old is None or old.unread == 0:
            return False
        self.entries[self.entries.index(old)] = msgspec.structs.replace(old, unread=0)
        return True


def is_group(peer: str) -> bool:
    """Whether a conversation key names a group."""
    return peer.startswith(GROUP_PREFIX)


def group_state(client: Client, peer: str) -> groups.GroupState | None:
    """The verified state of the group a conversation key names (None if unknown)."""
    try:
        group_id = bytes.fromhex(peer.removeprefix(GROUP_PREFIX))
    except ValueError:
        return None
    return groups.state_of(client, group_id)


def conversation_history(client: Client, peer: str, *, limit: int) -> list[HistoryRecord]:
    """A direct or group conversation from the encrypted local store, oldest first."""
    if not is_group(peer):
        return client.history(peer, limit=limit)
    state = group_state(client, peer)
    return [] if state is None else groups.history(client, state, limit=limit)


async def send_to(client: Client, peer: str, text: str) -> HistoryRecord:
    """Send ``text`` to a person or a group; raises like the client library's senders."""
    if not is_group(peer):
        return await client.send_text(peer, text)
    state = group_state(client, peer)
    if state is None:
        raise StateError("this group is not known on this device")
    return await groups.send_text(client, state, text)


@dataclass(frozen=True, slots=True)
class Badge:
    """The lock badge of a contact: words first, so it reads without colour."""

    label: str
    style: str  # verified | unverified | changed | self
    advice: str


def lock_badge(contact: ContactRecord | None) -> Badge:
    """The badge for a contact record (None: no key pinned yet)."""
    if contact is None:
        return Badge("[no key yet]", "unverified", "Their key is fetched when you first send.")
    if contact.trust == "verified":
        return Badge("[verified]", "verified", "Safety numbers compared.")
    if contact.trust == "changed":
        return Badge(
            "[KEY CHANGED]",
            "changed",
            "Their account key changed. Messages are held. Press Ctrl+T to review.",
        )
    if contact.trust == "self":
        return Badge("[you]", "self", "Your own account.")
    return Badge("[unverified]", "unverified", "Ctrl+T compares safety numbers.")


DELIVERY_LABELS = {
    "pending": "sending…",
    "sent": "sent",
    "delivered": "delivered",  # shown once delivery receipts exist in the client library
    "failed": "NOT SENT",
    "received": "",
}


def delivery_label(record: HistoryRecord) -> str:
    """Sent/delivered state of a message, in words ('' for received ones)."""
    return DELIVERY_LABELS.get(record.state, record.state)


def format_time(ms: int, *, now_ms: int, tz: datetime.tzinfo | None = None) -> str:
    """``HH:MM`` for today, ``YYYY-MM-DD HH:MM`` otherwise (in ``tz``; local by default)."""
    when = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).astimezone(tz)
    today = datetime.datetime.fromtimestamp(now_ms / 1000, datetime.UTC).astimezone(tz)
    if when.date() == today.date():
        return f"{when:%H:%M}"
    return f"{when:%Y-%m-%d %H:%M}"


def matches(record: HistoryRecord, query: str) -> bool:
    """Whether a message matches a search (case-insensitive, in the text or sender)."""
    needle = query.casefold().strip()
    return not needle or needle in record.text.casefold() or needle in record.sender.casefold()


def safe_text(text: str) -> str:
    """Text from others made safe to put on a terminal, as one line.

    The rule every front end shares (:func:`bastion.display.escape_text`):
    controls (escape sequences among them), line breaks and bidirectional
    overrides are shown visibly (``\\x1b``, ``\\n``, ``⟨U+202E⟩``), never obeyed.
    """
    return display.escape_text(text)


def safe_body(text: str) -> str:
    """A message body made safe: lines kept, every line after the first marked as such."""
    return display.escape_body(text)
