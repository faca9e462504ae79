"""Group chains: signed, hash-chained membership that the server cannot forge."""

from __future__ import annotations

import contextlib
import hashlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.crypto.signing import AccountIdentity, signing_input, verify_ed25519
from bastion.errors import AuthenticationError, FrameError, KeyChangedError, ProtocolError
from bastion.groups.chain import (
    GROUP_CHANGE_CONTEXT,
    AddMember,
    CreateGroup,
    Demote,
    GroupChange,
    GroupPermissionError,
    GroupRuleError,
    GroupSequenceError,
    GroupSignatureError,
    GroupState,
    Leave,
    MemberChange,
    Promote,
    RemoveMember,
    Rename,
    apply_change,
    change_signing_input,
    create_group,
    decode_change,
    derive_group_id,
    encode_change,
    genesis_hash,
    make_change,
    verify_chain,
)

T0 = 1_700_000_000.0
NONCE = bytes(range(16))

ALICE = AccountIdentity.generate()
BOB = AccountIdentity.generate()
CAROL = AccountIdentity.generate()
DAVE = AccountIdentity.generate()
SERVER = AccountIdentity.generate()  # a key the server controls

IDS = {"alice": ALICE, "bob": BOB, "carol": CAROL, "dave": DAVE}


def key(user: str) -> bytes:
    return IDS[user].public_bytes


def step(
    state: GroupState,
    author: str,
    args: MemberChange,
    max_members: int = 1000,
) -> tuple[GroupChange, GroupState]:
    change = make_change(IDS[author], state, author, args, now=T0 + state.seq + 1)
    return change, apply_change(state, change, max_members=max_members)


def new_group(
    *members: str, name: str = "team", nonce: bytes = NONCE
) -> tuple[GroupChange, GroupState]:
    create = create_group(ALICE, "alice", name, {m: key(m) for m in members}, now=T0, nonce=nonce)
    return create, apply_change(None, create)


def snapshot(state: GroupState) -> tuple[object, ...]:
    return (
        state.group_id,
        state.name,
        dict(state.members),
        set(state.admins),
        state.seq,
        state.state_hash,
    )


def assert_rejected(
    state: GroupState,
    change: GroupChange,
    error: type[Exception],
    max_members: int = 1000,
    match: str | None = None,
) -> None:
    before = snapshot(state)
    with pytest.raises(error, match=match) as info:
        apply_change(state, change, max_members=max_members)
    assert isinstance(info.value, ProtocolError | KeyChangedError)
    assert "\n" not in str(info.value)
    assert str(info.value)
    assert snapshot(state) == before
    # The untouched state still accepts a legitimate change.
    admin = sorted(state.admins)[0]
    _, nxt = step(state, admin, Rename(name="still works"))
    assert nxt.seq == state.seq + 1


# -- the happy path -------------------------------------------------------------------


def test_creator_becomes_admin_and_initial_members_join_with_their_keys() -> None:
    create, state = new_group("bob", "carol")
    assert create.kind == "create"
    assert state.name == "team"
    assert dict(state.members) == {"alice": key("alice"), "bob": key("bob"), "carol": key("carol")}
    assert state.admins == {"alice"}
    assert state.seq == 0
    assert state.group_id == derive_group_id(key("alice"), NONCE, int(T0 * 1000))
    assert create.prev_hash == genesis_hash(state.group_id)


