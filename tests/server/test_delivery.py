"""The delivery window, driven without a connection, a store or a loop.

A table of cases in the style of h11's: a state, one event, the decision and the
state after. Then a few scripts that play a whole conversation step by step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from bastion.server.core.delivery import (
    FETCH_PAGE,
    DeliveryWindow,
    Page,
    PageRead,
    Step,
)


@dataclass(frozen=True)
class Env:
    """An envelope as the store or the bus gives it (only its place matters here)."""

    seq: int


def envs(*seqs: int) -> list[Env]:
    return [Env(s) for s in seqs]


# --- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Notice:
    seq: int


@dataclass(frozen=True)
class Ack:
    seqs: tuple[int, ...]


@dataclass(frozen=True)
class Rewind:
    after_seq: int


@dataclass(frozen=True)
class StartReading:
    pass


@dataclass(frozen=True)
class NextRead:
    pass


@dataclass(frozen=True)
class PageIn:
    read: PageRead
    rows: tuple[int, ...]


@dataclass(frozen=True)
class ReadingStopped:
    pass


Event = Notice | Ack | Rewind | StartReading | NextRead | PageIn | ReadingStopped
Decision = Step | bool | PageRead | Page[Env] | None


def apply(window: DeliveryWindow, event: Event) -> Decision:
    """Feed one event to the window; its answer."""
    match event:
        case Notice(seq):
            return window.notice(seq)
        case Ack(seqs):
            return window.ack(seqs)
        case Rewind(after_seq):
            return window.rewind(after_seq)
        case StartReading():
            return window.start_reading()
        case NextRead():
            return window.next_read()
        case PageIn(read, rows):
            return window.page_read(read, envs(*rows))
        case ReadingStopped():
            window.reading_stopped()
            return None
    raise AssertionError(event)


def w(
    *,
    size: int = 4,
    cursor: int = 0,
    unacked: set[int] | None = None,
    reading: bool = False,
    dirty: bool = False,
    synced: bool = False,
) -> DeliveryWindow:
    """A window (of 4 unless said, with pages of 256) in the given state."""
    return DeliveryWindow(
        size=size,
        cursor=cursor,
        unacked=set(unacked or ()),
        reading=reading,
        dirty=dirty,
        synced=synced,
    )


IDLE = w(synced=True)
READING = w(reading=True)
FULL = w(cursor=4, unacked={1, 2, 3, 4}, synced=True)

CASES: list[tuple[str, DeliveryWindow, Event, Decision, DeliveryWindow]] = [
    # notices from the bus
    ("live envelope is pushed", IDLE, Notice(1), Step.PUSH, w(cursor=1, unacked={1}, synced=True)),
    (
        "a notice past a gap is pushed (the gap's own notice rewinds)",
        w(cursor=2, synced=True),
        Notice(5),
        Step.PUSH,
        w(cursor=5, unacked={5}, synced=True),
    ),
    (
        "a notice while reading waits for the reader",
        READING,
        Notice(1),
        Step.WAIT,
        w(reading=True, dirty=True),
    ),
    (
        "a notice into a full window waits in the store",
        FULL,
        Notice(5),
        Step.WAIT,
        replace(FULL, unacked={1, 2, 3, 4}, dirty=True),
    ),
    (
        "a repeated notice of an unacknowledged envelope is dropped",
        w(cursor=3, unacked={3}, synced=True),
        Notice(3),
        Step.WAIT,
        w(cursor=3, unacked={3}, synced=True),
    ),
    (
        "a notice never goes ahead of envelopes waiting in the store",
        w(cursor=4, unacked={2, 3, 4}, dirty=True, synced=True),
        Notice(6),
        Step.WAIT,
        w(cursor=4, unacked={2, 3, 4}, dirty=True, synced=True),
    ),
    (
        "a notice into a half-free window reads what waits in the store, in order",
        w(cursor=4, unacked={3, 4}, dirty=True, synced=True),
        Notice(6),
        Step.READ,
        w(cursor=4, unacked={3, 4}, dirty=True, synced=True, reading=True),
    ),
    (
        "a repeated notice into a full window costs one more read, nothing else",
        FULL,
        Notice(4),
        Step.WAIT,
        replace(FULL, unacked={1, 2, 3, 4}, dirty=True),
    ),
    (
        "an overtaken envelope rewinds to just before it and reads",
        w(cursor=5, unacked={5}, synced=True),
        Notice(4),
        Step.READ,
        w(cursor=3, unacked={5}, synced=True, dirty=True, reading=True),
    ),
    (
        "an overtaken envelope while reading moves the running reader back",
        w(cursor=5, unacked={5}, reading=True),
        Notice(4),
        Step.WAIT,
        w(cursor=3, unacked={5}, reading=True, dirty=True),
    ),
    (
        "a notice of an acknowledged envelope reads it again from the store",
        w(cursor=5, synced=True),
        Notice(5),
        Step.READ,
        w(cursor=4, synced=True, dirty=True, reading=True),
    ),
    # acknowledgements
    (
        "an acknowledgement frees its place",
        w(cursor=3, unacked={1, 2, 3}),
        Ack((1,)),
        False,
        w(cursor=3, unacked={2, 3}),
    ),
    (
        "acknowledgements out of order",
        w(cursor=3, unacked={1, 2, 3}),
        Ack((3, 1)),
        False,
        w(cursor=3, unacked={2}),
    ),
    (
        "a repeated acknowledgement changes nothing",
        w(cursor=3, unacked={2, 3}),
        Ack((1, 1)),
        False,
        w(cursor=3, unacked={2, 3}),
    ),
    (
        "an acknowledgement of an unknown seq changes nothing",
        w(cursor=3, unacked={2, 3}),
        Ack((99, -1)),
        False,
        w(cursor=3, unacked={2, 3}),
    ),
    (
        "acknowledgements that free half a dirty window start a reader",
        replace(FULL, unacked={1, 2, 3, 4}, dirty=True),
        Ack((1, 2)),
        True,
        w(cursor=4, unacked={3, 4}, synced=True, dirty=True, reading=True),
    ),
    (
        "a dirty window waits for half of it to be free",
        replace(FULL, unacked={1, 2, 3, 4}, dirty=True),
        Ack((1,)),
        False,
        w(cursor=4, unacked={2, 3, 4}, synced=True, dirty=True),
    ),
    (
        "no second reader while one runs",
        w(cursor=4, unacked={1, 2, 3, 4}, dirty=True, reading=True),
        Ack((1, 2, 3)),
        False,
        w(cursor=4, unacked={4}, dirty=True, reading=True),
    ),
    (
        "acknowledgements of a clean window start nothing",
        FULL,
        Ack((1, 2, 3, 4)),
        False,
        w(cursor=4, synced=True),
    ),
    # the reader
    ("a reader starts when none runs", w(), StartReading(), True, w(reading=True)),
    ("only one reader at a time", READING, StartReading(), False, READING),
    (
        "a read asks for what fits in the window",
        w(cursor=7, unacked={6, 7}, reading=True, dirty=True),
        NextRead(),
        PageRead(after=7, limit=2),
        w(cursor=7, unacked={6, 7}, reading=True),
    ),
    (
        "a read asks for one page at most",
        replace(READING, size=1000),
        NextRead(),
        PageRead(after=0, limit=FETCH_PAGE),
        w(size=1000, reading=True),
    ),
    (
        "a full window stops the reader and leaves the rest in the store",
        replace(FULL, unacked={1, 2, 3, 4}, reading=True),
        NextRead(),
        None,
        replace(FULL, unacked={1, 2, 3, 4}, dirty=True),
    ),
    (
        "the first empty page says synced",
        READING,
        PageIn(PageRead(0, 4), ()),
        Page([], synced=True),
        w(synced=True),
    ),
    (
        "synced is said once per connection",
        w(reading=True, synced=True),
        PageIn(PageRead(0, 4), ()),
        Page([]),
        w(synced=True),
    ),
    (
        "a short page is pushed and ends the read",
        READING,
        PageIn(PageRead(0, 4), (1, 2)),
        Page(envs(1, 2), synced=True),
        w(cursor=2, unacked={1, 2}, synced=True),
    ),
    (
        "a full page asks for another read",
        READING,
        PageIn(PageRead(0, 2), (1, 2)),
        Page(envs(1, 2), more=True),
        w(cursor=2, unacked={1, 2}, reading=True),
    ),
    (
        "a notice during the read asks for another read",
        w(reading=True, dirty=True),
        PageIn(PageRead(0, 4), (1,)),
        Page(envs(1), more=True),
        w(cursor=1, unacked={1}, reading=True, dirty=True),
    ),
    (
        "envelopes still unacknowledged are not sent again",
        w(cursor=0, unacked={2, 3}, reading=True, synced=True),
        PageIn(PageRead(0, 3), (1, 2, 3)),
        Page(envs(1), more=True),
        w(cursor=3, unacked={1, 2, 3}, reading=True, synced=True),
    ),
    (
        "a reader cut short leaves what it did not read for the next notice",
        READING,
        ReadingStopped(),
        None,
        w(dirty=True),
    ),
    (
        "a reader that ended by itself leaves nothing behind",
        w(cursor=2, unacked={2}, synced=True),
        ReadingStopped(),
        None,
        w(cursor=2, unacked={2}, synced=True),
    ),
    # reconnection: a new connection starts from the start of the queue
    (
        "rewind keeps the unacknowledged and reads from the given seq",
        w(cursor=9, unacked={8, 9}, synced=True),
        Rewind(0),
        True,
        w(cursor=0, unacked={8, 9}, synced=True, dirty=True, reading=True),
    ),
    (
        "rewind never moves the cursor forward",
        w(cursor=3, reading=True),
        Rewind(5),
        False,
        w(cursor=3, reading=True, dirty=True),
    ),
]


@pytest.mark.parametrize(
    ("before", "event", "decision", "after"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_case(
    before: DeliveryWindow, event: Event, decision: Decision, after: DeliveryWindow
) -> None:
    window = replace(before, unacked=set(before.unacked))
    assert apply(window, event) == decision
    assert window == after


def test_cases_do_not_share_state() -> None:
    # Each case copies its state; a case must never change the table.
    assert w(synced=True) == IDLE
    assert w(cursor=4, unacked={1, 2, 3, 4}, synced=True) == FULL


# --- scripts -----------------------------------------------------------------------------------


def run(window: DeliveryWindow, script: list[tuple[Event, Decision]]) -> None:
    for number, (event, decision) in enumerate(script):
        assert (number, event, apply(window, event)) == (number, event, decision)


def test_sign_in_with_a_backlog_larger_than_the_window() -> None:
    window = DeliveryWindow(size=4)
    run(
        window,
        [
            (StartReading(), True),
            (NextRead(), PageRead(0, 4)),
            (PageIn(PageRead(0, 4), (1, 2, 3, 4)), Page(envs(1, 2, 3, 4), more=True)),
            (NextRead(), None),  # full: the rest waits in the store
            (Notice(7), Step.WAIT),
            (Ack((1,)), False),
            (Ack((2,)), True),  # half the window is free
            (NextRead(), PageRead(4, 2)),
            (PageIn(PageRead(4, 2), (5, 6)), Page(envs(5, 6), more=True)),
            (NextRead(), None),
            (Ack((3, 4, 5, 6)), True),
            (NextRead(), PageRead(6, 4)),
            (PageIn(PageRead(6, 4), (7,)), Page(envs(7), synced=True)),
            (Notice(8), Step.PUSH),
            (Ack((7, 8)), False),
        ],
    )
    assert window == DeliveryWindow(size=4, cursor=8, synced=True)


def test_live_messages_flow_without_reads() -> None:
    window = DeliveryWindow(size=4, synced=True)
    run(
        window,
        [
            (Notice(1), Step.PUSH),
            (Notice(2), Step.PUSH),
            (Notice(2), Step.WAIT),  # the bus said it twice
            (Ack((2,)), False),
            (Ack((1,)), False),
            (Notice(3), Step.PUSH),
        ],
    )
    assert window == DeliveryWindow(size=4, cursor=3, unacked={3}, synced=True)


def test_an_envelope_overtaken_in_a_cluster_is_read_in_order() -> None:
    # Seq 5 was stored through another node and announced before seq 4.
    window = DeliveryWindow(size=8, synced=True)
    run(
        window,
        [
            (Notice(5), Step.PUSH),
            (Notice(4), Step.READ),
            (NextRead(), PageRead(3, 7)),
            (PageIn(PageRead(3, 7), (4, 5)), Page(envs(4))),
            (Notice(5), Step.WAIT),
        ],
    )
    assert window == DeliveryWindow(size=8, cursor=5, unacked={4, 5}, synced=True)


def test_a_notice_while_reading_is_picked_up_by_the_reader() -> None:
    window = DeliveryWindow(size=8)
    run(
        window,
        [
            (StartReading(), True),
            (NextRead(), PageRead(0, 8)),
            (Notice(1), Step.WAIT),  # stored while the read was on its way
            (PageIn(PageRead(0, 8), ()), Page([], more=True)),
            (NextRead(), PageRead(0, 8)),
            (PageIn(PageRead(0, 8), (1,)), Page(envs(1), synced=True)),
        ],
    )
    assert window == DeliveryWindow(size=8, cursor=1, unacked={1}, synced=True)


def test_a_resync_reads_the_whole_queue_again_without_repeating_the_unacknowledged() -> None:
    window = DeliveryWindow(size=8, cursor=3, unacked={2, 3}, synced=True)
    run(
        window,
        [
            (Rewind(0), True),
            (NextRead(), PageRead(0, 6)),
            (PageIn(PageRead(0, 6), (2, 3, 4)), Page(envs(4))),
        ],
    )
    assert window == DeliveryWindow(size=8, cursor=4, unacked={2, 3, 4}, synced=True)


def test_an_envelope_left_in_the_store_is_not_overtaken_by_a_live_one() -> None:
    # Seq 5 waits in the store (the window was full when it came); seq 6 comes when
    # there is room again, but not yet half the window: 5 must still go first.
    window = DeliveryWindow(size=4, synced=True)
    run(
        window,
        [
            *[(Notice(seq), Step.PUSH) for seq in (1, 2, 3, 4)],
            (Notice(5), Step.WAIT),
            (Ack((1,)), False),
            (Notice(6), Step.WAIT),  # there is room, but 5 goes first
            (Ack((2,)), True),
            (NextRead(), PageRead(4, 2)),
            (PageIn(PageRead(4, 2), (5, 6)), Page(envs(5, 6), more=True)),
            (NextRead(), None),
            (Ack((3, 4, 5, 6)), True),
            (NextRead(), PageRead(6, 4)),
            (PageIn(PageRead(6, 4), ()), Page([])),
        ],
    )
    assert window == DeliveryWindow(size=4, cursor=6, synced=True)


def test_after_a_failed_read_the_next_notice_reads_the_store_again() -> None:
    window = DeliveryWindow(size=8)
    run(
        window,
        [
            (StartReading(), True),
            (NextRead(), PageRead(0, 8)),
            (ReadingStopped(), None),  # the store failed: envelopes 1 and 2 are unread
            (Notice(3), Step.READ),
            (NextRead(), PageRead(0, 8)),
            (PageIn(PageRead(0, 8), (1, 2, 3)), Page(envs(1, 2, 3), synced=True)),
        ],
    )
