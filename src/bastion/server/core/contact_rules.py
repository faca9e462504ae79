"""The contact rules, with no I/O: what an action does to the two rows of a pair.

The server keeps one row per direction: ``owner``'s view of ``peer``. States are
``pending_out`` (owner asked), ``pending_in`` (peer asked), ``accepted`` (both rows,
always together) and ``blocked`` (owner blocked peer). A missing row is ``none``.

The blocked side is never told: blocking looks to the peer exactly like a
removal (an accepted contact) or like silence (a pending request), and requests
from a blocked account are stored on the sender's side only, so the sender sees
``pending_out`` as it would for a request that is simply never answered.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, replace
from enum import Enum

from bastion.errors import ProtocolError
from bastion.protocol.codes import ErrorCode

PENDING_OUT = "pending_out"
PENDING_IN = "pending_in"
ACCEPTED = "accepted"
BLOCKED = "blocked"
NONE = "none"


class ContactError(ProtocolError):
    """A contact action or message was refused; ``code`` says why."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class ContactRow:
    """One direction of a pair: the owner's state towards the peer."""

    state: str
    updated_at: int
    note_id: bytes | None = None  # the one message a pending request may carry


@dataclass(frozen=True, slots=True)
class Pair:
    """Both rows of a pair as read in one transaction, and the counts the limits need."""

    mine: ContactRow | None
    theirs: ContactRow | None
    their_pending: int = 0
    my_count: int = 0
    their_count: int = 0


@dataclass(frozen=True, slots=True)
class Transition:
    """What to write (None deletes a row), what the actor sees, and what the peer is told."""

    mine: ContactRow | None
    theirs: ContactRow | None
    result: str
    tell_peer: str | None = None
    error: ContactError | None = None  # returned, not raised: rules run inside store calls

    @property
    def accepted_now(self) -> bool:
        """True if this transition made the pair accepted."""
        return self.tell_peer == ACCEPTED


class Delivery(Enum):
    """What the relay does with a message between the two accounts of a pair."""

    ALLOW = "allow"
    DROP = "drop"  # answered as sent, never stored: the recipient blocked the sender
    REFUSE = "refuse"


def state_of(row: ContactRow | None) -> str:
    """The state of a row, ``none`` for a missing one."""
    return NONE if row is None else row.state


def _keep(pair: Pair, result: str) -> Transition:
    return Transition(mine=pair.mine, theirs=pair.theirs, result=result)


def _fail(pair: Pair, code: ErrorCode, message: str) -> Transition:
    return Transition(
        mine=pair.mine,
        theirs=pair.theirs,
        result=state_of(pair.mine),
        error=ContactError(code, message),
    )


def _peer_side_dropped(theirs: ContactRow | None) -> tuple[ContactRow | None, str | None]:
    """The peer's row once the actor leaves: an acceptance or a request to us goes away.

    A request the peer sent us (``pending_out`` on their side) stays as it is:
    declining and blocking are silent.
    """
    if theirs is not None and theirs.state in (ACCEPTED, PENDING_IN):
        return None, NONE
    return theirs, None


def delivers_request(pair: Pair) -> bool:
    """Whether a request now would reach the peer (and count against the peer's limits)."""
    mine, theirs = state_of(pair.mine), state_of(pair.theirs)
    return mine in (NONE, PENDING_OUT) and theirs == NONE


