"""The ``file.offer`` payload: strict decoding, and a malformed offer becomes a warning."""

from __future__ import annotations

import contextlib
import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.client import files
from bastion.errors import RejectedMessageError
from tests.file_transfer.conftest import Pair
from tests.helpers import next_events, warnings

GOOD = files.OfferBody(
    blob="ab" * 16,
    key=b"k" * 32,
    sha256=b"h" * 32,
    size=29,
    plaintext_size=0,
    name="a.txt",
    type="text/plain",
)


def test_an_offer_round_trips() -> None:
    assert files.parse_offer(msgspec.json.encode(GOOD).decode()) == GOOD


@pytest.mark.parametrize(
    "change",
    [
        {"blob": "../../etc/passwd"},
        {"key": "c2hvcnQ="},
        {"size": -1},
        {"size": 2**41},
        {"name": "x" * 1025},
        {"v": 2},
        {"extra": 1},
    ],
)
def test_bad_offers_are_rejected(change: dict[str, object]) -> None:
    raw = msgspec.json.decode(msgspec.json.encode(GOOD))
    raw.update(change)
    with pytest.raises(RejectedMessageError):
        files.parse_offer(msgspec.json.encode(raw).decode())


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
FIELDS = st.sampled_from(["v", "blob", "key", "sha256", "size", "plaintext_size", "name", "type"])


@given(st.text(max_size=300) | st.dictionaries(FIELDS, JSON_VALUES).map(json.dumps))
def test_only_rejection_escapes_the_offer_decoder(text: str) -> None:
    with contextlib.suppress(RejectedMessageError):
        offer = files.parse_offer(text)
        assert len(offer.key) == 32


@pytest.mark.network
async def test_a_malformed_offer_is_a_warning_not_a_file(pair: Pair) -> None:
    await pair.alice.send_payload("bob", files.OFFER_KIND, '{"blob": "nope"}', history=False)
    events = await next_events(pair.bob, 1)
    [warning] = warnings(events)
    assert warning.reason == "malformed file offer"
    assert files.list_files(pair.bob) == []