def test_whole_lifecycle_replays_to_the_same_state_from_the_wire() -> None:
    create, state = new_group("bob")
    chain = [create]
    states = [state]
    plan: list[tuple[str, MemberChange]] = [
        ("alice", AddMember(user="carol", key=key("carol"))),
        ("alice", Promote(user="bob")),
        ("bob", Rename(name="new name")),
        ("bob", AddMember(user="dave", key=key("dave"))),
        ("bob", RemoveMember(user="carol")),
        ("bob", Demote(user="alice")),
        ("alice", Leave()),
    ]
    for author, args in plan:
        change, state = step(state, author, args)
        chain.append(change)
        states.append(state)

    assert state.name == "new name"
    assert dict(state.members) == {"bob": key("bob"), "dave": key("dave")}
    assert state.admins == {"bob"}
    assert state.seq == 7
    assert len({s.state_hash for s in states}) == len(states)
    assert [c.kind for c in chain] == [
        "create",
        "add_member",
        "promote",
        "rename",
        "add_member",
        "remove_member",
        "demote",
        "leave",
    ]

    wire = [encode_change(c) for c in chain]
    replayed = verify_chain(decode_change(data) for data in wire)
    assert replayed == state
    assert replayed.state_hash == state.state_hash


def test_group_ids_depend_on_creator_nonce_and_time() -> None:
    a = create_group(ALICE, "alice", "g", {}, now=T0, nonce=NONCE)
    b = create_group(ALICE, "alice", "g", {}, now=T0, nonce=bytes(16))
    c = create_group(ALICE, "alice", "g", {}, now=T0 + 1, nonce=NONCE)
    d = create_group(BOB, "alice", "g", {}, now=T0, nonce=NONCE)
    assert len({x.group_id for x in (a, b, c, d)}) == 4
    random_nonce = create_group(ALICE, "alice", "g", {}, now=T0)
    assert apply_change(None, random_nonce).group_id != a.group_id


def test_state_cannot_be_mutated_through_its_fields() -> None:
    _, state = new_group("bob")
    with pytest.raises(TypeError):
        state.members["mallory"] = key("dave")  # type: ignore[index]
    source = {"alice": key("alice")}
    copy = GroupState(state.group_id, "n", source, frozenset({"alice"}), 0, state.state_hash)
    source["mallory"] = key("dave")
    assert "mallory" not in copy.members


def test_state_hash_commits_to_history_and_every_part_of_the_state() -> None:
    _, state = new_group("bob", "carol")
    change, state = step(state, "alice", Promote(user="carol"))
    parts: list[bytes | str | int] = [
        state.group_id,
        1,
        hashlib.sha256(change_signing_input(change)).digest(),
        "team",
        3,
        "alice",
        key("alice"),
        "bob",
        key("bob"),
        "carol",
        key("carol"),
        2,
        "alice",
        "carol",
    ]
    expected = hashlib.sha256(signing_input("bastion/v1/group-state", parts)).digest()
    assert state.state_hash == expected


# -- the attacks ----------------------------------------------------------------------


def test_change_by_a_non_admin_is_rejected() -> None:
    _, state = new_group("bob")
    change = make_change(BOB, state, "bob", AddMember(user="dave", key=key("dave")), now=T0 + 1)
    assert_rejected(state, change, GroupPermissionError)
    for args in (
        Rename(name="x"),
        Promote(user="bob"),
        Demote(user="alice"),
        RemoveMember(user="alice"),
    ):
        assert_rejected(
            state, make_change(BOB, state, "bob", args, now=T0 + 1), GroupPermissionError
        )


def test_change_by_a_removed_admin_is_rejected() -> None:
    _, state = new_group("bob")
    _, state = step(state, "alice", Promote(user="bob"))
    _, state = step(state, "alice", RemoveMember(user="bob"))
    assert "bob" not in state.members
    assert state.admins == {"alice"}
    change = make_change(BOB, state, "bob", AddMember(user="dave", key=key("dave")), now=T0 + 9)
    assert_rejected(state, change, GroupSignatureError)


