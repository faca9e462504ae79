"""How a running node hears about ``bastion admin`` changes: a poll of ``admin_events``.

Every ``Limits.admin_poll_s`` seconds the node reloads the policy and reads the
events after the last one it applied: a disabled user's connections on this
node are closed at once, and every event is written to this node's audit log.
The position is saved in the node's data folder (:class:`EventCursor`) only
after the audit log holds the events, so a node that stops, or dies, catches
up on its next start; at worst an event is audited twice, never skipped. In a
cluster every node keeps its own position in the one shared event table.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

from bastion.errors import BastionError, StorageError
from bastion.server.admin.policy import AdminEvent, Policy
from bastion.server.storage import open_admin as open_admin_backend
from bastion.server.storage.admin import AdminBackend

log = logging.getLogger("bastion.server")

T = TypeVar("T")

SignOut = Callable[[str, str], int]

CURSOR_FILE = "admin-events.json"

# open_admin_backend is storage.open_admin, named here for ``bastion admin``.
__all__ = ["AdminAudit", "AdminChannel", "EventCursor", "audit_admin_event", "open_admin_backend"]


class AdminAudit(Protocol):
    """The audit log as the watcher writes to it.

    A :class:`~bastion.server.audit.log.AuditLog`, or
    :class:`~bastion.server.handlers._context.NullAudit` for none. Unlike the
    handlers' ``Audit.event``, a failed write raises: the position must not move
    past an event the log does not hold.
    """

    def append(self, event: str, now: float, **fields: object) -> object:
        """Append one record dated ``now``. Raises :class:`StorageError`."""
        ...

    def flush(self) -> None:
        """Force the appended records to disk. Raises :class:`StorageError`."""
        ...

    def checkpoint(self, now: float | None = None) -> object:
        """Sign the chain so far (nothing if nothing is new). Raises :class:`StorageError`."""
        ...


def audit_admin_event(audit: AdminAudit, event: AdminEvent, *, now: float) -> None:
    """Write one admin event to the audit log. Raises :class:`StorageError`."""
    if event.action == "policy.set":
        key, _, value = event.target.partition("=")
        audit.append("policy.changed", now, setting=key, value=value, by="admin")
    else:
        audit.append("admin.action", now, action=event.action, target=event.target)


class EventCursor:
    """The id of the last admin event this node applied and audited, in its data folder.

    Saved with the name of the database it counts in, so a node moved to
    another database starts afresh there instead of skipping its events.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / CURSOR_FILE

    def load(self, source: str) -> int | None:
        """The saved position for ``source``; None if there is none (or it is for another)."""
        try:
            saved = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {self.path.name}: {type(exc).__name__}") from None
        if not isinstance(saved, dict) or saved.get("source") != source:
            return None
        last = saved.get("last")
        if isinstance(last, bool) or not isinstance(last, int) or last < 0:
            raise StorageError(f"{self.path.name} does not hold an event position")
        return last

    def save(self, source: str, last: int) -> None:
        """Replace the saved position atomically and durably. Raises :class:`StorageError`."""
        temp = self.path.with_suffix(".tmp")
        try:
            with temp.open("w", encoding="utf-8") as out:
                json.dump({"source": source, "last": last}, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, self.path)
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            raise StorageError(f"cannot save {self.path.name}: {exc.strerror}") from None

    async def start(self, backend: AdminBackend) -> tuple[str, int]:
        """The database's name and the position to read from, saving a first one if needed."""
        source = await backend.source()
        last = self.load(source)
        if last is None:
            last = await backend.first_cursor()
            self.save(source, last)
        return source, last


async def audit_pending_events(
    backend: AdminBackend, cursor: EventCursor, audit: AdminAudit, *, now: float
) -> list[AdminEvent]:
    """Write the events after the saved position to the audit log and move past them.

    Used by ``bastion admin`` itself when no running node holds the log.
    Returns the events written. Raises :class:`StorageError`.
    """
    source, last = await cursor.start(backend)
    written: list[AdminEvent] = []
    while events := await backend.events_after(last):
        for event in events:
            audit_admin_event(audit, event, now=now)
        audit.flush()
        last = events[-1].id
        cursor.save(source, last)
        written.extend(events)
    return written


class AdminChannel:
    """The node's side of the operator tables: policy, invites and the event poll."""

    def __init__(
        self,
        backend: AdminBackend,
        cursor: EventCursor,
        source: str,
        last: int,
        policy: Policy,
        *,
        poll_s: float,
    ) -> None:
        self.backend = backend
        self._cursor = cursor
        self._source = source
        self._last = last
        self.policy = policy
        self.poll_s = poll_s
        self.count_queue = False  # the queue gauge costs a count; only metrics ask for it
        self.queue_depth = 0
        # Audit flushes and position saves touch the disk: never on the event loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bastion-audit")

    @classmethod
    async def open(cls, backend: AdminBackend, data_dir: Path, *, poll_s: float) -> AdminChannel:
        """Read the policy and this node's event position. Raises :class:`StorageError`."""
        cursor = EventCursor(data_dir)
        source, last = await cursor.start(backend)
        return cls(backend, cursor, source, last, await backend.policy(), poll_s=poll_s)

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self._executor.submit(fn))

    async def use_invite(self, code: str) -> bool:
        """Take one use of an invite code; False if unknown, used up or expired."""
        return await self.backend.use_invite(code, now_ms=time.time_ns() // 1_000_000)

    async def return_invite(self, code: str) -> None:
        """Give back an invite use after a registration that failed."""
        await self.backend.return_invite(code)

    async def poll_once(self, audit: AdminAudit, sign_out: SignOut) -> list[AdminEvent]:
        """Reload the policy, sign out newly disabled users, audit the events."""
        self.policy = await self.backend.policy()
        if self.count_queue:
            self.queue_depth = await self.backend.queue_depth()
        events = await self.backend.events_after(self._last)
        for event in events:
            if event.action == "user.disabled":
                closed = sign_out(event.target, "account disabled by the operator")
                log.info("admin.user_disabled", extra={"connections_closed": closed})
        if events:
            now = time.time()
            for event in events:
                audit_admin_event(audit, event, now=now)
            await self._call(audit.flush)
            last = events[-1].id
            await self._call(lambda: self._cursor.save(self._source, last))
            self._last = last
        return events

    async def run(
        self, audit: AdminAudit, sign_out: SignOut, *, checkpoint_s: float = 60.0
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

    async def close(self) -> None:
        """Release the database and stop the worker thread."""
        try:
            await self.backend.close()
        finally:
            self._executor.shutdown(wait=True)