def apply_action(
    action: str, pair: Pair, *, peer: str, now: int, pending_max: int, contacts_max: int
) -> Transition:
    """The transition ``action`` makes on ``pair`` (errors are in ``Transition.error``)."""
    mine = state_of(pair.mine)
    theirs = state_of(pair.theirs)
    if action == "request":
        if mine == BLOCKED:
            return _fail(pair, ErrorCode.BLOCKED, f"you blocked {peer}; unblock them first")
        if mine == ACCEPTED:
            return _keep(pair, ACCEPTED)
        if mine == PENDING_IN:
            return apply_action(
                "accept",
                pair,
                peer=peer,
                now=now,
                pending_max=pending_max,
                contacts_max=contacts_max,
            )
        if mine == NONE and pair.my_count >= contacts_max:
            return _fail(pair, ErrorCode.TOO_MANY_CONTACTS, "your contact list is full")
        if theirs == BLOCKED:
            # Kept on the sender's side only: it looks like a request never answered.
            return Transition(
                mine=ContactRow(PENDING_OUT, now), theirs=pair.theirs, result=PENDING_OUT
            )
        if theirs == PENDING_IN:
            return _keep(pair, PENDING_OUT)
        if theirs == PENDING_OUT:  # they asked us before (we declined): now both want it
            return Transition(
                mine=ContactRow(ACCEPTED, now),
                theirs=ContactRow(ACCEPTED, now),
                result=ACCEPTED,
                tell_peer=ACCEPTED,
            )
        if pair.their_pending >= pending_max:
            return _fail(
                pair,
                ErrorCode.RATE_LIMITED,
                f"{peer} has too many open contact requests; try later",
            )
        if pair.their_count >= contacts_max:
            return _fail(pair, ErrorCode.TOO_MANY_CONTACTS, f"{peer}'s contact list is full")
        return Transition(
            mine=ContactRow(PENDING_OUT, now),
            theirs=ContactRow(PENDING_IN, now),
            result=PENDING_OUT,
            tell_peer=PENDING_IN,
        )
    if action == "accept":
        if mine == ACCEPTED:
            return _keep(pair, ACCEPTED)
        if mine != PENDING_IN or theirs != PENDING_OUT:
            return _fail(pair, ErrorCode.NO_REQUEST, f"{peer} has not asked to be your contact")
        return Transition(
            mine=ContactRow(ACCEPTED, now),
            theirs=ContactRow(ACCEPTED, now),
            result=ACCEPTED,
            tell_peer=ACCEPTED,
        )
    if action == "decline":
        if mine != PENDING_IN:
            return _fail(pair, ErrorCode.NO_REQUEST, f"{peer} has not asked to be your contact")
        return Transition(mine=None, theirs=pair.theirs, result=NONE)
    if action == "remove":
        if mine == BLOCKED:
            return _fail(pair, ErrorCode.BLOCKED, f"{peer} is blocked; use unblock")
        if mine == NONE:
            return _keep(pair, NONE)
        new_theirs, tell = _peer_side_dropped(pair.theirs)
        return Transition(mine=None, theirs=new_theirs, result=NONE, tell_peer=tell)
    if action == "block":
        if mine == NONE and pair.my_count >= contacts_max:
            return _fail(pair, ErrorCode.TOO_MANY_CONTACTS, "your contact list is full")
        new_theirs, tell = _peer_side_dropped(pair.theirs)
        return Transition(
            mine=ContactRow(BLOCKED, now), theirs=new_theirs, result=BLOCKED, tell_peer=tell
        )
    if action == "unblock":
        if mine != BLOCKED:
            return _keep(pair, mine)
        return Transition(mine=None, theirs=pair.theirs, result=NONE)
    return _fail(pair, ErrorCode.BAD_ACTION, f"unknown contact action {action!r}")


def may_send(pair: Pair, message_id: bytes) -> tuple[Delivery, Transition]:
    """May the owner of ``pair.mine`` send message ``message_id`` to the peer?

    Accepted contacts may. A pending request may carry exactly one message (its
    encrypted note; the same id again is a retry). Everything else is refused
    with ``not_a_contact``, which is also what a removed or blocked sender sees.
    """
    mine, theirs = state_of(pair.mine), state_of(pair.theirs)
    if mine == ACCEPTED and theirs == ACCEPTED:
        return Delivery.ALLOW, _keep(pair, mine)
    if pair.mine is not None and mine == PENDING_OUT and theirs in (PENDING_IN, BLOCKED):
        used = pair.mine.note_id
        if used is None or hmac.compare_digest(used, message_id):
            row = replace(pair.mine, note_id=message_id)
            verdict = Delivery.DROP if theirs == BLOCKED else Delivery.ALLOW
            return verdict, Transition(mine=row, theirs=pair.theirs, result=mine)
    return Delivery.REFUSE, _keep(pair, mine)