def test_forged_signatures_are_rejected() -> None:
    _, state = new_group("bob")
    args = AddMember(user="dave", key=key("dave"))
    # Signed by someone else's key, claiming to be alice.
    by_bob = make_change(BOB, state, "alice", args, now=T0 + 1)
    assert_rejected(state, by_bob, GroupSignatureError)
    # A real alice signature with one bit flipped.
    good = make_change(ALICE, state, "alice", args, now=T0 + 1)
    flipped = bytes([good.signature[0] ^ 1]) + good.signature[1:]
    assert_rejected(state, msgspec.structs.replace(good, signature=flipped), GroupSignatureError)
    # A real alice signature over the same fields for another purpose.
    other_context = ALICE.sign("bastion/v1/device-certificate", _parts_of(good))
    assert_rejected(
        state, msgspec.structs.replace(good, signature=other_context), GroupSignatureError
    )
    # A real alice signature, but for another member or another time.
    assert_rejected(
        state,
        msgspec.structs.replace(good, args=AddMember(user="dave", key=key("carol"))),
        GroupSignatureError,
    )
    assert_rejected(
        state,
        msgspec.structs.replace(good, timestamp_ms=good.timestamp_ms + 1),
        GroupSignatureError,
    )
    assert apply_change(state, good).members["dave"] == key("dave")


def _parts_of(change: GroupChange) -> list[bytes | str | int]:
    args = change.args
    assert isinstance(args, AddMember)
    return [
        change.group_id,
        change.prev_hash,
        change.seq,
        change.author,
        change.kind,
        change.timestamp_ms,
        args.user,
        args.key,
    ]


def test_signing_input_covers_every_field() -> None:
    change, _ = new_group("bob")
    base = change_signing_input(change)
    variants = [
        msgspec.structs.replace(change, group_id=bytes(32)),
        msgspec.structs.replace(change, prev_hash=bytes(32)),
        msgspec.structs.replace(change, seq=1),
        msgspec.structs.replace(change, author="bob"),
        msgspec.structs.replace(change, timestamp_ms=0),
        msgspec.structs.replace(change, args=msgspec.structs.replace(change.args, name="x")),
    ]
    assert all(change_signing_input(v) != base for v in variants)
    assert GROUP_CHANGE_CONTEXT.encode() in base


def test_change_naming_another_state_is_rejected() -> None:
    _, s1 = new_group("bob", "carol")
    _, s1 = step(s1, "alice", Promote(user="bob"))
    # A fork: two admins change the same state; the server delivers one, then a change
    # built on the other branch with the right sequence number.
    _, branch_a = step(s1, "alice", Rename(name="a"))
    _, branch_b = step(s1, "bob", Rename(name="b"))
    on_b = make_change(BOB, branch_b, "bob", RemoveMember(user="carol"), now=T0 + 5)
    assert on_b.seq == branch_a.seq + 1
    assert_rejected(branch_a, on_b, GroupSequenceError, match="does not follow")


def test_replayed_change_is_rejected() -> None:
    _, state = new_group("bob")
    add, after_add = step(state, "alice", AddMember(user="carol", key=key("carol")))
    _, after_remove = step(after_add, "alice", RemoveMember(user="carol"))
    assert_rejected(after_remove, add, GroupSequenceError, match="sequence number 1, expected 3")
    assert_rejected(after_add, add, GroupSequenceError, match="sequence number 1, expected 2")


def test_reordered_or_gapped_changes_are_rejected() -> None:
    create, state = new_group("bob")
    first, state = step(state, "alice", AddMember(user="carol", key=key("carol")))
    second, state = step(state, "alice", Promote(user="carol"))
    assert verify_chain([create, first, second]) == state
    with pytest.raises(GroupSequenceError):
        verify_chain([create, second, first])
    with pytest.raises(GroupSequenceError):
        verify_chain([create, second])
    with pytest.raises(GroupSequenceError):
        verify_chain([first, create, second])
    with pytest.raises(GroupSequenceError):
        verify_chain([create, create])
    with pytest.raises(GroupSequenceError):
        verify_chain([])


def test_change_moved_from_another_group_is_rejected() -> None:
    _, g1 = new_group("bob", nonce=b"1" * 16)
    _, g2 = new_group("bob", nonce=b"2" * 16)
    moved = make_change(ALICE, g1, "alice", AddMember(user="dave", key=key("dave")), now=T0 + 1)
    assert_rejected(g2, moved, GroupSequenceError, match="another group")


