"""Widgets of the chat screen: conversation list items, message lines, the contact bar.

Everything from other people is rendered as plain :class:`rich.text.Text`, never
as markup, so a message cannot restyle the screen or fake a badge.
"""

from __future__ import annotations

import datetime

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Input, Label, ListItem, Static

from bastion.client import ContactRecord, HistoryRecord, groups
from bastion.tui.conversations import (
    ConversationEntry,
    delivery_label,
    format_time,
    lock_badge,
    safe_body,
    safe_text,
)

PRESENCE_GLYPHS = {"online": "●", "away": "◐", "busy": "◑", "offline": "○"}


class ConversationItem(ListItem):
    """One conversation in the list: presence, name, unread count."""

    def __init__(self, entry: ConversationEntry, *, presence: str | None = None) -> None:
        super().__init__(classes="conversation")
        self.entry = entry
        self.presence = presence

    def compose(self) -> ComposeResult:
        yield Label(self.describe(), markup=False)

    def describe(self) -> Text:
        """``● bob (2)``: presence glyph (blank when unknown), name, unread count."""
        glyph = PRESENCE_GLYPHS.get(self.presence or "", " ")
        prefix = "#" if self.entry.kind == "group" else glyph
        line = Text(f"{prefix} ")
        line.append(safe_text(self.entry.name), style="bold" if self.entry.unread else "")
        if self.entry.unread:
            line.append(f" ({self.entry.unread})", style="bold")
        return line


class RequestItem(ListItem):
    """A pending contact request in the list."""

    def __init__(self, user: str, note: str) -> None:
        super().__init__(classes="request")
        self.user = user
        self.note = note

    def compose(self) -> ComposeResult:
        yield Label(Text("? " + safe_text(self.user)), markup=False)


class MessageLine(Static):
    """One message: time, sender, text and (for our own) its delivery state."""

    def __init__(
        self, record: HistoryRecord, *, now_ms: int, tz: datetime.tzinfo | None = None
    ) -> None:
        super().__init__(classes=f"message {record.direction}")
        self.record = record
        self._now_ms = now_ms
        self._tz = tz
        self.update(self.render_text())

    def render_text(self) -> Text:
        """The line as the user reads it; the state is in words, so no colour is needed."""
        record = self.record
        when = format_time(record.sent_at, now_ms=self._now_ms, tz=self._tz)
        who = "you" if record.direction == "out" else record.sender
        text = Text()
        text.append(f"{when} ", style="dim")
        text.append(safe_text(who), style="bold")
        text.append(": ")
        text.append(safe_body(record.text))
        state = delivery_label(record)
        if state:
            style = "bold reverse" if record.state == "failed" else "dim italic"
            text.append(f"  ({state})", style=style)
        return text

    def set_record(self, record: HistoryRecord) -> None:
        """Show a newer version of the same message (its state changed)."""
        self.record = record
        self.update(self.render_text())


class MessageInput(Input):
    """The message line. ``?`` on an empty line opens the keys instead of being typed."""

    def check_consume_key(self, key: str, character: str | None) -> bool:
        """Let ``?`` reach the screen's help binding while nothing is typed yet."""
        if character == "?" and not self.value:
            return False
        return super().check_consume_key(key, character)


class NoticeLine(Static):
    """Something the app says inside a conversation (a rejected message, a key change)."""

    def __init__(self, text: str) -> None:
        super().__init__(Text("! " + safe_text(text)), classes="notice")


class ContactBar(Static):
    """The line above a conversation: who it is with and their lock badge."""

    def show(self, name: str, contact: ContactRecord | None, *, extra: str = "") -> None:
        """Show ``name`` with the badge for ``contact`` and what to do about it."""
        badge = lock_badge(contact)
        for style in ("verified", "unverified", "changed", "self"):
            self.set_class(style == badge.style, f"-{style}")
        line = Text()
        line.append(safe_text(name), style="bold")
        line.append(f" {badge.label} ")
        line.append(badge.advice)
        if extra:
            line.append(f"  {extra}")
        self.update(line)

    def show_group(self, state: groups.GroupState | None) -> None:
        """Show a group: its name, members, and that each message is signed by its sender."""
        for style in ("verified", "unverified", "changed", "self"):
            self.set_class(False, f"-{style}")
        line = Text()
        if state is None:
            line.append("This group is not known on this device.")
        else:
            line.append("#" + safe_text(state.name), style="bold")
            line.append(f" {len(state.members)} members: ")
            line.append(safe_text(", ".join(sorted(state.members))))
        self.update(line)
