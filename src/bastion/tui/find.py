"""Ctrl+F: search every conversation on this device and open the one a message is in.

The search itself is the client library's (:func:`bastion.client.search.messages`):
over the encrypted history of this device only, newest first. This screen asks
for the text, lists what was found with its conversation, and returns the
conversation chosen with the text, so the chat screen opens it filtered to the
messages that hold it.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, ListItem, ListView, Static

from bastion.client import HistoryRecord
from bastion.tui.conversations import format_time, safe_text

FIND_LIMIT = 50  # messages listed; a longer text narrows it down


class FoundItem(ListItem):
    """One message found: where it is, when, who, and its text on one line."""

    def __init__(self, record: HistoryRecord, where: str, when: str) -> None:
        super().__init__(classes="found")
        self.record = record
        self.where = where
        self.when = when

    def compose(self) -> ComposeResult:
        yield Label(self.describe(), markup=False)

    def describe(self) -> Text:
        """``#ops  14:02  alice: the text``, everything from others made safe."""
        who = "you" if self.record.direction == "out" else self.record.sender
        line = Text()
        line.append(safe_text(self.where), style="bold")
        line.append(f"  {self.when}  ", style="dim")
        line.append(safe_text(who))
        line.append(": " + safe_text(self.record.text))
        return line


class FindScreen(ModalScreen[tuple[str, str] | None]):
    """Asks for a text, lists the messages of every conversation that hold it.

    Returns ``(conversation key, text)`` of the message chosen, or None.
    ``find`` runs the search (raising ValueError for a text it refuses);
    ``name_of`` names a conversation key for the list.
    """

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(None)", "Close")]

    def __init__(
        self,
        find: Callable[[str], list[HistoryRecord]],
        name_of: Callable[[str], str],
        *,
        now_ms: int,
        tz: datetime.tzinfo | None = None,
    ) -> None:
        super().__init__()
        self.find = find
        self.name_of = name_of
        self.now_ms = now_ms
        self.tz = tz
        self.text = ""

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label("Search every conversation", classes="title")
            yield Input(placeholder="text to find, then Enter", id="find")
            yield Label("", id="find-result", markup=False)
            yield ListView(id="found")
            yield Static(
                "Searched on this device only. Up/Down choose, Enter opens, Esc closes.",
                classes="hint",
            )

    @on(Input.Submitted, "#find")
    def run_search(self, event: Input.Submitted) -> None:
        """List the messages that hold the text, newest first."""
        result = self.query_one("#find-result", Label)
        view = self.query_one("#found", ListView)
        view.clear()
        try:
            records = self.find(event.value)
        except ValueError as exc:
            result.update(str(exc))
            return
        self.text = event.value
        if not records:
            result.update("No message on this device holds that text.")
            return
        more = " (the newest; type more to narrow it down)" if len(records) >= FIND_LIMIT else ""
        result.update(f"{len(records)} found{more}")
        view.extend(
            FoundItem(
                r,
                self.name_of(r.peer),
                format_time(r.sent_at, now_ms=self.now_ms, tz=self.tz),
            )
            for r in records
        )
        view.index = 0
        view.focus()

    @on(ListView.Selected, "#found")
    def choose(self, event: ListView.Selected) -> None:
        """Open the conversation of the chosen message."""
        if isinstance(event.item, FoundItem):
            self.dismiss((event.item.record.peer, self.text))
