"""The files part of the chat screen: send with progress, fetch and show the scan verdict."""

from __future__ import annotations

from pathlib import Path

from textual import work
from textual.widgets import ProgressBar

from bastion.client import files
from bastion.errors import BastionError, KeyChangedError
from bastion.tui.base import ChatScreenBase
from bastion.tui.conversations import is_group
from bastion.tui.screens import FileScreen


class FileActions(ChatScreenBase):
    """Ctrl+F sends a file to the open conversation; Ctrl+G fetches the newest one offered."""

    def review_key_change(self, user: str) -> None:
        """Show the key-change screen (the people part does)."""
        raise NotImplementedError

    def action_send_file(self) -> None:
        """Ctrl+F: ask for a file and send it to the open conversation."""
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
        """Ctrl+G: download and scan the newest file offered in this conversation."""
        offered = [
            r
            for r in files.list_files(self.client)
            if r.sender == self.current and r.state == "offered"
        ]
        if not offered:
            self.notify("No file waits in this conversation.")
            return
        self.get_file(offered[-1].id)

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
