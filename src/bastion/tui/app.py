"""``bastion chat``: the terminal app. Unlocks (or creates) a profile, then shows the chat."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import platformdirs
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Static

from bastion.client import Client, now_ms
from bastion.errors import ProfileError
from bastion.tui.base import ChatSettings
from bastion.tui.chat import ChatScreen
from bastion.tui.screens import FirstRunScreen, UnlockScreen


class ChatApp(App[None]):
    """The Bastion terminal app for one profile folder."""

    CSS_PATH = "chat.tcss"
    TITLE = "Bastion"
    ENABLE_COMMAND_PALETTE = False  # Ctrl+P sets presence here
    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+q", "quit", "Quit", priority=True)]

    def __init__(
        self,
        profile: Path,
        *,
        passphrase: str | None = None,
        clock: Callable[[], int] = now_ms,
        tz: datetime.tzinfo | None = None,
        reconnect_delay_s: float = 2.0,
        downloads: Path | None = None,
        bell: bool = True,
    ) -> None:
        super().__init__()
        self.profile_path = profile
        self.passphrase = passphrase
        self.settings = ChatSettings(
            clock=clock,
            tz=tz,
            reconnect_delay_s=reconnect_delay_s,
            downloads=downloads or Path(platformdirs.user_downloads_dir()),
            bell=bell,
        )
        self.client: Client | None = None

    def compose(self) -> ComposeResult:
        yield Static("Bastion", id="splash")

    def on_mount(self) -> None:
        if not Client.profile_exists(self.profile_path):
            self.push_screen(
                FirstRunScreen(self.profile_path, passphrase=self.passphrase), self.opened
            )
        elif self.passphrase:
            try:
                client = Client.open(self.profile_path, self.passphrase)
            except ProfileError as exc:
                self.push_screen(UnlockScreen(self.profile_path, error=str(exc)), self.opened)
            else:
                self.opened(client)
        else:
            self.push_screen(UnlockScreen(self.profile_path), self.opened)

    def opened(self, client: Client | None) -> None:
        """The profile is open: show the chat."""
        if client is None:
            self.exit()
            return
        self.client = client
        self.push_screen(ChatScreen(client, self.settings))

    async def on_unmount(self) -> None:
        if self.client is not None:
            await self.client.close()


def run(profile: Path, *, passphrase: str | None = None, bell: bool = True) -> int:
    """Run the app in this terminal until the user quits (``bell``: ring for new messages)."""
    ChatApp(profile, passphrase=passphrase, bell=bell).run()
    return 0
