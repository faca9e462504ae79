"""Group state as a hash-chained sequence of changes signed by account keys.

A group's name, members and admins are never taken from the server. They are the
result of replaying a chain of :class:`GroupChange` records from the ``create``
change on. Each change names the group, the hash of the state it applies to and
its sequence number, and is signed by its author's *account identity key* as
recorded in the state it applies to. Every member checks every change
(:func:`apply_change`, :func:`verify_chain`), so the server, which stores and
forwards the chain, cannot add a member, reorder, replay or move changes between
groups.

Rules (checked in this order; the first failure is raised):

1. Position: ``create`` only starts a chain, with ``seq`` 0, the group id derived
   from the creator's key, nonce and time, and the genesis hash as previous hash.
   Every later change names the same group, ``seq`` = previous ``seq`` + 1 and
   the previous state's hash.
2. Signature: the author must be a member of the current state and the signature
   must verify under the key recorded for them there (for ``create``: the
   creator's key in the change itself, to be checked against pinned keys).
3. Permission: ``leave`` is by the leaver; every other change needs an admin.
   All admins are equal (any admin may demote or remove another).
4. Content: no duplicate members or account keys, at most ``max_members``
   members, ``remove_member`` cannot name its author (use ``leave``), promote
   only members who are not admins, demote only admins.
5. Admin rule: a group that still has members must keep at least one admin. So
   the last admin cannot leave or demote themselves while others remain; they
   promote someone first. The last member may leave; the group is then empty
   and accepts no further change.

Hashes (all SHA-256 over :func:`signing_input` encodings):

- group id: ``H("bastion/v1/group-id", [creator_key, nonce, timestamp_ms])``, so
  neither the server nor anyone else can pick a group's id;
- genesis: ``H("bastion/v1/group-genesis", [group_id])``, named by ``create``;
- state: ``H("bastion/v1/group-state", [group_id, seq, H(change signing input),
  name, member count, (username, key) by username, admin count, admins sorted])``,
  so it commits to the whole history and the whole resulting state.

A member whose account key changes must be removed and added again with the new
key; until then changes signed with the new key do not verify.

Usernames in a chain follow the account username rule (``frames.USERNAME_PATTERN``:
3 to 32 of ``a-z 0-9 . _ -``), so a chain cannot name a look-alike such as a
Cyrillic a (U+0430) or hide text behind a bidi control.

Forks: an honest server keeps one chain, but a lying one can show two changes at
the same position to different members. :func:`settle_fork` decides between two
branches that leave a common state with the removal rule: a change signed by an
admin at or after the position where the other branch removed or demoted that
admin is void. A fork the rule does not settle stays a fork.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Final

import msgspec

from bastion.crypto.signing import (
    ED25519_KEY_BYTES,
    ED25519_SIGNATURE_BYTES,
    AccountIdentity,
    Part,
    signing_input,
    verify_signed,
)
from bastion.errors import (
    AuthenticationError,
    FrameError,
    KeyChangedError,
    ProtocolError,
    StateError,
)
from bastion.protocol.codes import ErrorCode
from bastion.protocol.frames import USERNAME_PATTERN

GROUP_CHANGE_CONTEXT: Final = "bastion/v1/group-change"
GROUP_ID_CONTEXT: Final = "bastion/v1/group-id"
GROUP_GENESIS_CONTEXT: Final = "bastion/v1/group-genesis"
GROUP_STATE_CONTEXT: Final = "bastion/v1/group-state"

GROUP_ID_BYTES: Final = 32
HASH_BYTES: Final = 32
NONCE_BYTES: Final = 16
MAX_USERNAME_CHARS: Final = 32
_USERNAME_RE: Final = re.compile(USERNAME_PATTERN)
MAX_GROUP_NAME_CHARS: Final = 256
DEFAULT_MAX_MEMBERS: Final = 1000
DEFAULT_MAX_CHANGE_BYTES: Final = 256 * 1024
_INT64_MAX: Final = 2**63 - 1


# -- errors ---------------------------------------------------------------------------


class GroupChangeError(ProtocolError):
    """A group change breaks the group rules; it is not applied."""

    code = ErrorCode.GROUP_CHANGE_REJECTED


class GroupSequenceError(GroupChangeError):
    """A change is out of place: wrong group, previous hash or sequence number."""


class GroupPermissionError(GroupChangeError):
    """The author of a change is not allowed to make it."""


class GroupRuleError(GroupChangeError):
    """A change would produce an invalid group (duplicate, full, no admin...)."""


class GroupSignatureError(AuthenticationError):
    """A change is not signed by a current member's account key."""


