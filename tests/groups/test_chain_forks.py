"""Member names follow the username rule, and forks are settled by the removal rule."""

from __future__ import annotations

import msgspec
import pytest

from bastion.errors import FrameError
from bastion.groups.chain import (
    AddMember,
    Demote,
    GroupChange,
    GroupRuleError,
    GroupState,
    Promote,
    RemoveMember,
    Rename,
    apply_change,
    create_group,
    decode_change,
    encode_change,
    make_change,
    settle_fork,
    verify_branch,
)
from tests.groups.test_chain import ALICE, BOB, T0, key, new_group, step

CONFUSABLE_OR_HIDDEN = [
    "\u0430lice",  # Cyrillic a
    "alice\u202e",  # right-to-left override
    "al\u200bice",  # zero-width space
    "Alice",  # upper case: another look of the same name
    "al",  # too short for a username
    "a" * 33,  # too long for a username
]


@pytest.mark.parametrize("name", CONFUSABLE_OR_HIDDEN)
def test_a_member_name_outside_the_username_rule_is_rejected(name: str) -> None:
    _, state = new_group("bob")
    change = make_change(ALICE, state, "alice", AddMember(user=name, key=key("carol")), now=T0)
    with pytest.raises(GroupRuleError, match="member name"):
        apply_change(state, change)
    with pytest.raises(FrameError):
        decode_change(encode_change(change))


@pytest.mark.parametrize("name", CONFUSABLE_OR_HIDDEN)
def test_a_forged_chain_cannot_show_a_look_alike_admin(name: str) -> None:
    create = create_group(ALICE, name, "team", {"bob": key("bob")}, now=T0)
    with pytest.raises(GroupRuleError, match="member name"):
        apply_change(None, create)
    with pytest.raises(FrameError):
        decode_change(msgspec.msgpack.encode(create))


def _forked() -> tuple[GroupState, GroupChange, GroupChange]:
    """Alice and Bob are admins; at position 2 Alice removes Bob, or Bob adds Dave."""
    _, state = new_group("bob", "carol")
    _, base = step(state, "alice", Promote(user="bob"))
    removal = make_change(ALICE, base, "alice", RemoveMember(user="bob"), now=T0 + 2)
    rogue = make_change(BOB, base, "bob", AddMember(user="dave", key=key("dave")), now=T0 + 2)
    return base, removal, rogue


def test_a_change_by_an_admin_at_the_position_of_their_removal_is_void() -> None:
    base, removal, rogue = _forked()
    verify_branch(base, [removal])
    verify_branch(base, [rogue])
    assert settle_fork([rogue], [removal]) == "theirs"
    assert settle_fork([removal], [rogue]) == "ours"


def test_a_change_by_an_admin_after_their_removal_on_the_other_branch_is_void() -> None:
    base, _, rogue = _forked()
    states = verify_branch(base, [rogue])
    later = make_change(BOB, states[-1], "bob", Rename(name="mine"), now=T0 + 3)
    demoted = make_change(ALICE, base, "alice", Demote(user="bob"), now=T0 + 2)
    assert settle_fork([rogue, later], [demoted]) == "theirs"


def test_a_fork_of_two_valid_branches_is_not_settled() -> None:
    base, _, rogue = _forked()
    rename = make_change(ALICE, base, "alice", Rename(name="other"), now=T0 + 2)
    assert settle_fork([rogue], [rename]) is None
    # Each removes the other at the same position: both void, not settled either.
    alice_out = make_change(BOB, base, "bob", RemoveMember(user="alice"), now=T0 + 2)
    _, removal, _ = _forked()
    assert settle_fork([alice_out], [removal]) is None
