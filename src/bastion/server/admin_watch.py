"""How the running server hears about ``bastion admin`` changes: a poll of ``admin_events``.

Every ``Limits.admin_poll_s`` seconds the server reloads the policy and applies
new admin events: a disabled user's connections are closed at once, and every
event is written to the audit log before it is marked handled. The operator
tables are reached through one worker thread, so the event loop never blocks
on the database.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from bastion.errors import BastionError
from bastion.server.admin import AdminDB, AdminEvent, Policy
from bastion.server.audit import AuditLog

log = logging.getLogger("bastion.server")

T = TypeVar("T")

SignOut = Callable[[str, str], int]


def audit_admin_event(audit: AuditLog, event: AdminEvent, *, now: float) -> None:
    """Write one admin event to the audit log. Raises :class:`StorageError`."""
    if event.action == "policy.set":
        key, _, value = event.target.partition("=")
        audit.append("policy.changed", now, setting=key, value=value, by="admin")
    else:
        audit.append("admin.action", now, action=event.action, target=event.target)


def audit_admin_events(db: AdminDB, audit: AuditLog, *, now: float) -> list[AdminEvent]:
    """Write every pending admin event to the audit log and mark it handled.

    Used by ``bastion admin`` itself when no server holds the log. Returns the
    events written. Raises :class:`StorageError`.
    """
    events = db.pending_events()
    for event in events:
        audit_admin_event(audit, event, now=now)
    if events:
        audit.flush()
        db.mark_handled([e.id for e in events])
    return events


class AdminChannel:
    """The server's side of the operator tables: policy, invites and the event poll."""

    def __init__(self, data_dir: Path, *, poll_s: float) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bastion-admin")
        self._db = self._executor.submit(AdminDB, data_dir).result()
        self.poll_s = poll_s
        self.policy = self._executor.submit(self._db.policy).result()
        self.queue_depth = 0

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self._executor.submit(fn))

    async def use_invite(self, code: str) -> bool:
        """Take one use of an invite code; False if unknown, used up or expired."""
        now_ms = time.time_ns() // 1_000_000
        return await self._call(lambda: self._db.use_invite(code, now_ms=now_ms))

    async def return_invite(self, code: str) -> None:
        """Give back an invite use after a registration that failed."""
        await self._call(lambda: self._db.return_invite(code))

    async def poll_once(self, audit: AuditLog | None, sign_out: SignOut) -> list[AdminEvent]:
        """Reload the policy, sign out newly disabled users, audit the events."""
        self.policy = await self._call(self._db.policy)
        self.queue_depth = await self._call(self._db.queue_depth)
        events = await self._call(self._db.pending_events)
        for event in events:
            if event.action == "user.disabled":
                closed = sign_out(event.target, "account disabled by the operator")
                log.info("admin.user_disabled", extra={"connections_closed": closed})
        if events:
            if audit is not None:
                now = time.time()
                for event in events:
                    audit_admin_event(audit, event, now=now)
                await self._call(audit.flush)
            await self._call(lambda: self._db.mark_handled([e.id for e in events]))
        return events

    async def run(
        self, audit: AuditLog | None, sign_out: SignOut, *, checkpoint_s: float = 60.0
    ) -> None:
        """Poll until cancelled; a failed poll is logged and retried.

        Also syncs the audit log each poll and signs a checkpoint every
        ``checkpoint_s`` seconds when records were added, so a running server's
        log is never long without a signature.
        """
        last_checkpoint = time.monotonic()
        while True:
            try:
                await self.poll_once(audit, sign_out)
                if audit is not None:
                    if time.monotonic() - last_checkpoint >= checkpoint_s:
                        last_checkpoint = time.monotonic()
                        audit.checkpoint(time.time())
                    await self._call(audit.flush)
            except BastionError as exc:
                log.error("admin.poll_failed", extra={"error": type(exc).__name__})
            await asyncio.sleep(self.poll_s)

    def current_policy(self) -> Policy:
        """The policy as of the last poll."""
        return self.policy

    def close(self) -> None:
        """Close the database and stop the worker thread."""
        self._executor.submit(self._db.close).result()
        self._executor.shutdown(wait=True)
