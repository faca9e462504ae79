"""Device ids, device certificates, signed one-time/fallback keys, and the signing input."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.crypto.device import (
    CERTIFICATE_CONTEXT,
    REVOCATION_CONTEXT,
    DeviceCertificate,
    SignedDeviceList,
    device_id_for,
    key_signing_input,
    sign_revocation,
    verify_published_key,
    verify_revocation,
)
from bastion.crypto.olm import OlmDevice
from bastion.crypto.signing import AccountIdentity, Part, signing_input, verify_signed
from bastion.errors import AuthenticationError

DEVICE_ID = re.compile(r"[a-z2-7]{16}")
CREATED = 1_700_000_000_000


@pytest.fixture(scope="module")
def account() -> AccountIdentity:
    return AccountIdentity.generate()


@pytest.fixture(scope="module")
def device() -> OlmDevice:
    return OlmDevice.create()


@pytest.fixture
def certificate(account: AccountIdentity, device: OlmDevice) -> DeviceCertificate:
    return DeviceCertificate.issue(
        account,
        username="alice",
        ed25519=device.ed25519,
        curve25519=device.curve25519,
        created_at=CREATED,
    )


# --- device ids --------------------------------------------------------------------------------


def test_device_id_is_16_base32_characters(device: OlmDevice) -> None:
    assert DEVICE_ID.fullmatch(device.device_id)
    assert device.device_id == device_id_for(device.ed25519, device.curve25519)


def test_device_id_changes_with_either_key() -> None:
    ed, curve = bytes(32), bytes(range(32))
    base = device_id_for(ed, curve)
    assert device_id_for(b"\x01" + ed[1:], curve) != base
    assert device_id_for(ed, curve[:-1] + b"\xff") != base
    assert device_id_for(curve, ed) != base  # the two keys are not interchangeable


def test_fresh_devices_get_distinct_ids() -> None:
    assert len({OlmDevice.create().device_id for _ in range(20)}) == 20


# --- certificates ------------------------------------------------------------------------------


def test_certificate_verifies_under_its_account_key(
    certificate: DeviceCertificate, account: AccountIdentity, device: OlmDevice
) -> None:
    assert certificate.device_id == device.device_id
    certificate.verify(account.public_bytes)


def test_certificate_does_not_verify_under_another_account_key(
    certificate: DeviceCertificate,
) -> None:
    with pytest.raises(AuthenticationError):
        certificate.verify(AccountIdentity.generate().public_bytes)


OTHER = OlmDevice.create()


@pytest.mark.parametrize(
    "change",
    [
        {"username": "mallory"},
        {"username": "alice2"},
        {"device_id": OTHER.device_id},
        {"ed25519": OTHER.ed25519},
        {"curve25519": OTHER.curve25519},
        {"created_at": CREATED + 1},
        {"created_at": 0},
    ],
    ids=lambda c: next(iter(c)),
)
def test_altered_certificate_fails(
    certificate: DeviceCertificate, account: AccountIdentity, change: dict[str, object]
) -> None:
    altered = dataclasses.replace(certificate, **change)  # type: ignore[arg-type]
    with pytest.raises(AuthenticationError):
        altered.verify(account.public_bytes)


def test_swapped_device_keys_fail(certificate: DeviceCertificate, account: AccountIdentity) -> None:
    swapped = dataclasses.replace(
        certificate, ed25519=certificate.curve25519, curve25519=certificate.ed25519
    )
    with pytest.raises(AuthenticationError):
        swapped.verify(account.public_bytes)


def test_signed_certificate_for_a_non_derived_device_id_fails(
    account: AccountIdentity, device: OlmDevice
) -> None:
    # The account key really signed it, but the id does not come from the keys: a server (or
    # a confused client) must not be able to make one id stand for another device's keys.
    claimed_id = OTHER.device_id
    parts: list[Part] = ["alice", claimed_id, device.ed25519, device.curve25519, CREATED]
    signature = account.sign(CERTIFICATE_CONTEXT, parts)
    verify_signed(account.public_bytes, signature, CERTIFICATE_CONTEXT, parts)  # genuinely signed
    forged = DeviceCertificate(
        "alice", claimed_id, device.ed25519, device.curve25519, CREATED, signature
    )
    with pytest.raises(AuthenticationError, match="device id"):
        forged.verify(account.public_bytes)


def test_certificate_signature_is_not_a_sign_in_signature(
    certificate: DeviceCertificate, account: AccountIdentity
) -> None:
    parts: list[Part] = [
        certificate.username,
        certificate.device_id,
        certificate.ed25519,
        certificate.curve25519,
        certificate.created_at,
    ]
    with pytest.raises(AuthenticationError):
        verify_signed(account.public_bytes, certificate.signature, "bastion/v1/signin", parts)


# --- one-time and fallback keys ----------------------------------------------------------------


def test_published_keys_verify_for_their_purpose(device: OlmDevice) -> None:
    [otk] = device.new_one_time_keys(1)
    fallback = device.new_fallback_key()
    verify_published_key(device.ed25519, device.device_id, otk.key, otk.signature, fallback=False)
    verify_published_key(
        device.ed25519, device.device_id, fallback.key, fallback.signature, fallback=True
    )


def test_one_time_and_fallback_signatures_are_not_interchangeable(device: OlmDevice) -> None:
    [otk] = device.new_one_time_keys(1)
    fallback = device.new_fallback_key()
    # A server cannot pass a one-time key off as a fallback key or the other way round.
    with pytest.raises(AuthenticationError):
        verify_published_key(
            device.ed25519, device.device_id, otk.key, otk.signature, fallback=True
        )
    with pytest.raises(AuthenticationError):
        verify_published_key(
            device.ed25519, device.device_id, fallback.key, fallback.signature, fallback=False
        )
    assert key_signing_input(device.device_id, otk.key, fallback=True) != key_signing_input(
        device.device_id, otk.key, fallback=False
    )


def test_published_key_is_bound_to_its_device(device: OlmDevice) -> None:
    [otk] = device.new_one_time_keys(1)
    [other_otk] = OTHER.new_one_time_keys(1)
    with pytest.raises(AuthenticationError):  # another device id
        verify_published_key(
            device.ed25519, OTHER.device_id, otk.key, otk.signature, fallback=False
        )
    with pytest.raises(AuthenticationError):  # another device's key swapped in
        verify_published_key(
            device.ed25519, device.device_id, other_otk.key, otk.signature, fallback=False
        )
    with pytest.raises(AuthenticationError):  # signed by another device
        verify_published_key(
            device.ed25519, device.device_id, other_otk.key, other_otk.signature, fallback=False
        )


# --- the signing input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (["ab", "c"], ["a", "bc"]),
        ([b"ab", b"c"], [b"a", b"bc"]),
        (["abc"], [b"abc"]),
        (["1"], [1]),
        ([b"\x00" * 8], [0]),
        (["a", ""], ["a"]),
        ([""], []),
        (["a\x00b"], ["a", "b"]),
    ],
)
def test_signing_input_is_injective_on_tricky_inputs(first: list[Part], second: list[Part]) -> None:
    assert signing_input("bastion/v1/test", first) != signing_input("bastion/v1/test", second)


def test_signing_input_separates_contexts() -> None:
    assert signing_input("bastion/v1/a", ["b"]) != signing_input("bastion/v1/ab", [])
    assert signing_input("bastion/v1/signin", ["x"]) != signing_input("bastion/v1/register", ["x"])


def test_signing_input_refuses_foreign_contexts_and_booleans() -> None:
    with pytest.raises(ValueError, match="bastion/v1/"):
        signing_input("signin", ["x"])
    with pytest.raises(TypeError):
        signing_input("bastion/v1/test", [True])


parts = st.lists(
    st.one_of(st.binary(max_size=8), st.text(max_size=8), st.integers(-(2**63), 2**63 - 1)),
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(parts, parts)
def test_signing_input_is_injective(first: list[Part], second: list[Part]) -> None:
    def tagged(values: list[Part]) -> list[tuple[str, Part]]:
        return [(type(v).__name__, v) for v in values]

    if tagged(first) != tagged(second):
        assert signing_input("bastion/v1/test", first) != signing_input("bastion/v1/test", second)


# --- revocations -------------------------------------------------------------------------------


def test_revocation_verifies_only_as_signed(account: AccountIdentity, device: OlmDevice) -> None:
    signature = sign_revocation(account, "alice", device.device_id, CREATED)
    verify_revocation(account.public_bytes, signature, "alice", device.device_id, CREATED)
    for username, device_id, revoked_at in [
        ("mallory", device.device_id, CREATED),
        ("alice", OTHER.device_id, CREATED),
        ("alice", device.device_id, CREATED + 1),
    ]:
        with pytest.raises(AuthenticationError):
            verify_revocation(account.public_bytes, signature, username, device_id, revoked_at)
    with pytest.raises(AuthenticationError):  # the server cannot revoke with a key of its own
        verify_revocation(
            AccountIdentity.generate().public_bytes, signature, "alice", device.device_id, CREATED
        )


def test_a_device_key_cannot_revoke(device: OlmDevice, account: AccountIdentity) -> None:
    # A stolen device signs its own "revocation" of the owner's other device: not the account key.
    forged = device.sign(signing_input(REVOCATION_CONTEXT, ["alice", OTHER.device_id, CREATED]))
    with pytest.raises(AuthenticationError):
        verify_revocation(account.public_bytes, forged, "alice", OTHER.device_id, CREATED)


def test_device_list_verifies_only_as_signed(account: AccountIdentity) -> None:
    ids = ["bbbbbbbbbbbbbbbb", "aaaaaaaaaaaaaaaa"]
    signed = SignedDeviceList.issue(account, username="alice", version=3, device_ids=ids)
    assert signed.device_ids == ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb")
    signed.verify(account.public_bytes)
    altered = [
        dataclasses.replace(signed, version=2),
        dataclasses.replace(signed, version=4),
        dataclasses.replace(signed, device_ids=("aaaaaaaaaaaaaaaa",)),
        dataclasses.replace(signed, device_ids=(*signed.device_ids, "cccccccccccccccc")),
        dataclasses.replace(signed, device_ids=tuple(reversed(signed.device_ids))),
        dataclasses.replace(signed, username="mallory"),
    ]
    for bad in altered:
        with pytest.raises(AuthenticationError):
            bad.verify(account.public_bytes)
    with pytest.raises(AuthenticationError):
        signed.verify(AccountIdentity.generate().public_bytes)


def test_a_revocation_signature_is_not_a_device_list_signature(account: AccountIdentity) -> None:
    # Same key, another purpose: the context string keeps them apart.
    signature = sign_revocation(account, "alice", "aaaaaaaaaaaaaaaa", 1)
    forged = SignedDeviceList("alice", 1, ("aaaaaaaaaaaaaaaa",), signature)
    with pytest.raises(AuthenticationError):
        forged.verify(account.public_bytes)
    with pytest.raises(ValueError):
        SignedDeviceList.issue(account, username="alice", version=0, device_ids=[])
