"""The operator tables (policy, invites, disabled users, admin events) as an interface.

The records and rules are in :mod:`bastion.server.admin.policy`; the adapters are
:mod:`bastion.server.storage.sqlite.admin` and :mod:`bastion.server.storage.postgres.admin`.
"""

from __future__ import annotations

from typing import Protocol

from bastion.server.admin.policy import AdminEvent, Policy, UserSummary


class AdminBackend(Protocol):
    """The operator tables as the server and ``bastion admin`` use them.

    :class:`~bastion.server.storage.sqlite.admin.SQLiteAdmin` for a single server,
    :class:`~bastion.server.storage.postgres.admin.PgAdmin`
    for a cluster. Methods raise :class:`StorageError` when the database fails and
    :class:`ConfigError` for a change they refuse.
    """

    async def source(self) -> str:
        """Names the database the event ids count in (a saved position is only valid there)."""
        ...

    async def policy(self) -> Policy:
        """The current policy (defaults for settings never set)."""
        ...

    async def set_policy(self, setting: str, *, now_ms: int) -> Policy:
        """Apply one ``KEY=VALUE`` setting; returns the new policy."""
        ...

    async def users(self) -> list[UserSummary]:
        """Every account, by name."""
        ...

    async def set_disabled(self, username: str, disabled: bool, *, now_ms: int) -> None:
        """Disable or enable an account; :class:`ConfigError` if there is none."""
        ...

    async def create_invite(self, *, uses: int, expires_at_ms: int, now_ms: int) -> str:
        """A new invite code good for ``uses`` registrations until ``expires_at_ms``."""
        ...

    async def use_invite(self, code: str, *, now_ms: int) -> bool:
        """Take one use of an invite; False if it is unknown, used up or expired."""
        ...

    async def return_invite(self, code: str) -> None:
        """Give back a use taken by a registration that then failed."""
        ...

    async def first_cursor(self) -> int:
        """The event id a node with no saved position starts after."""
        ...

    async def events_after(self, after_id: int, limit: int = 256) -> list[AdminEvent]:
        """Admin events with an id above ``after_id``, oldest first."""
        ...

    async def queue_depth(self) -> int:
        """Envelopes waiting in all device queues."""
        ...

    async def close(self) -> None:
        """Release the database."""
        ...
