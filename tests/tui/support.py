"""Helpers for driving the chat app in tests."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from rich.text import Text
from textual.pilot import Pilot
from textual.widget import Widget

from bastion.client import Client, ContactRecord, HistoryRecord
from bastion.crypto.payload import direct_conversation
from bastion.tui.app import ChatApp
from bastion.tui.chat import ChatScreen
from bastion.tui.conversations import ConversationIndex
from bastion.tui.widgets import MessageLine

# 2026-03-14 15:30 UTC: the clock the snapshots are taken at.
FIXED_NOW = 1_773_502_200_000


def replace_account_on_server(data_dir: Path, username: str) -> None:
    """What a reinstall looks like to a stopped server: the account is gone, the name free."""
    with sqlite3.connect(data_dir / "bastion.db") as db:
        for table in ("one_time_keys", "queue", "devices", "accounts"):
            db.execute(f"DELETE FROM {table} WHERE username = ?", (username,))


def plain(widget: Widget) -> str:
    """What a Static or Label shows, without styles."""
    content = getattr(widget, "content", "")
    return content.plain if isinstance(content, Text) else str(content)


async def wait_until(
    pilot: Pilot[None], check: Callable[[], bool], *, what: str, wait_s: float = 15.0
) -> None:
    """Let the app run until ``check()`` holds; fail with ``what`` after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def chat_screen(app: ChatApp) -> ChatScreen:
    """The app's chat screen (it must be open)."""
    for screen in app.screen_stack:
        if isinstance(screen, ChatScreen):
            return screen
    raise AssertionError(f"no chat screen; stack is {app.screen_stack}")


def has_chat_screen(app: ChatApp) -> bool:
    """Whether the profile is open and the chat screen shown."""
    return any(isinstance(s, ChatScreen) for s in app.screen_stack)


def online(app: ChatApp) -> bool:
    """Whether the app says it is signed in."""
    if not has_chat_screen(app):
        return False
    return plain(chat_screen(app).query_one("#status")).endswith("· online")


def shown_texts(app: ChatApp) -> list[str]:
    """The texts of the visible message lines of the open conversation."""
    screen = chat_screen(app)
    return [line.record.text for line in screen.query(MessageLine) if line.display]


def seed_history(
    client: Client,
    peer: str,
    texts: list[tuple[str, str]],
    *,
    start_ms: int,
    step_ms: int = 60_000,
    state: str = "sent",
) -> None:
    """Put a conversation into the encrypted store: (direction, text) pairs, oldest first."""
    me = client.account.username
    conversation = direct_conversation(me, peer)
    index = ConversationIndex.load(client)
    with client.profile.transaction():
        for number, (direction, text) in enumerate(texts):
            at = start_ms + number * step_ms
            message_id = (f"{peer}:{number}").encode().ljust(16, b"\0")[:16]
            record = HistoryRecord(
                id=message_id,
                sender=me if direction == "out" else peer,
                device="DEVICE",
                peer=peer,
                conversation=conversation,
                text=text,
                sent_at=at,
                server_ts=at,
                direction=direction,
                state=state if direction == "out" else "received",
            )
            client.profile.add_message(conversation, message_id, record)
    index.touch(peer, at=start_ms + len(texts) * step_ms)
    index.save(client)


def pin(client: Client, user: str, trust: str, *, key: bytes) -> None:
    """Record a contact's key with a trust state, as earlier use would have."""
    pending = bytes(32) if trust == "changed" else None
    with client.profile.transaction():
        client.profile.put(
            "contact:" + user,
            ContactRecord(user=user, identity_key=key, trust=trust, pending_key=pending),
        )
