"""The client as front ends get it: the core with every feature of this package installed.

Kept apart from ``bastion.client/__init__`` so that :mod:`bastion.client.devices`
(which builds clients when it links or imports a device) can use it without
importing the package that exports it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from bastion.client import client as core
from bastion.client import (
    contacts,
    files,
    group_invites,
    group_messages,
    message_actions,
    policy,
    presence,
    receipts,
    verification,
)
from bastion.client.events import ConnectionStateEvent, Event
from bastion.client.feature import Feature
from bastion.client.kept_connection import stay_connected
from bastion.client.profile import Profile
from bastion.client.reconnect import Backoff
from bastion.client.records import AccountInfo

# In the order they are installed (the order of today's hooks: policy checks on connect).
DEFAULT_FEATURES: tuple[Feature, ...] = (
    verification.FEATURE,
    receipts.FEATURE,
    policy.FEATURE,
    files.FEATURE,
    group_messages.FEATURE,
    group_invites.FEATURE,
    contacts.FEATURE,
    presence.FEATURE,
    message_actions.FEATURE,
)


class Client(core.Client):
    """The client core with :data:`DEFAULT_FEATURES` unless ``features`` says otherwise."""

    def __init__(
        self,
        profile: Profile,
        account: AccountInfo,
        *,
        features: Sequence[Feature] = DEFAULT_FEATURES,
    ) -> None:
        super().__init__(profile, account, features=features)

    def stay_connected(
        self,
        *,
        backoff: Backoff | None = None,
        sleep: Callable[[float], Awaitable[object]] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> AsyncIterator[Event | ConnectionStateEvent]:
        """Connect, receive, and reconnect with backoff when the connection is lost.

        See :func:`bastion.client.kept_connection.stay_connected` (what is
        retried, what ends it, and why nothing is lost or shown twice).
        """
        return stay_connected(self, backoff=backoff, sleep=sleep, clock=clock)


def open_client(path: Path, passphrase: str) -> Client:
    """Unlock the profile at ``path`` (see :meth:`Client.open`); raises ProfileError."""
    return Client.open(path, passphrase)
