"""Safety numbers and their QR codes (docs/safety-numbers.md)."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import pytest
import segno
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.crypto.safety import (
    SafetyNumber,
    qr_png,
    render_qr_text,
    safety_number,
    verify_qr,
)
from bastion.crypto.signing import AccountIdentity
from bastion.errors import ProtocolError

DOC = Path(__file__).resolve().parents[2] / "docs" / "safety-numbers.md"

RFC8032_SEED_1 = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
RFC8032_SEED_2 = "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb"

ALICE_KEY = AccountIdentity.from_private_bytes(bytes.fromhex(RFC8032_SEED_1)).public_bytes
BOB_KEY = AccountIdentity.from_private_bytes(bytes.fromhex(RFC8032_SEED_2)).public_bytes
CAROL_KEY = AccountIdentity.generate().public_bytes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def doc_vector() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    match = re.search(r"```vector\n(.*?)```", text, re.DOTALL)
    assert match, "docs/safety-numbers.md has no vector block"
    pairs = (line.split(":", 1) for line in match.group(1).splitlines() if line.strip())
    return {name.strip(): value.strip() for name, value in pairs}


def test_code_matches_the_documented_vector() -> None:
    v = doc_vector()
    alice_key = bytes.fromhex(v["alice_key"])
    bob_key = bytes.fromhex(v["bob_key"])
    # The documented keys are the real RFC 8032 keys the document says they are.
    assert alice_key == ALICE_KEY
    assert bob_key == BOB_KEY

    number = safety_number(v["alice_user"], alice_key, v["bob_user"], bob_key)
    halves = sorted([v["alice_digits"], v["bob_digits"]])
    assert number.digits == halves[0] + halves[1]
    assert " ".join(number.groups) == v["safety_number"]
    assert number.qr_payload() == bytes.fromhex(v["alice_qr_payload"])
    # Each half belongs to its party: changing Bob's key keeps Alice's half.
    with_carol = safety_number(v["alice_user"], alice_key, v["bob_user"], CAROL_KEY)
    assert v["alice_digits"] in with_carol.digits
    assert v["bob_digits"] not in with_carol.digits


def test_both_sides_see_the_same_number() -> None:
    alice_side = safety_number("alice", ALICE_KEY, "bob", BOB_KEY)
    bob_side = safety_number("bob", BOB_KEY, "alice", ALICE_KEY)
    assert alice_side.digits == bob_side.digits
    assert alice_side == bob_side
    assert str(alice_side) == str(bob_side)


@pytest.mark.parametrize(
    ("other_user", "other_alice_key", "other_bob_user", "other_bob_key"),
    [
        pytest.param("alice", CAROL_KEY, "bob", BOB_KEY, id="alice-key-changed"),
        pytest.param("alice", ALICE_KEY, "bob", CAROL_KEY, id="bob-key-changed"),
        pytest.param("alicE", ALICE_KEY, "bob", BOB_KEY, id="alice-name-changed"),
        pytest.param("alice", ALICE_KEY, "bob2", BOB_KEY, id="bob-name-changed"),
        pytest.param("alice", BOB_KEY, "bob", ALICE_KEY, id="keys-swapped"),
    ],
)
def test_number_changes_when_a_key_or_name_changes(
    other_user: str, other_alice_key: bytes, other_bob_user: str, other_bob_key: bytes
) -> None:
    original = safety_number("alice", ALICE_KEY, "bob", BOB_KEY)
    changed = safety_number(other_user, other_alice_key, other_bob_user, other_bob_key)
    assert changed.digits != original.digits
    assert changed != original


def test_formatting_is_twelve_groups_of_five_on_three_lines() -> None:
    number = safety_number("alice", ALICE_KEY, "bob", BOB_KEY)
    assert re.fullmatch(r"[0-9]{60}", number.digits)
    assert len(number.groups) == 12
    assert all(re.fullmatch(r"[0-9]{5}", group) for group in number.groups)
    assert "".join(number.groups) == number.digits
    lines = str(number).split("\n")
    assert len(lines) == 3
    assert [line.split(" ") for line in lines] == [
        number.groups[0:4],
        number.groups[4:8],
        number.groups[8:12],
    ]
    assert (
        str(number) == "11561 49118 17242 14267\n16485 06023 65138 62993\n08653 75506 60666 47911"
    )


def test_repr_does_not_dump_keys() -> None:
    text = repr(safety_number("alice", ALICE_KEY, "bob", BOB_KEY))
    assert ALICE_KEY.hex() not in text
    assert repr(ALICE_KEY) not in text


@pytest.mark.parametrize(
    ("user", "key"),
    [("alice", ALICE_KEY[:31]), ("alice", ALICE_KEY + b"\x00"), ("", ALICE_KEY)],
)
def test_malformed_keys_and_empty_names_are_refused(user: str, key: bytes) -> None:
    with pytest.raises(ProtocolError):
        safety_number(user, key, "bob", BOB_KEY)
    with pytest.raises(ProtocolError):
        safety_number("bob", BOB_KEY, user, key)


def test_scanning_the_other_sides_qr_verifies_both_directions() -> None:
    shown_by_bob = safety_number("bob", BOB_KEY, "alice", ALICE_KEY).qr_payload()
    assert verify_qr(shown_by_bob, "alice", ALICE_KEY, "bob", BOB_KEY)
    shown_by_alice = safety_number("alice", ALICE_KEY, "bob", BOB_KEY).qr_payload()
    assert verify_qr(shown_by_alice, "bob", BOB_KEY, "alice", ALICE_KEY)


@pytest.mark.parametrize(
    "shown_by_bob",
    [
        # Bob holds a wrong key for Alice (someone in the middle gave him one).
        pytest.param(("bob", BOB_KEY, "alice", CAROL_KEY), id="bob-has-wrong-alice-key"),
        # Alice holds a wrong key for Bob: the code Bob shows has his real key.
        pytest.param(("bob", CAROL_KEY, "alice", ALICE_KEY), id="alice-has-wrong-bob-key"),
        pytest.param(("bob", BOB_KEY, "mallory", ALICE_KEY), id="bob-thinks-name-differs"),
        pytest.param(("carol", BOB_KEY, "alice", ALICE_KEY), id="shower-name-differs"),
        # Alice is shown her own code (a screenshot of her own screen).
        pytest.param(("alice", ALICE_KEY, "bob", BOB_KEY), id="own-code-reflected"),
    ],
)
def test_qr_mismatch_fails_verification(shown_by_bob: tuple[str, bytes, str, bytes]) -> None:
    payload = safety_number(*shown_by_bob).qr_payload()
    assert not verify_qr(payload, "alice", ALICE_KEY, "bob", BOB_KEY)


def test_foreign_or_damaged_qr_payloads_fail_verification() -> None:
    good = safety_number("bob", BOB_KEY, "alice", ALICE_KEY).qr_payload()
    assert verify_qr(good, "alice", ALICE_KEY, "bob", BOB_KEY)
    for bad in [b"", b"https://example.org/", good[:-1], good + b"\x00", b"BSN\x02" + good[4:]]:
        assert not verify_qr(bad, "alice", ALICE_KEY, "bob", BOB_KEY)
    for i in range(len(good)):
        flipped = good[:i] + bytes([good[i] ^ 0x01]) + good[i + 1 :]
        assert not verify_qr(flipped, "alice", ALICE_KEY, "bob", BOB_KEY)


def qr_matrix(payload: bytes, border: int) -> list[list[bool]]:
    qr = segno.make_qr(payload, error="m")
    return [[bool(module) for module in row] for row in qr.matrix_iter(border=border)]


def text_to_painted(text: str) -> list[list[bool]]:
    glyphs = {" ": (False, False), "▀": (True, False), "▄": (False, True), "█": (True, True)}
    rows: list[list[bool]] = []
    for line in text.split("\n"):
        cells = [glyphs[ch] for ch in line]
        rows.append([top for top, _ in cells])
        rows.append([bottom for _, bottom in cells])
    return rows


@pytest.mark.parametrize("invert", [False, True])
def test_terminal_qr_is_compact_plain_text_of_the_exact_code(invert: bool) -> None:
    payload = safety_number("alice", ALICE_KEY, "bob", BOB_KEY).qr_payload()
    text = render_qr_text(payload, invert=invert)
    assert set(text) <= {" ", "▀", "▄", "█", "\n"}  # no colour or escape codes
    lines = text.split("\n")
    matrix = qr_matrix(payload, border=2)
    assert len(lines) == (len(matrix) + 1) // 2
    assert {len(line) for line in lines} == {len(matrix[0])}
    painted = text_to_painted(text)
    dark = [[cell == invert for cell in row] for row in painted]
    assert dark[: len(matrix)] == matrix
    # The padding row, if any, is quiet zone (light).
    assert all(not cell for row in dark[len(matrix) :] for cell in row)


def test_terminal_qr_differs_for_different_payloads() -> None:
    a = safety_number("alice", ALICE_KEY, "bob", BOB_KEY).qr_payload()
    b = safety_number("alice", ALICE_KEY, "bob", CAROL_KEY).qr_payload()
    assert render_qr_text(a) != render_qr_text(b)


def test_png_is_a_real_png_of_the_code() -> None:
    payload = safety_number("alice", ALICE_KEY, "bob", BOB_KEY).qr_payload()
    data = qr_png(payload, scale=4)
    assert data.startswith(PNG_MAGIC)
    # IHDR is the first chunk; its CRC must check and its size must match the code.
    length, chunk_type = struct.unpack(">I4s", data[8:16])
    assert chunk_type == b"IHDR"
    body = data[16 : 16 + length]
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    assert zlib.crc32(chunk_type + body) == crc
    width, height = struct.unpack(">II", body[:8])
    side = segno.make_qr(payload, error="m").symbol_size(scale=4, border=4)
    assert (width, height) == side
    assert data.endswith(b"IEND\xaeB`\x82")


def test_png_depends_only_on_the_payload_and_the_scale() -> None:
    payload = safety_number("alice", ALICE_KEY, "bob", BOB_KEY).qr_payload()
    other = safety_number("alice", ALICE_KEY, "bob", CAROL_KEY).qr_payload()
    assert qr_png(payload) == qr_png(payload)
    assert qr_png(payload) != qr_png(other)
    assert qr_png(payload, scale=4) != qr_png(payload)


usernames = st.text(min_size=1, max_size=40)
keys = st.binary(min_size=32, max_size=32)


@settings(max_examples=40, deadline=None)
@given(usernames, keys, usernames, keys)
def test_symmetry_for_any_pair(user_a: str, key_a: bytes, user_b: str, key_b: bytes) -> None:
    a_side = safety_number(user_a, key_a, user_b, key_b)
    b_side = safety_number(user_b, key_b, user_a, key_a)
    assert isinstance(a_side, SafetyNumber)
    assert a_side.digits == b_side.digits
    assert len(a_side.digits) == 60
    assert a_side.digits.isdigit()
    assert verify_qr(b_side.qr_payload(), user_a, key_a, user_b, key_b)
    assert verify_qr(a_side.qr_payload(), user_b, key_b, user_a, key_a)
