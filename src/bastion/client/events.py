"""What :meth:`Client.receive` yields: the events of the core and the base of features' events.

Every event is a plain value; none holds the client or a connection. A front
end tells them apart by type (``isinstance``), and shows a :class:`FeatureEvent`
through its own ``to_json`` and ``describe``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from bastion.client.records import HistoryRecord


@dataclass(frozen=True, slots=True)
class MessageEvent:
    """A message that passed every check (or a copy of one this account sent elsewhere)."""

    record: HistoryRecord
    verified: bool


@dataclass(frozen=True, slots=True)
class WarningEvent:
    """Something arrived that failed a check; it was dropped and counted."""

    reason: str
    sender: str
    device: str
    at: int


@dataclass(frozen=True, slots=True)
class KeyChangedEvent:
    """A contact's account key is not the pinned one; their messages wait until you decide."""

    user: str
    at: int


@dataclass(frozen=True, slots=True)
class DevicesChangedEvent:
    """A user's set of certified devices changed since we last looked."""

    user: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    at: int
    certified_at: tuple[int, ...] = ()  # when each added device was certified, in order
    own_account: bool = False  # the devices of this device's own account changed


@dataclass(frozen=True, slots=True)
class ConnectionStateEvent:
    """The kept connection came up, or was lost and is tried again (see ``stay_connected``).

    Not an :data:`Event` of the conversation: only ``stay_connected`` yields it.
    ``connected``: signed in and receiving; ``sent`` are kept and queued messages
    the server confirmed as the connection opened, ``failed`` those that cannot
    go out (refused for good, or the recipient's key changed).
    ``reconnecting``: the next attempt comes after ``retry_in_s`` seconds;
    ``reason`` says what went wrong (never message content), ``attempt`` counts
    the attempts since the last connection that stayed up.
    """

    state: Literal["connected", "reconnecting"]
    reason: str = ""
    retry_in_s: float = 0.0
    attempt: int = 0
    sent: tuple[HistoryRecord, ...] = ()
    failed: tuple[HistoryRecord, ...] = ()


class FeatureEvent:
    """Base of the events that features built on the core report (see :mod:`.feature`).

    Each kind says how a front end shows it: as one JSON object, and as a sentence.
    """

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form: a dict with a ``type`` key."""
        raise NotImplementedError

    def describe(self) -> str:
        """One sentence for a person."""
        raise NotImplementedError


Event = MessageEvent | WarningEvent | KeyChangedEvent | DevicesChangedEvent | FeatureEvent
