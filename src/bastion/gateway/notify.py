"""Desktop notifications for what a person must not miss: messages, requests, key changes.

Through ``desktop-notifier`` (the freedesktop notification service over D-Bus on
Linux, the Notification Center on macOS, toasts on Windows). A notification
names who and what happened, never a message's text: the screen of a locked
machine, or a shared one, shows no content. Where the desktop offers no
notification service the gateway says so once and goes on without them;
``bastion gateway --no-notify`` turns them off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from desktop_notifier import DesktopNotifier, Urgency

from bastion.display import escape_text

log = logging.getLogger(__name__)
MAX_PENDING = 8  # notifications being handed to the desktop at once; more are dropped


def notification_for(event: dict[str, Any]) -> tuple[str, str, bool] | None:
    """(title, body, critical) for an event a person should be told about, or None."""
    kind = event.get("type")
    if kind == "message" and event.get("state") is None:
        conversation = str(event.get("conversation", ""))
        where = " in a group" if conversation.startswith("group:") else ""
        return (f"Bastion: {event.get('from', '')}", f"New message{where}", False)
    if kind == "contact_request":
        return (
            "Bastion: contact request",
            f"{event.get('from', '')} asks to be your contact",
            False,
        )
    if kind == "key_changed":
        user = event.get("user", "")
        return (
            f"Bastion: {user}'s key changed",
            f"Messages from {user} are held until you compare safety numbers.",
            True,
        )
    if kind == "devices_changed" and event.get("own_account") and event.get("added"):
        return (
            "Bastion: a new device on YOUR account",
            "If this was not you, revoke it now.",
            True,
        )
    if kind == "verification_request":
        return ("Bastion: verification", f"{event.get('from', '')} wants to verify with you", False)
    if kind == "group_invite":
        return ("Bastion: group invitation", "You were invited to a group", False)
    return None


class Notifier:
    """Shows notifications for published events; turns itself off if the desktop has none."""

    def __init__(self, account: str, backend: DesktopNotifier | None = None) -> None:
        self._account = account
        self._backend = backend if backend is not None else DesktopNotifier(app_name="Bastion")
        self._tasks: set[asyncio.Task[None]] = set()
        self.enabled = True

    def show(self, event: dict[str, Any]) -> None:
        """Hand the event's notification (if any) to the desktop, without waiting for it."""
        found = notification_for(event)
        if found is None or not self.enabled or len(self._tasks) >= MAX_PENDING:
            return
        title, body, critical = found
        task = asyncio.create_task(self._send(escape_text(title), escape_text(body), critical))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, title: str, body: str, critical: bool) -> None:
        try:
            await self._backend.send(
                title=title,
                message=body,
                urgency=Urgency.Critical if critical else Urgency.Normal,
            )
        except Exception as exc:
            if self.enabled:
                self.enabled = False
                log.warning(
                    "desktop notifications are off: the desktop offers none (%s)",
                    type(exc).__name__,
                )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
