"""The contact rules without I/O: each action's effect, and what the blocked side can tell."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.server.core.contact_rules import (
    ACCEPTED,
    BLOCKED,
    NONE,
    PENDING_IN,
    PENDING_OUT,
    ContactRow,
    Delivery,
    Pair,
    Transition,
    apply_action,
    may_send,
    state_of,
)

ACTIONS = ["request", "accept", "decline", "remove", "block", "unblock"]
STATES = [None, PENDING_OUT, PENDING_IN, ACCEPTED, BLOCKED]


def row(state: str | None, note: bytes | None = None) -> ContactRow | None:
    return None if state is None else ContactRow(state, 1, note)


def act(action: str, mine: str | None, theirs: str | None, **counts: int) -> Transition:
    return apply_action(
        action,
        Pair(row(mine), row(theirs), **counts),
        peer="bob",
        now=5,
        pending_max=3,
        contacts_max=10,
    )


@pytest.mark.parametrize(
    "case",
    [
        ("request", None, None, PENDING_OUT, PENDING_OUT, PENDING_IN, PENDING_IN),
        ("request", None, BLOCKED, PENDING_OUT, PENDING_OUT, BLOCKED, None),
        ("request", PENDING_IN, PENDING_OUT, ACCEPTED, ACCEPTED, ACCEPTED, ACCEPTED),
        ("request", None, PENDING_OUT, ACCEPTED, ACCEPTED, ACCEPTED, ACCEPTED),
        ("request", ACCEPTED, ACCEPTED, ACCEPTED, ACCEPTED, ACCEPTED, None),
        ("accept", PENDING_IN, PENDING_OUT, ACCEPTED, ACCEPTED, ACCEPTED, ACCEPTED),
        ("decline", PENDING_IN, PENDING_OUT, NONE, None, PENDING_OUT, None),
        ("remove", ACCEPTED, ACCEPTED, NONE, None, None, NONE),
        ("remove", PENDING_OUT, PENDING_IN, NONE, None, None, NONE),
        ("block", ACCEPTED, ACCEPTED, BLOCKED, BLOCKED, None, NONE),
        ("block", PENDING_IN, PENDING_OUT, BLOCKED, BLOCKED, PENDING_OUT, None),
        ("block", None, None, BLOCKED, BLOCKED, None, None),
        ("unblock", BLOCKED, PENDING_OUT, NONE, None, PENDING_OUT, None),
    ],
)
def test_each_action(
    case: tuple[str, str | None, str | None, str, str | None, str | None, str | None],
) -> None:
    action, mine, theirs, result, new_mine, new_theirs, told = case
    outcome = act(action, mine, theirs)
    assert outcome.error is None
    assert outcome.result == result
    assert (state_of(outcome.mine), state_of(outcome.theirs)) == (
        state_of(row(new_mine)),
        state_of(row(new_theirs)),
    )
    assert outcome.tell_peer == told


@pytest.mark.parametrize(
    ("action", "mine", "theirs", "counts", "code"),
    [
        ("accept", None, None, {}, "no_request"),
        ("accept", PENDING_OUT, PENDING_IN, {}, "no_request"),
        ("decline", ACCEPTED, ACCEPTED, {}, "no_request"),
        ("request", BLOCKED, None, {}, "blocked"),
        ("remove", BLOCKED, None, {}, "blocked"),
        ("request", None, None, {"their_pending": 3}, "rate_limited"),
        ("request", None, None, {"my_count": 10}, "too_many_contacts"),
        ("request", None, None, {"their_count": 10}, "too_many_contacts"),
        ("block", None, None, {"my_count": 10}, "too_many_contacts"),
        ("dance", None, None, {}, "bad_action"),
    ],
)
def test_refusals_change_nothing(
    action: str, mine: str | None, theirs: str | None, counts: dict[str, int], code: str
) -> None:
    outcome = act(action, mine, theirs, **counts)
    assert outcome.error is not None
    assert outcome.error.code == code
    assert (outcome.mine, outcome.theirs, outcome.tell_peer) == (row(mine), row(theirs), None)


def reachable() -> set[tuple[str | None, str | None]]:
    """Every (mine, theirs) pair that some sequence of actions by either side reaches."""
    seen: set[tuple[str | None, str | None]] = {(None, None)}
    todo: list[tuple[str | None, str | None]] = [(None, None)]
    while todo:
        mine, theirs = todo.pop()
        for action in ACTIONS:
            for flipped in (False, True):
                a, b = (theirs, mine) if flipped else (mine, theirs)
                outcome = act(action, a, b)
                after = (state_of(outcome.mine), state_of(outcome.theirs))
                x, y = (None if v == NONE else v for v in after)
                nxt = (y, x) if flipped else (x, y)
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
    return seen


REACHABLE = sorted(reachable(), key=str)


def test_acceptance_is_always_mutual() -> None:
    for mine, theirs in REACHABLE:
        assert (mine == ACCEPTED) == (theirs == ACCEPTED)
    assert (PENDING_OUT, BLOCKED) in REACHABLE  # a request swallowed by a block


@pytest.mark.parametrize(("mine", "theirs"), REACHABLE)
def test_the_blocked_side_cannot_tell_a_block_from_a_removal_or_a_decline(
    mine: str | None, theirs: str | None
) -> None:
    """The peer's row and what it is told are those of a removal or a decline."""
    blocked = act("block", mine, theirs)
    if mine == BLOCKED:
        return
    assert blocked.error is None
    quiet = act("decline" if mine == PENDING_IN else "remove", mine, theirs)
    assert quiet.error is None
    assert (blocked.theirs, blocked.tell_peer) == (quiet.theirs, quiet.tell_peer)


@given(
    mine=st.sampled_from(STATES),
    theirs=st.sampled_from(STATES),
    used=st.sampled_from([None, b"a" * 16, b"b" * 16]),
)
def test_only_contacts_and_one_note_per_request_may_be_sent(
    mine: str | None, theirs: str | None, used: bytes | None
) -> None:
    pair = Pair(row(mine, used), row(theirs))
    verdict, change = may_send(pair, b"b" * 16)
    if mine == ACCEPTED and theirs == ACCEPTED:
        assert verdict is Delivery.ALLOW
    elif mine == PENDING_OUT and theirs in (PENDING_IN, BLOCKED) and used in (None, b"b" * 16):
        # The note: delivered, or dropped unseen if the peer blocked us (looks the same).
        assert verdict is (Delivery.DROP if theirs == BLOCKED else Delivery.ALLOW)
        assert change.mine is not None
        assert change.mine.note_id == b"b" * 16
    else:
        assert verdict is Delivery.REFUSE
        assert (change.mine, change.theirs) == (pair.mine, pair.theirs)
