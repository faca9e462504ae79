"""What every part of the chat screen shares: the client, the settings, the open conversation.

The chat screen is assembled from parts by concept (people, files, the chat
itself); each part reaches the others only through the hooks declared here.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from textual.screen import Screen

from bastion.client import Client
from bastion.tui.conversations import ConversationIndex

PAGE = 100


@dataclass(frozen=True, slots=True)
class ChatSettings:
    """The app's clock, time zone, reconnect pause, downloads folder and bell."""

    clock: Callable[[], int]
    tz: datetime.tzinfo | None
    reconnect_delay_s: float
    downloads: Path
    bell: bool = True  # ring for a new message in a conversation not on screen


class ChatScreenBase(Screen[None]):
    """State shared by the parts of the chat screen, and the hooks between them."""

    def __init__(self, client: Client, settings: ChatSettings) -> None:
        super().__init__()
        self.client = client
        self.settings = settings
        self.index = ConversationIndex.load(client)
        self.current: str | None = None
        self.limit = PAGE
        self.key_change_open: set[str] = set()
        self.send_lock = asyncio.Lock()
        self.drafts: dict[str, str] = {}  # what was typed in a conversation not on screen
        self.notice_log: dict[str, list[tuple[int, str]]] = {}  # notices, kept per conversation

    def open_conversation(self, peer: str) -> None:
        """Show ``peer``'s conversation."""
        raise NotImplementedError

    def show_contact(self) -> None:
        """Redraw the contact bar and whether the input is open."""
        raise NotImplementedError

    def refresh_list(self) -> None:
        """Redraw the conversation list."""
        raise NotImplementedError

    def show_requests(self) -> None:
        """Redraw the pending contact requests."""
        raise NotImplementedError

    def add_notice(self, peer: str, text: str) -> None:
        """Say something inside ``peer``'s conversation."""
        raise NotImplementedError

    def reconnect(self) -> None:
        """Sign in again (held messages are delivered again on a new sign-in)."""
        raise NotImplementedError