def test_server_cannot_add_a_ghost_member() -> None:
    _, state = new_group("bob")
    ghost = AddMember(user="ghost", key=SERVER.public_bytes)
    # No valid signature at all.
    unsigned = msgspec.structs.replace(
        make_change(ALICE, state, "alice", ghost, now=T0 + 1), signature=bytes(64)
    )
    assert_rejected(state, unsigned, GroupSignatureError)
    # Signed by the server's own key, in an admin's name or in its own.
    assert_rejected(
        state, make_change(SERVER, state, "alice", ghost, now=T0 + 1), GroupSignatureError
    )
    assert_rejected(
        state, make_change(SERVER, state, "server", ghost, now=T0 + 1), GroupSignatureError
    )
    assert isinstance(GroupSignatureError("x"), AuthenticationError)


def test_server_made_group_in_a_contacts_name_is_caught_by_pinned_keys() -> None:
    fake = create_group(SERVER, "alice", "team", {"bob": key("bob")}, now=T0, nonce=NONCE)
    # The chain is self-consistent, so only the pinned key for alice can tell.
    assert apply_change(None, fake).members["alice"] == SERVER.public_bytes
    with pytest.raises(KeyChangedError):
        verify_chain([fake], pinned={"alice": key("alice")})
    # Likewise a malicious admin adding a contact under a key that is not theirs.
    create, state = new_group("bob")
    swap = make_change(
        ALICE, state, "alice", AddMember(user="carol", key=SERVER.public_bytes), now=T0 + 1
    )
    with pytest.raises(KeyChangedError):
        verify_chain([create, swap], pinned={"carol": key("carol")})
    assert verify_chain([create, swap], pinned={"alice": key("alice")}).seq == 1


def test_create_with_a_chosen_group_id_is_rejected() -> None:
    real = create_group(ALICE, "alice", "team", {}, now=T0, nonce=NONCE)
    chosen_id = bytes(32)
    forged = msgspec.structs.replace(real, group_id=chosen_id, prev_hash=genesis_hash(chosen_id))
    forged = msgspec.structs.replace(
        forged, signature=ALICE.sign(GROUP_CHANGE_CONTEXT, _create_parts(forged))
    )
    with pytest.raises(GroupSequenceError):
        apply_change(None, forged)
    with pytest.raises(GroupSequenceError):
        apply_change(None, msgspec.structs.replace(real, prev_hash=bytes(32)))
    with pytest.raises(GroupSequenceError):
        apply_change(None, msgspec.structs.replace(real, seq=1))
    _, state = new_group()
    assert_rejected(state, real, GroupSequenceError)


def _create_parts(change: GroupChange) -> list[bytes | str | int]:
    args = change.args
    assert isinstance(args, CreateGroup)
    return [
        change.group_id,
        change.prev_hash,
        change.seq,
        change.author,
        change.kind,
        change.timestamp_ms,
        args.name,
        args.nonce,
        args.creator_key,
        len(args.members),
    ]


def test_member_cap_is_enforced() -> None:
    _, state = new_group("bob")
    _, state = step(state, "alice", AddMember(user="carol", key=key("carol")), max_members=3)
    dave = make_change(ALICE, state, "alice", AddMember(user="dave", key=key("dave")), now=T0 + 5)
    assert_rejected(state, dave, GroupRuleError, max_members=3)
    assert apply_change(state, dave, max_members=4).seq == state.seq + 1
    with pytest.raises(GroupRuleError):
        verify_chain(
            [create_group(ALICE, "alice", "g", {"bob": key("bob"), "carol": key("carol")}, now=T0)],
            max_members=2,
        )


