"""What this client knows of a group chain's head beyond its own verified copy.

Every group message and room key names the sender's chain head (position and
hash, DESIGN §5), and the server announces positions in its change notices and
in ``more`` on a fetch. This module keeps, per group, the highest position each
member (and the server) named, a detected fork, and why the last sync stopped;
:func:`send_blocker` turns that into the reason sending to the group is stopped,
so a client never shares a room key from a state it knows is stale or forked
(fail closed).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

import msgspec

from bastion.client.feature import ClientCore

SERVER: str = ""  # the key under which the server's own announcements are kept


class ForkRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Two hashes at one chain position: ours and the one a member named."""

    seq: int
    their_hash: bytes
    by: str


class GroupStatus(msgspec.Struct, kw_only=True):
    """Announced heads (by member; ``""`` is the server), a fork, and a stopped sync."""

    announced: dict[str, int] = msgspec.field(default_factory=dict)
    fork: ForkRecord | None = None
    rejected: str | None = None


def _name(group_id: bytes) -> str:
    return "group-status:" + group_id.hex()


def status_of(client: ClientCore, group_id: bytes) -> GroupStatus:
    """The group's status record (empty if none was kept)."""
    return client.profile.get(_name(group_id), GroupStatus) or GroupStatus()


def save_status(client: ClientCore, group_id: bytes, status: GroupStatus) -> None:
    """Store the group's status record (one write: atomic alone or in a transaction)."""
    client.profile.put(_name(group_id), status)


def announce(client: ClientCore, group_id: bytes, who: str, seq: int) -> None:
    """Remember that ``who`` (a member, or :data:`SERVER`) named chain position ``seq``."""
    status = status_of(client, group_id)
    if status.announced.get(who, -1) < seq:
        status.announced[who] = seq
        save_status(client, group_id, status)


def mismatch(hashes: list[bytes], seq: int, their_hash: bytes) -> bool:
    """True when our verified chain has another hash at position ``seq`` (a fork)."""
    return seq < len(hashes) and not hmac.compare_digest(hashes[seq], their_hash)


def send_blocker(status: GroupStatus, seq: int, members: Mapping[str, bytes]) -> str | None:
    """Why sending to the group from verified position ``seq`` is stopped, or None.

    Announcements by users who are no longer members do not count (a removed
    member cannot freeze the group by naming a position that never comes).
    """
    if status.fork is not None:
        by = status.fork.by or "the server"
        return (
            f"the group's chain is forked at position {status.fork.seq}: {by} names another"
            " state than this client verified; sending is stopped until the fork is settled"
        )
    if status.rejected is not None:
        return f"the group's chain could not be verified ({status.rejected}); sending is stopped"
    for who, announced in sorted(status.announced.items()):
        if announced > seq and (who == SERVER or who in members):
            source = "the server" if who == SERVER else who
            return (
                f"{source} named position {announced} of the group's chain but this client"
                f" could verify it only to position {seq}; sending is stopped until it can"
            )
    return None
