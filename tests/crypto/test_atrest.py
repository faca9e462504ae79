"""Encryption at rest: the passphrase KDF, purpose keys and the authenticated box."""

from __future__ import annotations

import pytest

from bastion.crypto.atrest import (
    KEY_BYTES,
    NONCE_BYTES,
    SALT_BYTES,
    KdfParams,
    SecretBox,
    derive_master_key,
    purpose_key,
)
from bastion.errors import ProfileError

# The weakest parameters the module accepts: fast enough for tests, still checked.
FAST = KdfParams(memory_kib=19 * 1024, iterations=2, lanes=1)
SALT = bytes(range(SALT_BYTES))
KEY = bytes(range(KEY_BYTES))
AAD = b"kv:alice"


def test_box_round_trip() -> None:
    box = SecretBox(KEY)
    for plaintext in (b"", b"x", b"private notes" * 1000):
        assert box.open(box.seal(plaintext, AAD), AAD) == plaintext


def test_box_hides_the_plaintext_and_never_repeats_a_nonce() -> None:
    box = SecretBox(KEY)
    sealed = [box.seal(b"the same secret", AAD) for _ in range(50)]
    assert all(b"the same secret" not in s for s in sealed)
    assert len({s[:NONCE_BYTES] for s in sealed}) == 50
    assert len(sealed[0]) == NONCE_BYTES + len(b"the same secret") + 16


def test_every_flipped_bit_is_detected() -> None:
    box = SecretBox(KEY)
    sealed = box.seal(b"balance: 100", AAD)
    for index in range(len(sealed)):
        for bit in (0, 7):
            tampered = bytearray(sealed)
            tampered[index] ^= 1 << bit
            with pytest.raises(ProfileError):
                box.open(bytes(tampered), AAD)


def test_truncated_or_extended_record_is_detected() -> None:
    box = SecretBox(KEY)
    sealed = box.seal(b"balance: 100", AAD)
    for damaged in (b"", sealed[:NONCE_BYTES], sealed[:-1], sealed + b"\0"):
        with pytest.raises(ProfileError):
            box.open(damaged, AAD)


def test_record_moved_to_another_name_is_detected() -> None:
    box = SecretBox(KEY)
    sealed = box.seal(b"alice's key", b"kv:alice")
    with pytest.raises(ProfileError):
        box.open(sealed, b"kv:mallory")
    with pytest.raises(ProfileError):
        box.open(sealed, b"")


def test_record_does_not_open_under_another_key() -> None:
    sealed = SecretBox(KEY).seal(b"secret", AAD)
    with pytest.raises(ProfileError):
        SecretBox(bytes(KEY_BYTES)).open(sealed, AAD)


def test_box_refuses_a_short_key_and_hides_its_key() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SecretBox(KEY[:16])
    box = SecretBox(KEY)
    assert repr(box) == "SecretBox(<redacted>)"
    assert KEY.hex() not in repr(box)


@pytest.mark.parametrize(
    "params",
    [
        KdfParams(memory_kib=19 * 1024 - 1, iterations=2, lanes=1),
        KdfParams(memory_kib=1024, iterations=3, lanes=4),
        KdfParams(memory_kib=64 * 1024, iterations=1, lanes=4),
        KdfParams(memory_kib=64 * 1024, iterations=0, lanes=4),
        KdfParams(memory_kib=64 * 1024, iterations=3, lanes=0),
        KdfParams(memory_kib=64 * 1024, iterations=3, lanes=17),
    ],
    ids=["memory-just-below", "memory-low", "one-pass", "zero-pass", "no-lanes", "many-lanes"],
)
def test_weak_kdf_parameters_are_refused(params: KdfParams) -> None:
    with pytest.raises(ProfileError, match="safe minimum"):
        params.check()
    with pytest.raises(ProfileError):
        derive_master_key("correct horse", SALT, params)


def test_default_kdf_parameters_are_strong() -> None:
    params = KdfParams()
    params.check()
    assert (params.memory_kib, params.iterations) >= (64 * 1024, 3)


def test_short_salt_is_refused() -> None:
    with pytest.raises(ProfileError, match="salt"):
        derive_master_key("correct horse", SALT[:-1], FAST)


def test_derivation_is_deterministic_for_the_same_salt() -> None:
    first = derive_master_key("correct horse", SALT, FAST)
    assert len(first) == KEY_BYTES
    assert derive_master_key("correct horse", SALT, FAST) == first


def test_derivation_depends_on_passphrase_salt_and_cost() -> None:
    base = derive_master_key("correct horse", SALT, FAST)
    assert derive_master_key("correct horsf", SALT, FAST) != base
    assert derive_master_key("correct horse", SALT[::-1], FAST) != base
    assert derive_master_key("correct horse", SALT, KdfParams(19 * 1024, 3, 1)) != base


def test_purpose_keys_are_distinct_and_deterministic() -> None:
    master = bytes(range(32))
    records = purpose_key(master, "records")
    assert purpose_key(master, "records") == records
    assert len(records) == KEY_BYTES
    keys = {purpose_key(master, p) for p in ("records", "index", "vodozemac-pickle", "check")}
    assert len(keys) == 4
    assert master not in keys
    assert purpose_key(bytes(32), "records") != records


def test_a_record_sealed_for_one_purpose_does_not_open_under_another() -> None:
    master = bytes(range(32))
    sealed = SecretBox(purpose_key(master, "records")).seal(b"x", AAD)
    with pytest.raises(ProfileError):
        SecretBox(purpose_key(master, "check")).open(sealed, AAD)