def test_last_admin_cannot_leave_or_step_down_while_members_remain() -> None:
    _, state = new_group("bob")
    leave = make_change(ALICE, state, "alice", Leave(), now=T0 + 1)
    step_down = make_change(ALICE, state, "alice", Demote(user="alice"), now=T0 + 1)
    assert_rejected(state, leave, GroupRuleError)
    assert_rejected(state, step_down, GroupRuleError)
    # After promoting bob, alice may go.
    _, promoted = step(state, "alice", Promote(user="bob"))
    _, left = step(promoted, "alice", Leave())
    assert dict(left.members) == {"bob": key("bob")}
    assert left.admins == {"bob"}


def test_last_member_may_leave_and_the_empty_group_is_closed() -> None:
    _, state = new_group()
    _, empty = step(state, "alice", Leave())
    assert not empty.members
    assert not empty.admins
    rejoin = make_change(ALICE, empty, "alice", AddMember(user="bob", key=key("bob")), now=T0 + 9)
    with pytest.raises(GroupSignatureError):
        apply_change(empty, rejoin)


def test_plain_member_may_leave_but_not_for_someone_else() -> None:
    _, state = new_group("bob", "carol")
    _, left = step(state, "bob", Leave())
    assert "bob" not in left.members
    # Bob signing "leave" with author carol is not carol leaving.
    assert_rejected(
        state, make_change(BOB, state, "carol", Leave(), now=T0 + 1), GroupSignatureError
    )


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(RemoveMember(user="dave"), id="remove-non-member"),
        pytest.param(AddMember(user="bob", key=key("dave")), id="add-existing-name"),
        pytest.param(AddMember(user="dave", key=key("bob")), id="add-existing-key"),
        pytest.param(Promote(user="dave"), id="promote-non-member"),
        pytest.param(Promote(user="alice"), id="promote-admin"),
        pytest.param(Demote(user="bob"), id="demote-non-admin"),
        pytest.param(AddMember(user="dave", key=b"short"), id="add-short-key"),
        pytest.param(AddMember(user="", key=key("dave")), id="add-empty-name"),
        pytest.param(Rename(name=""), id="rename-empty"),
        pytest.param(Rename(name="x" * 257), id="rename-too-long"),
    ],
)
def test_invalid_changes_are_rejected(args: MemberChange) -> None:
    _, state = new_group("bob")
    assert_rejected(state, make_change(ALICE, state, "alice", args, now=T0 + 1), GroupRuleError)


def test_admin_cannot_remove_themselves_but_may_leave() -> None:
    _, state = new_group("bob")
    _, state = step(state, "alice", Promote(user="bob"))
    remove_self = make_change(ALICE, state, "alice", RemoveMember(user="alice"), now=T0 + 5)
    assert_rejected(state, remove_self, GroupRuleError, match="leave")
    _, left = step(state, "alice", Leave())
    assert set(left.members) == {"bob"}


def test_create_signed_by_someone_else_is_rejected() -> None:
    real = create_group(ALICE, "alice", "team", {"bob": key("bob")}, now=T0, nonce=NONCE)
    # Bob builds alice's group in her name, with her public key, but cannot sign it.
    args = real.args
    assert isinstance(args, CreateGroup)
    by_bob = msgspec.structs.replace(
        real, signature=BOB.sign(GROUP_CHANGE_CONTEXT, _create_parts(real) + _member_parts(args))
    )
    # It is a genuine signature by Bob over exactly the bytes a change signs.
    verify_ed25519(BOB.public_bytes, by_bob.signature, change_signing_input(by_bob))
    with pytest.raises(GroupSignatureError):
        apply_change(None, by_bob)
    flipped = bytes([real.signature[-1] ^ 0x80])
    with pytest.raises(GroupSignatureError):
        apply_change(None, msgspec.structs.replace(real, signature=real.signature[:-1] + flipped))
    assert apply_change(None, real).admins == {"alice"}


def _member_parts(args: CreateGroup) -> list[bytes | str | int]:
    parts: list[bytes | str | int] = []
    for member in args.members:
        parts += [member.user, member.key]
    return parts


