"""The files part of the chat screen: send with progress, fetch and show the scan verdict."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, ListItem, ListView, ProgressBar, Static

from bastion.client import files
from bastion.errors import BastionError, KeyChangedError
from bastion.tui.base import ChatScreenBase
from bastion.tui.conversations import is_group, safe_text
from bastion.tui.screens import FileScreen


class FileActions(ChatScreenBase):
    """Ctrl+O offers a file to the open conversation; Ctrl+G fetches one offered there."""

    def review_key_change(self, user: str) -> None:
        """Show the key-change screen (the people part does)."""
        raise NotImplementedError

    def action_send_file(self) -> None:
        """Ctrl+O: ask for a file and send it to the open conversation."""
        peer = self.current
        if peer is None or is_group(peer):
            self.notify("Open a chat with one person first; files go to one person at a time.")
            return

        def chosen(path: str | None) -> None:
            if path:
                self.send_file(peer, Path(path).expanduser())

        self.app.push_screen(FileScreen(peer), chosen)

    @work(group="files")
    async def send_file(self, peer: str, path: Path) -> None:
        """Encrypt, upload (the bar shows progress) and offer the file."""
        bar = self.query_one("#transfer", ProgressBar)
        bar.update(total=None, progress=0)
        bar.display = True

        def progress(done: int, total: int) -> None:
            bar.update(total=total, progress=done)

        try:
            sent = await files.send_file(self.client, peer, path, progress=progress)
        except KeyChangedError:
            self.review_key_change(peer)
            return
        except (BastionError, ValueError, OSError) as exc:
            self.notify(f"File not sent: {exc}", severity="error", timeout=8)
            return
        finally:
            bar.display = False
        self.add_notice(peer, f"You sent {sent.name} ({files.human_size(sent.size)}).")

    def action_get_file(self) -> None:
        """Ctrl+G: download and scan a file offered in this conversation (asks which)."""
        offered = [
            r
            for r in files.list_files(self.client)
            if r.sender == self.current and r.state == "offered"
        ]
        if not offered:
            self.notify("No file waits in this conversation.")
            return
        if len(offered) == 1:
            self.get_file(offered[0].id)
            return

        def chosen(offer_id: str | None) -> None:
            if offer_id is not None:
                self.get_file(offer_id)

        self.app.push_screen(OfferScreen(offered), chosen)

    @work(group="files")
    async def get_file(self, offer_id: str) -> None:
        """Download into quarantine, scan, and save only if clean; say which."""
        folder = self.settings.downloads
        try:
            folder.mkdir(parents=True, exist_ok=True)
            result = await files.get_file(self.client, offer_id, folder)
        except (BastionError, ValueError, OSError) as exc:
            self.notify(f"File not fetched: {exc}", severity="error", timeout=8)
            return
        record = result.record
        if result.saved_to is not None:
            text = f"{record.name}: clean, saved to {result.saved_to}"
        else:
            why = "; ".join(result.verdict.reasons) or "the scan did not finish"
            text = f"{record.name}: BLOCKED ({result.verdict.kind}): {why}. It stays quarantined."
        self.add_notice(record.sender, text)


def offer_text(offer: files.FileRecord) -> str:
    """How a file offer reads in its conversation, with what became of it."""
    size = files.human_size(offer.size)
    if offer.state == "offered":
        return (
            f"{offer.sender} offers the file {offer.name!r} ({size}). "
            "Ctrl+G downloads and scans it."
        )
    return f"{offer.sender} offered the file {offer.name!r} ({size}): {offer.state}."


class OfferItem(ListItem):
    """One waiting file offer."""

    def __init__(self, offer: files.FileRecord) -> None:
        super().__init__()
        self.offer = offer

    def compose(self) -> ComposeResult:
        size = files.human_size(self.offer.size)
        yield Label(Text(f"{safe_text(self.offer.name)} ({size})"), markup=False)


class OfferScreen(ModalScreen[str | None]):
    """Which of the files offered in this conversation to fetch; returns its id or None."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, offers: list[files.FileRecord]) -> None:
        super().__init__()
        self.offers = offers

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Which file?", classes="title")
            yield ListView(*[OfferItem(o) for o in reversed(self.offers)], id="offers")
            yield Static("Up/Down choose, Enter fetches and scans it, Esc cancels.", classes="hint")

    @on(ListView.Selected, "#offers")
    def choose(self, event: ListView.Selected) -> None:
        """Return the chosen offer."""
        if isinstance(event.item, OfferItem):
            self.dismiss(event.item.offer.id)
