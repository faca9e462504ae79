"""Link slots: pairing an existing device with a joining one, bounded in number and time.

A slot is opened by a signed-in device (its *owner*), takes one joining
connection, and is closed by the owner's answer. The server relays two sealed
blobs through it, and before the answer up to :data:`MAX_LINK_PIECES` sealed
pieces of history from the owner to the joiner; it sees nothing else (see
:mod:`bastion.crypto.linking`).
This is the slot table of one process; a cluster keeps it in Redis
(:mod:`bastion.server.cluster.redis.bus`) with the same rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bastion.errors import ProtocolError
from bastion.protocol.codes import ErrorCode

LINK_TTL_S = 600.0
MAX_LINK_SLOTS = 10_000
MAX_LINK_PIECES = 4096
"""The most history pieces (``link_more``, 64 KiB each at most) one slot relays."""

LinkDeliver = Callable[[bytes], None]
"""Hands a sealed link blob to one connection (nothing happens once it is closed)."""

Owner = tuple[str, str]
"""The owning device: (username, device id)."""


class LinkError(ProtocolError):
    """A link slot is unknown, expired, already used, not yours, or cannot be opened now."""

    code = ErrorCode.LINK_FAILED


UNKNOWN = "that link code is unknown, expired or already used"
NOT_WAITING = "no device is waiting on that link"
TOO_MANY_PIECES = "that link has carried as many pieces as it may"
BUSY = "cannot open a link now; try again"
UNAVAILABLE = "linking is unavailable right now; try again"


@dataclass
class LinkSlot:
    """One pending link between an existing device and a joining one."""

    owner: Owner
    to_owner: LinkDeliver
    expires_at: float
    to_joiner: LinkDeliver | None = None
    pieces: int = 0


class LinkSlots:
    """The link slots of one process, bounded in number and time.

    ``now`` is seconds on a monotonic clock, passed in.
    """

    def __init__(
        self,
        *,
        ttl_s: float = LINK_TTL_S,
        max_slots: int = MAX_LINK_SLOTS,
        max_pieces: int = MAX_LINK_PIECES,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_slots = max_slots
        self.max_pieces = max_pieces
        self._slots: dict[bytes, LinkSlot] = {}

    def _expire(self, now: float) -> None:
        for slot in [s for s, v in self._slots.items() if v.expires_at <= now]:
            del self._slots[slot]

    def open(self, slot: bytes, owner: Owner, to_owner: LinkDeliver, now: float) -> None:
        """Register a slot for ``owner`` (one per device: a new one replaces it).

        Raises :class:`LinkError` if the slot exists or the table is full.
        """
        self._expire(now)
        for key in [k for k, v in self._slots.items() if v.owner == owner]:
            del self._slots[key]
        if slot in self._slots or len(self._slots) >= self.max_slots:
            raise LinkError(BUSY)
        self._slots[slot] = LinkSlot(owner, to_owner, now + self.ttl_s)

    def join(self, slot: bytes, to_joiner: LinkDeliver, now: float) -> LinkDeliver:
        """Attach the joining connection and return the way to its owner; one joiner only.

        Raises :class:`LinkError` if the slot is unknown, expired or already joined.
        """
        self._expire(now)
        entry = self._slots.get(slot)
        if entry is None or entry.to_joiner is not None:
            raise LinkError(UNKNOWN)
        entry.to_joiner = to_joiner
        return entry.to_owner

    def more(self, slot: bytes, owner: Owner, now: float) -> LinkDeliver:
        """Return the way to the joiner for one more piece, leaving the slot open.

        Raises :class:`LinkError` if no device joined the owner's slot, or the
        slot already relayed ``max_pieces``.
        """
        self._expire(now)
        entry = self._slots.get(slot)
        if entry is None or entry.owner != owner or entry.to_joiner is None:
            raise LinkError(NOT_WAITING)
        if entry.pieces >= self.max_pieces:
            raise LinkError(TOO_MANY_PIECES)
        entry.pieces += 1
        return entry.to_joiner

    def answer(self, slot: bytes, owner: Owner, now: float) -> LinkDeliver:
        """Close the slot and return the way to the joiner; only the owner may answer.

        Raises :class:`LinkError` if no device joined the owner's slot.
        """
        self._expire(now)
        entry = self._slots.get(slot)
        if entry is None or entry.owner != owner or entry.to_joiner is None:
            raise LinkError(NOT_WAITING)
        del self._slots[slot]
        return entry.to_joiner
