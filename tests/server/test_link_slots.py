"""The slot table of one process: history pieces go only to the joiner, and only so many."""

from __future__ import annotations

import pytest

from bastion.server.core.link_slots import LinkError, LinkSlots

SLOT = bytes(range(32))
OWNER = ("alice", "a1")


def test_pieces_need_a_joiner_and_the_owner_and_stop_at_the_limit() -> None:
    slots = LinkSlots(ttl_s=60, max_pieces=3)
    got: list[bytes] = []
    slots.open(SLOT, OWNER, lambda blob: None, now=0.0)
    with pytest.raises(LinkError, match="no device is waiting"):
        slots.more(SLOT, OWNER, now=1.0)
    slots.join(SLOT, got.append, now=1.0)
    with pytest.raises(LinkError, match="no device is waiting"):
        slots.more(SLOT, ("alice", "a2"), now=1.0)
    for n in range(3):
        slots.more(SLOT, OWNER, now=2.0)(b"piece %d" % n)
    with pytest.raises(LinkError, match="as many pieces as it may") as caught:
        slots.more(SLOT, OWNER, now=2.0)
    assert caught.value.code == "link_failed"
    slots.answer(SLOT, OWNER, now=3.0)(b"grant")
    assert got == [b"piece 0", b"piece 1", b"piece 2", b"grant"]


def test_a_piece_after_expiry_or_the_answer_is_refused() -> None:
    slots = LinkSlots(ttl_s=10)
    slots.open(SLOT, OWNER, lambda blob: None, now=0.0)
    slots.join(SLOT, lambda blob: None, now=1.0)
    slots.answer(SLOT, OWNER, now=2.0)
    with pytest.raises(LinkError):
        slots.more(SLOT, OWNER, now=3.0)
    slots.open(SLOT, OWNER, lambda blob: None, now=4.0)
    slots.join(SLOT, lambda blob: None, now=5.0)
    with pytest.raises(LinkError):
        slots.more(SLOT, OWNER, now=15.0)