# -- wire types -----------------------------------------------------------------------

Username = Annotated[str, msgspec.Meta(pattern=USERNAME_PATTERN)]
GroupName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_GROUP_NAME_CHARS)]
AccountKey = Annotated[
    bytes, msgspec.Meta(min_length=ED25519_KEY_BYTES, max_length=ED25519_KEY_BYTES)
]
Hash = Annotated[bytes, msgspec.Meta(min_length=HASH_BYTES, max_length=HASH_BYTES)]
Nonce = Annotated[bytes, msgspec.Meta(min_length=NONCE_BYTES, max_length=NONCE_BYTES)]
Signature = Annotated[
    bytes, msgspec.Meta(min_length=ED25519_SIGNATURE_BYTES, max_length=ED25519_SIGNATURE_BYTES)
]
Counter = Annotated[int, msgspec.Meta(ge=0, le=_INT64_MAX)]


class Member(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A username and its account identity key, as named in a change."""

    user: Username
    key: AccountKey


class _Args(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind"):
    pass


class CreateGroup(_Args, frozen=True, tag="create"):
    """Start a group; the author becomes its first member and admin."""

    name: GroupName
    nonce: Nonce
    creator_key: AccountKey
    members: tuple[Member, ...] = ()


class AddMember(_Args, frozen=True, tag="add_member"):
    """Add ``user`` with account key ``key`` (admins only)."""

    user: Username
    key: AccountKey


class RemoveMember(_Args, frozen=True, tag="remove_member"):
    """Remove another member (admins only)."""

    user: Username


class Leave(_Args, frozen=True, tag="leave"):
    """The author leaves the group."""


class Promote(_Args, frozen=True, tag="promote"):
    """Make a member an admin (admins only)."""

    user: Username


class Demote(_Args, frozen=True, tag="demote"):
    """Make an admin a plain member (admins only)."""

    user: Username


class Rename(_Args, frozen=True, tag="rename"):
    """Change the group's name (admins only)."""

    name: GroupName


ChangeArgs = CreateGroup | AddMember | RemoveMember | Leave | Promote | Demote | Rename
MemberChange = AddMember | RemoveMember | Leave | Promote | Demote | Rename


class GroupChange(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One signed link of a group's chain. ``timestamp_ms`` is Unix time in ms."""

    group_id: Hash
    prev_hash: Hash
    seq: Counter
    author: Username
    timestamp_ms: Counter
    args: ChangeArgs
    signature: Signature

    @property
    def kind(self) -> str:
        """The change's kind: ``create``, ``add_member``, ``leave``..."""
        return _kind(self.args)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(GroupChange, strict=True)


def encode_change(change: GroupChange) -> bytes:
    """Encode a change as msgpack for storage or the wire."""
    return _encoder.encode(change)


def decode_change(data: bytes, *, max_bytes: int = DEFAULT_MAX_CHANGE_BYTES) -> GroupChange:
    """Decode a change; raises :class:`FrameError` for anything but a well-formed one.

    Decoding does not verify anything: pass the result to :func:`apply_change`.
    """
    if len(data) > max_bytes:
        raise FrameError("group change is too large")
    try:
        return _decoder.decode(data)
    except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
        raise FrameError(f"malformed group change: {str(exc)[:200]}") from None


# -- state ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupState:
    """A verified group state. Immutable: applying a change returns a new one.

    ``members`` maps each username to its account identity key; ``seq`` is the
    sequence number of the last change applied (the state's version);
    ``state_hash`` is what the next change must name as its previous hash.
    """

    group_id: bytes
    name: str
    members: Mapping[str, bytes]
    admins: frozenset[str]
    seq: int
    state_hash: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", MappingProxyType(dict(self.members)))
        object.__setattr__(self, "admins", frozenset(self.admins))


def derive_group_id(creator_key: bytes, nonce: bytes, timestamp_ms: int) -> bytes:
    """The group id: a hash of the creator's account key, a nonce and the time."""
    return _sha256(signing_input(GROUP_ID_CONTEXT, [creator_key, nonce, timestamp_ms]))


def genesis_hash(group_id: bytes) -> bytes:
    """The previous-state hash that a group's ``create`` change names."""
    return _sha256(signing_input(GROUP_GENESIS_CONTEXT, [group_id]))


def change_signing_input(change: GroupChange) -> bytes:
    """The exact bytes the author of ``change`` signs (every field but the signature)."""
    return signing_input(GROUP_CHANGE_CONTEXT, _signed_parts(change))


def apply_change(
    state: GroupState | None,
    change: GroupChange,
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    pinned: Mapping[str, bytes] | None = None,
) -> GroupState:
    """Check ``change`` against the verified ``state`` and return the next state.

    ``state`` is None only for a group's ``create`` change. ``pinned`` maps
    usernames to the account keys this client has pinned; a member entering the
    group with another key raises :class:`KeyChangedError`. Raises
    :class:`GroupSignatureError` (an :class:`AuthenticationError`) for a change
    not signed by a current member, and a :class:`GroupChangeError` subclass
    (a :class:`ProtocolError`) for any other broken rule. ``state`` itself never
    changes.
    """
    if isinstance(change.args, CreateGroup):
        return _apply_create(state, change, change.args, max_members, pinned)
    if state is None:
        raise GroupSequenceError("a group's chain must start with create")
    if not hmac.compare_digest(change.group_id, state.group_id):
        raise GroupSequenceError("change belongs to another group")
    if change.seq != state.seq + 1:
        raise GroupSequenceError(
            f"change has sequence number {change.seq}, expected {state.seq + 1}"
        )
    if not hmac.compare_digest(change.prev_hash, state.state_hash):
        raise GroupSequenceError("change does not follow the current group state")
    author_key = state.members.get(change.author)
    if author_key is None:
        raise GroupSignatureError("change author is not a member of the group")
    _verify(change, author_key)

    args = change.args
    members = dict(state.members)
    admins = set(state.admins)
    name = state.name
    if not isinstance(args, Leave) and change.author not in admins:
        raise GroupPermissionError(f"only an admin may {change.kind.replace('_', ' ')}")
    if isinstance(args, AddMember):
        _check_user(args.user)
        _check_key(args.key)
        if args.user in members:
            raise GroupRuleError("user is already a member")
        if any(hmac.compare_digest(args.key, key) for key in members.values()):
            raise GroupRuleError("account key already belongs to another member")
        if len(members) + 1 > max_members:
            raise GroupRuleError(f"group is full ({max_members} members)")
        _check_pinned(pinned, args.user, args.key)
        members[args.user] = args.key
    elif isinstance(args, RemoveMember):
        if args.user == change.author:
            raise GroupRuleError("a member removes themselves with leave, not remove")
        if args.user not in members:
            raise GroupRuleError("user is not a member")
        del members[args.user]
        admins.discard(args.user)
    elif isinstance(args, Leave):
        del members[change.author]
        admins.discard(change.author)
    elif isinstance(args, Promote):
        if args.user not in members:
            raise GroupRuleError("only a member can be promoted")
        if args.user in admins:
            raise GroupRuleError("user is already an admin")
        admins.add(args.user)
    elif isinstance(args, Demote):
        if args.user not in admins:
            raise GroupRuleError("user is not an admin")
        admins.discard(args.user)
    else:
        _check_name(args.name)
        name = args.name
    if members and not admins:
        raise GroupRuleError("the group would have no admin; promote another member first")
    return _next_state(state.group_id, name, members, admins, change)


def verify_chain(
    changes: Iterable[GroupChange],
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    pinned: Mapping[str, bytes] | None = None,
) -> GroupState:
    """Replay a whole chain from its ``create`` change and return the final state.

    Raises what :func:`apply_change` raises for the first bad change, and
    :class:`GroupSequenceError` for an empty chain.
    """
    state: GroupState | None = None
    for change in changes:
        state = apply_change(state, change, max_members=max_members, pinned=pinned)
    if state is None:
        raise GroupSequenceError("a group's chain must start with create")
    return state


def verify_branch(
    base: GroupState,
    changes: Iterable[GroupChange],
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    pinned: Mapping[str, bytes] | None = None,
) -> list[GroupState]:
    """Apply ``changes`` one by one on top of ``base``; the state after each, in order.

    Raises what :func:`apply_change` raises for the first bad change.
    """
    states: list[GroupState] = []
    state = base
    for change in changes:
        state = apply_change(state, change, max_members=max_members, pinned=pinned)
        states.append(state)
    return states


def admin_removals(changes: Iterable[GroupChange]) -> dict[str, int]:
    """Where each admin lost their power in ``changes``: username to the first position.

    Counts ``remove_member`` and ``demote`` of a user, and a ``leave`` by its author.
    """
    removed: dict[str, int] = {}
    for change in changes:
        args = change.args
        if isinstance(args, RemoveMember | Demote):
            removed.setdefault(args.user, change.seq)
        elif isinstance(args, Leave):
            removed.setdefault(change.author, change.seq)
    return removed


def void_change(branch: Sequence[GroupChange], removals: Mapping[str, int]) -> GroupChange | None:
    """The first change of ``branch`` signed at or after its author's removal, or None.

    ``removals`` comes from :func:`admin_removals` over the other branch of a fork.
    """
    for change in branch:
        removed_at = removals.get(change.author)
        if removed_at is not None and change.seq >= removed_at:
            return change
    return None


def settle_fork(ours: Sequence[GroupChange], theirs: Sequence[GroupChange]) -> str | None:
    """Which of two branches from one common state stands: ``"ours"``, ``"theirs"`` or None.

    Both branches must already verify (:func:`verify_branch`) from the common
    state. A branch is void when it holds a change signed by an admin at or
    after the position where the other branch removed or demoted that admin.
    When exactly one branch is void the other stands; otherwise (both void, or
    neither) the fork is not settled and None is returned.
    """
    ours_void = void_change(ours, admin_removals(theirs)) is not None
    theirs_void = void_change(theirs, admin_removals(ours)) is not None
    if ours_void and not theirs_void:
        return "theirs"
    if theirs_void and not ours_void:
        return "ours"
    return None


# -- building changes -----------------------------------------------------------------


def create_group(
    identity: AccountIdentity,
    creator: str,
    name: str,
    members: Mapping[str, bytes],
    *,
    now: float,
    nonce: bytes | None = None,
) -> GroupChange:
    """Build and sign the ``create`` change of a new group.

    ``members`` are the other initial members with their account keys; the
    creator joins as member and admin. ``now`` is Unix time in seconds; ``nonce``
    (16 bytes) defaults to a fresh random one. Apply the result with
    :func:`apply_change` to get the group's first state, which checks it.
    """
    nonce = secrets.token_bytes(NONCE_BYTES) if nonce is None else nonce
    creator_key = identity.public_bytes
    timestamp_ms = _timestamp_ms(now)
    group_id = derive_group_id(creator_key, nonce, timestamp_ms)
    args = CreateGroup(
        name=name,
        nonce=nonce,
        creator_key=creator_key,
        members=tuple(Member(user=user, key=members[user]) for user in sorted(members)),
    )
    return _signed(
        identity,
        group_id=group_id,
        prev_hash=genesis_hash(group_id),
        seq=0,
        author=creator,
        timestamp_ms=timestamp_ms,
        args=args,
    )


def make_change(
    identity: AccountIdentity,
    state: GroupState,
    author: str,
    args: MemberChange,
    *,
    now: float,
) -> GroupChange:
    """Build and sign the change ``args`` by ``author`` on top of ``state``.

    The kind is the type of ``args`` (:class:`AddMember`, :class:`Leave`...).
    ``now`` is Unix time in seconds. Nothing is checked here beyond the kind:
    :func:`apply_change` decides. Raises :class:`StateError` for ``CreateGroup``
    (use :func:`create_group`).
    """
    if isinstance(args, CreateGroup):
        raise StateError("a group is created with create_group")
    return _signed(
        identity,
        group_id=state.group_id,
        prev_hash=state.state_hash,
        seq=state.seq + 1,
        author=author,
        timestamp_ms=_timestamp_ms(now),
        args=args,
    )


# -- internals ------------------------------------------------------------------------


def _apply_create(
    state: GroupState | None,
    change: GroupChange,
    args: CreateGroup,
    max_members: int,
    pinned: Mapping[str, bytes] | None,
) -> GroupState:
    if state is not None:
        raise GroupSequenceError("create can only start a chain")
    if change.seq != 0:
        raise GroupSequenceError("create must have sequence number 0")
    _check_key(args.creator_key)
    expected_id = derive_group_id(args.creator_key, args.nonce, change.timestamp_ms)
    if not hmac.compare_digest(change.group_id, expected_id):
        raise GroupSequenceError("group id does not derive from the creator's key and nonce")
    if not hmac.compare_digest(change.prev_hash, genesis_hash(change.group_id)):
        raise GroupSequenceError("create does not name the genesis hash")
    _verify(change, args.creator_key)

    _check_user(change.author)
    _check_name(args.name)
    members = {change.author: args.creator_key}
    for member in args.members:
        _check_user(member.user)
        _check_key(member.key)
        if member.user in members:
            raise GroupRuleError("a member is named twice")
        if any(hmac.compare_digest(member.key, key) for key in members.values()):
            raise GroupRuleError("two members share an account key")
        members[member.user] = member.key
    if len(members) > max_members:
        raise GroupRuleError(f"group is full ({max_members} members)")
    for user, key in members.items():
        _check_pinned(pinned, user, key)
    return _next_state(change.group_id, args.name, members, {change.author}, change)


def _next_state(
    group_id: bytes,
    name: str,
    members: dict[str, bytes],
    admins: set[str],
    change: GroupChange,
) -> GroupState:
    parts: list[Part] = [group_id, change.seq, _sha256(change_signing_input(change)), name]
    parts.append(len(members))
    for user in sorted(members):
        parts += [user, members[user]]
    parts.append(len(admins))
    parts.extend(sorted(admins))
    return GroupState(
        group_id=group_id,
        name=name,
        members=members,
        admins=frozenset(admins),
        seq=change.seq,
        state_hash=_sha256(signing_input(GROUP_STATE_CONTEXT, parts)),
    )


def _verify(change: GroupChange, key: bytes) -> None:
    try:
        verify_signed(key, change.signature, GROUP_CHANGE_CONTEXT, _signed_parts(change))
    except AuthenticationError:
        raise GroupSignatureError("change signature does not verify") from None


def _signed_parts(change: GroupChange) -> list[Part]:
    parts: list[Part] = [
        change.group_id,
        change.prev_hash,
        change.seq,
        change.author,
        change.kind,
        change.timestamp_ms,
    ]
    parts.extend(_arg_parts(change.args))
    return parts


def _signed(
    identity: AccountIdentity,
    *,
    group_id: bytes,
    prev_hash: bytes,
    seq: int,
    author: str,
    timestamp_ms: int,
    args: ChangeArgs,
) -> GroupChange:
    unsigned = GroupChange(
        group_id=group_id,
        prev_hash=prev_hash,
        seq=seq,
        author=author,
        timestamp_ms=timestamp_ms,
        args=args,
        signature=b"",
    )
    signature = identity.sign(GROUP_CHANGE_CONTEXT, _signed_parts(unsigned))
    return msgspec.structs.replace(unsigned, signature=signature)


def _kind(args: ChangeArgs) -> str:
    return str(type(args).__struct_config__.tag)


def _arg_parts(args: ChangeArgs) -> list[Part]:
    if isinstance(args, CreateGroup):
        parts: list[Part] = [args.name, args.nonce, args.creator_key, len(args.members)]
        for member in args.members:
            parts += [member.user, member.key]
        return parts
    if isinstance(args, AddMember):
        return [args.user, args.key]
    if isinstance(args, RemoveMember | Promote | Demote):
        return [args.user]
    if isinstance(args, Rename):
        return [args.name]
    return []


def _check_user(user: str) -> None:
    if not _USERNAME_RE.match(user):
        raise GroupRuleError(
            "a member name must be 3 to 32 of a-z, 0-9, '.', '_' or '-' (no look-alikes)"
        )


def _check_name(name: str) -> None:
    if not 1 <= len(name) <= MAX_GROUP_NAME_CHARS:
        raise GroupRuleError("group name is empty or too long")


def _check_key(key: bytes) -> None:
    if len(key) != ED25519_KEY_BYTES:
        raise GroupRuleError("account key must be 32 bytes")


def _check_pinned(pinned: Mapping[str, bytes] | None, user: str, key: bytes) -> None:
    if pinned is not None and user in pinned and not hmac.compare_digest(pinned[user], key):
        raise KeyChangedError(user)


def _timestamp_ms(now: float) -> int:
    return int(now * 1000)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
