"""The verified state at a group's head, as the relay stores it next to the chain.

A posted change is checked against this state alone (one signature), never by
replaying the whole chain: a long chain then costs the relay no more per post
than a short one. The state is written in the transaction that appends the
change it results from, so it always matches the stored head.
"""

from __future__ import annotations

import msgspec

from bastion.errors import StorageError
from bastion.groups.chain import GroupState


class _MemberKey(msgspec.Struct, array_like=True, frozen=True):
    user: str
    key: bytes


class _HeadState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    group_id: bytes
    name: str
    members: list[_MemberKey]
    admins: list[str]
    seq: int
    state_hash: bytes


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_HeadState)


def encode_head(state: GroupState) -> bytes:
    """The stored form of a verified state."""
    return _encoder.encode(
        _HeadState(
            group_id=state.group_id,
            name=state.name,
            members=[_MemberKey(user, state.members[user]) for user in sorted(state.members)],
            admins=sorted(state.admins),
            seq=state.seq,
            state_hash=state.state_hash,
        )
    )


def decode_head(data: bytes) -> GroupState:
    """A verified state from its stored form; raises :class:`StorageError` if it is damaged."""
    try:
        head = _decoder.decode(data)
    except (msgspec.MsgspecError, UnicodeDecodeError):
        raise StorageError("a stored group head is damaged") from None
    return GroupState(
        group_id=head.group_id,
        name=head.name,
        members={m.user: m.key for m in head.members},
        admins=frozenset(head.admins),
        seq=head.seq,
        state_hash=head.state_hash,
    )
