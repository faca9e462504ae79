"""The link code: what the server relays between two devices cannot be read or replaced."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bastion.crypto import linking
from bastion.errors import AuthenticationError

REQUEST = linking.LinkRequest(ed25519=b"e" * 32, curve25519=b"c" * 32, created_at=1)
GRANT = linking.LinkGrant(username="alice", identity_private=b"k" * 32, server_name="s")


def keys() -> tuple[str, bytes, bytes]:
    code = linking.new_code()
    slot, key = linking.slot_and_key(linking.parse_code(code))
    return code, slot, key


def test_both_directions_open_with_the_code() -> None:
    code, slot, key = keys()
    assert linking.parse_code(code.lower().replace("-", " ")) == linking.parse_code(code)
    assert linking.open_request(key, slot, linking.seal_request(key, slot, REQUEST)) == REQUEST
    assert linking.open_grant(key, slot, linking.seal_grant(key, slot, GRANT)) == GRANT
    assert "k" * 32 not in repr(GRANT)


def test_the_server_cannot_read_replace_or_redirect_what_it_relays() -> None:
    _, slot, key = keys()
    _, other_slot, other_key = keys()
    sealed = linking.seal_request(key, slot, REQUEST)
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    forged = linking.seal_request(other_key, slot, REQUEST)  # the server's own keys
    grant = linking.seal_grant(key, slot, GRANT)
    cases: dict[str, Callable[[], object]] = {
        "flipped byte": lambda: linking.open_request(key, slot, flipped),
        "sealed without the code": lambda: linking.open_request(key, slot, forged),
        "moved to another slot": lambda: linking.open_request(key, other_slot, sealed),
        "grant passed off as a request": lambda: linking.open_request(key, slot, grant),
        "request passed off as a grant": lambda: linking.open_grant(key, slot, sealed),
        "truncated": lambda: linking.open_grant(key, slot, grant[:20]),
    }
    refused = []
    for name, attempt in cases.items():
        try:
            attempt()
        except AuthenticationError:
            refused.append(name)
    assert refused == list(cases)


def test_slot_reveals_nothing_of_the_key_and_codes_are_checked() -> None:
    code, slot, key = keys()
    assert slot != key
    assert len(linking.parse_code(code)) == linking.CODE_BYTES
    for bad in ("", "ABCD", code + "AAAA", "not a code!"):
        with pytest.raises(ValueError, match="not valid"):
            linking.parse_code(bad)
