"""The delivery window of one receiving connection, without I/O.

A device receives its queue in order, by ``seq``. Live envelopes are pushed as
the bus announces them; anything else is read from the store in pages after
the cursor. At most ``size`` envelopes are unacknowledged at a time: the rest
wait in the store, not in memory.

:class:`DeliveryWindow` holds that state and takes the decisions; the
connection does the I/O it asks for (send a ``deliver``, read a page, send
``synced``). Events in, decisions out, in the style of h11: no asyncio, no
clock and no store in here (tests/server/test_delivery.py drives it alone).

The state:

- ``cursor``: the highest ``seq`` sent (or known to be unacknowledged) on this
  connection; a page is read after it.
- ``unacked``: what was sent and not yet acknowledged.
- ``reading``: a page reader runs (one at a time); what the bus announces
  meanwhile is left to it.
- ``dirty``: envelopes after the cursor may wait in the store (a notice came
  while reading or while the window was full, the cursor went back, or a read
  was cut short). While it holds, nothing is pushed past them: a reader starts
  once half the window is free, on an acknowledgement or on the next notice.
- ``synced``: ``synced`` was sent (once per connection).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, Protocol, TypeVar

FETCH_PAGE = 256  # at most this many envelopes per read of the store


class Sequenced(Protocol):
    """What the window needs of an envelope: its place in the device's queue."""

    @property
    def seq(self) -> int: ...


E = TypeVar("E", bound=Sequenced)


class Step(enum.Enum):
    """What the connection does about a notice from the bus."""

    WAIT = "wait"  # nothing now: a reader or an acknowledgement takes it from here
    PUSH = "push"  # send this envelope (the window counts it as sent)
    READ = "read"  # start a reader: the store has envelopes to send in order


class PageRead(NamedTuple):
    """Read at most ``limit`` envelopes after ``after`` from the device's queue."""

    after: int
    limit: int


@dataclass(frozen=True, slots=True)
class Page(Generic[E]):
    """What to do with a page read from the store."""

    push: list[E]  # send these, in this order (the window counts them as sent)
    synced: bool = False  # then send ``synced``
    more: bool = False  # then read again (:meth:`DeliveryWindow.next_read`)


@dataclass(slots=True)
class DeliveryWindow:
    """Cursor, unacknowledged envelopes and read decisions of one receiving connection."""

    size: int  # at most this many unacknowledged envelopes
    page: int = FETCH_PAGE
    cursor: int = 0
    unacked: set[int] = field(default_factory=set)
    reading: bool = False
    dirty: bool = False
    synced: bool = False

    def start_reading(self) -> bool:
        """Ask for a reader; True if the connection must start one (none runs yet)."""
        if self.reading:
            return False
        self.reading = True
        return True

    def notice(self, seq: int) -> Step:
        """The bus announced envelope ``seq`` for this device."""
        if seq <= self.cursor and seq not in self.unacked:
            # Overtaken by a later envelope (stored through another node or another
            # database connection): re-read from just before it rather than skip it.
            return Step.READ if self.rewind(seq - 1) else Step.WAIT
        if self.reading or len(self.unacked) >= self.size:
            self.dirty = True
            return Step.WAIT
        if self.dirty:
            # Envelopes before this one may wait in the store: pushing it would send
            # it ahead of them and move the cursor past them. They are read first, in
            # order, once half the window is free (as after an acknowledgement).
            if len(self.unacked) <= self.size // 2:
                self.reading = True
                return Step.READ
            return Step.WAIT
        if seq > self.cursor:
            self._sent(seq)
            return Step.PUSH
        return Step.WAIT  # already sent and not yet acknowledged

    def rewind(self, after_seq: int) -> bool:
        """Read the queue again after ``after_seq``; True if the connection must start a reader.

        Envelopes still unacknowledged are not sent again; one acknowledged but
        not yet deleted from the store may be (the client drops it by message id).
        """
        self.cursor = min(self.cursor, after_seq)
        self.dirty = True
        return self.start_reading()

    def next_read(self) -> PageRead | None:
        """The reader's next read, or None: the reader stops (the window is full)."""
        room = self.size - len(self.unacked)
        if room <= 0:
            self.dirty = True
            self.reading = False
            return None
        self.dirty = False
        return PageRead(self.cursor, min(self.page, room))

    def page_read(self, read: PageRead, rows: Sequence[E]) -> Page[E]:
        """The store answered ``read`` (from :meth:`next_read`) with ``rows``, in ``seq`` order."""
        push: list[E] = []
        for row in rows:
            if row.seq in self.unacked:
                self.cursor = max(self.cursor, row.seq)
            elif row.seq > self.cursor:
                self._sent(row.seq)
                push.append(row)
        if len(rows) < read.limit and not self.dirty:
            self.reading = False
            synced, self.synced = not self.synced, True
            return Page(push, synced=synced)
        return Page(push, more=True)

    def reading_stopped(self) -> None:
        """The reader ended; also when cut short (a failed read, a closed connection).

        One cut short leaves what it did not read as waiting in the store, so the
        next notice or acknowledgement reads again instead of pushing past it.
        """
        if self.reading:  # a reader that ended by itself cleared it
            self.reading = False
            self.dirty = True

    def ack(self, seqs: Iterable[int]) -> bool:
        """The client acknowledged ``seqs``; True if the connection must start a reader.

        Unknown and repeated seqs change nothing here. Every acknowledged seq is
        still deleted from the device's queue by the connection: they are the
        device's own envelopes, and one sent by an earlier connection is not in
        this window.
        """
        self.unacked.difference_update(seqs)
        # Waits until half the window is free, so that a trickle of acknowledgements
        # does not turn into a read of the store per envelope.
        if self.dirty and len(self.unacked) <= self.size // 2:
            return self.start_reading()
        return False

    def _sent(self, seq: int) -> None:
        self.cursor = max(self.cursor, seq)
        self.unacked.add(seq)