@pytest.mark.parametrize(
    "members",
    [
        pytest.param({"alice": key("bob")}, id="creator-twice"),
        pytest.param({"bob": key("alice")}, id="creator-key-shared"),
        pytest.param({"bob": key("dave"), "carol": key("dave")}, id="shared-key"),
        pytest.param({"bob": b"\x00" * 31}, id="short-key"),
    ],
)
def test_invalid_create_is_rejected(members: dict[str, bytes]) -> None:
    with pytest.raises(GroupRuleError):
        apply_change(None, create_group(ALICE, "alice", "g", members, now=T0))


def test_first_change_must_be_create() -> None:
    _, state = new_group("bob")
    change = make_change(ALICE, state, "alice", Rename(name="x"), now=T0 + 1)
    with pytest.raises(GroupSequenceError):
        apply_change(None, change)


# -- the encoding ---------------------------------------------------------------------


def test_encoding_round_trips_every_kind() -> None:
    create, state = new_group("bob")
    changes = [create]
    plan: list[tuple[str, MemberChange]] = [
        ("alice", AddMember(user="carol", key=key("carol"))),
        ("alice", RemoveMember(user="carol")),
        ("alice", Promote(user="bob")),
        ("alice", Demote(user="bob")),
        ("alice", Rename(name="r")),
        ("bob", Leave()),
    ]
    for author, args in plan:
        change, state = step(state, author, args)
        changes.append(change)
    for change in changes:
        assert decode_change(encode_change(change)) == change
    assert {c.kind for c in changes} == {
        "create",
        "add_member",
        "remove_member",
        "promote",
        "demote",
        "rename",
        "leave",
    }


def _as_dict(change: GroupChange) -> dict[str, object]:
    decoded = msgspec.msgpack.decode(encode_change(change))
    assert isinstance(decoded, dict)
    return decoded


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d.update(extra=1), id="unknown-field"),
        pytest.param(lambda d: d.pop("signature"), id="missing-field"),
        pytest.param(lambda d: d.update(seq="1"), id="wrong-type"),
        pytest.param(lambda d: d.update(seq=-1), id="negative-seq"),
        pytest.param(lambda d: d.update(group_id=b"\x00" * 31), id="short-group-id"),
        pytest.param(lambda d: d.update(signature=b"\x00" * 65), id="long-signature"),
        pytest.param(lambda d: d.update(author=""), id="empty-author"),
        pytest.param(lambda d: d.update(author="a" * 65), id="long-author"),
        pytest.param(lambda d: d["args"].update(kind="make_admin"), id="unknown-kind"),
        pytest.param(lambda d: d["args"].update(extra=1), id="unknown-arg"),
        pytest.param(lambda d: d["args"].update(nonce=b"\x00" * 15), id="short-nonce"),
    ],
)
def test_malformed_changes_raise_frame_error(mutate: object) -> None:
    create, _ = new_group("bob")
    data = _as_dict(create)
    mutate(data)  # type: ignore[operator]
    with pytest.raises(FrameError):
        decode_change(msgspec.msgpack.encode(data))


def test_oversize_change_raises_frame_error() -> None:
    create, _ = new_group("bob")
    data = encode_change(create)
    with pytest.raises(FrameError):
        decode_change(data, max_bytes=len(data) - 1)
    assert decode_change(data, max_bytes=len(data)) == create


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decoding_arbitrary_bytes_raises_only_frame_error(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        decode_change(data)


_CREATE, _STATE = new_group("bob")
_ADD = make_change(ALICE, _STATE, "alice", AddMember(user="carol", key=key("carol")), now=T0 + 1)
_ADD_BYTES = encode_change(_ADD)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_ADD_BYTES) - 1), st.integers(1, 255))
def test_a_tampered_change_never_applies_as_something_else(index: int, xor: int) -> None:
    data = bytearray(_ADD_BYTES)
    data[index] ^= xor
    try:
        change = decode_change(bytes(data))
    except FrameError:
        return
    try:
        state = apply_change(_STATE, change)
    except ProtocolError:
        return
    assert change == _ADD
    assert state == apply_change(_STATE, _ADD)
