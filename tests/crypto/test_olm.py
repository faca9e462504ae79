"""Olm devices and sessions (vodozemac): setup by a claimed key, tampering, replay, pickles."""

from __future__ import annotations

import os

import pytest

from bastion.crypto.device import verify_published_key
from bastion.crypto.olm import NORMAL, PRE_KEY, OlmDevice, OlmSession
from bastion.errors import AuthenticationError, ProfileError

PICKLE_KEY = bytes(range(32))


class Pair:
    """Alice started a session with Bob using one of Bob's claimed one-time keys."""

    def __init__(self) -> None:
        self.alice = OlmDevice.create()
        self.bob = OlmDevice.create()
        [claimed] = self.bob.new_one_time_keys(1)
        verify_published_key(
            self.bob.ed25519, self.bob.device_id, claimed.key, claimed.signature, fallback=False
        )
        self.alice_session = self.alice.outbound_session(self.bob.curve25519, claimed.key)
        self.first_kind, self.first_body = self.alice_session.encrypt(b"hello bob")
        self.bob_session, self.first_plaintext = self.bob.inbound_session(
            self.alice.curve25519, self.first_body
        )


@pytest.fixture
def pair() -> Pair:
    return Pair()


def test_session_from_a_claimed_key_carries_messages_both_ways(pair: Pair) -> None:
    assert pair.first_kind == PRE_KEY
    assert pair.first_plaintext == b"hello bob"
    assert pair.bob_session.session_id == pair.alice_session.session_id

    kind, body = pair.bob_session.encrypt(b"hi alice")
    assert kind == NORMAL
    assert pair.alice_session.decrypt(kind, body) == b"hi alice"
    for i in range(5):
        kind, body = pair.alice_session.encrypt(f"message {i}".encode())
        assert kind == NORMAL  # bob answered, so alice no longer sends pre-key messages
        assert pair.bob_session.decrypt(kind, body) == f"message {i}".encode()


def test_ciphertext_does_not_contain_the_plaintext(pair: Pair) -> None:
    _, body = pair.alice_session.encrypt(b"attack at dawn")
    assert b"attack at dawn" not in body
    assert b"hello bob" not in pair.first_body


def test_out_of_order_messages_still_decrypt(pair: Pair) -> None:
    kind, body = pair.bob_session.encrypt(b"ack")
    pair.alice_session.decrypt(kind, body)
    sent = [pair.alice_session.encrypt(f"m{i}".encode()) for i in range(3)]
    assert [pair.bob_session.decrypt(*m) for m in reversed(sent)] == [b"m2", b"m1", b"m0"]


def test_flipped_byte_fails(pair: Pair) -> None:
    kind, body = pair.bob_session.encrypt(b"transfer 10")
    for index in (len(body) // 2, len(body) - 1):
        tampered = bytearray(body)
        tampered[index] ^= 0x01
        with pytest.raises(AuthenticationError):
            pair.alice_session.decrypt(kind, bytes(tampered))
    # The session is not harmed by the forgery: the genuine message still decrypts.
    assert pair.alice_session.decrypt(kind, body) == b"transfer 10"


def test_replayed_normal_message_fails(pair: Pair) -> None:
    kind, body = pair.bob_session.encrypt(b"ack")
    pair.alice_session.decrypt(kind, body)
    kind, body = pair.alice_session.encrypt(b"pay 10")
    assert kind == NORMAL
    assert pair.bob_session.decrypt(kind, body) == b"pay 10"
    with pytest.raises(AuthenticationError):
        pair.bob_session.decrypt(kind, body)


def test_replayed_pre_key_message_cannot_start_a_second_session(pair: Pair) -> None:
    # The one-time key was used up by the first inbound session.
    with pytest.raises(AuthenticationError):
        pair.bob.inbound_session(pair.alice.curve25519, pair.first_body)


def test_pre_key_message_from_another_identity_key_is_refused() -> None:
    alice, bob, mallory = OlmDevice.create(), OlmDevice.create(), OlmDevice.create()
    [claimed] = bob.new_one_time_keys(1)
    _, body = alice.outbound_session(bob.curve25519, claimed.key).encrypt(b"from alice")
    # The server says it is from mallory's device: the message itself says otherwise.
    with pytest.raises(AuthenticationError):
        bob.inbound_session(mallory.curve25519, body)
    # The refusal did not use up the one-time key: the real sender still gets through.
    _, plaintext = bob.inbound_session(alice.curve25519, body)
    assert plaintext == b"from alice"


def test_session_matches_only_its_own_pre_key_messages(pair: Pair) -> None:
    assert pair.bob_session.matches(pair.first_body)
    other = Pair()
    assert not pair.bob_session.matches(other.first_body)
    assert not pair.bob_session.matches(b"not a message")


@pytest.mark.parametrize("kind", [PRE_KEY, NORMAL])
@pytest.mark.parametrize("body", [b"", b"\x00" * 5, b"\x03" + os.urandom(200)])
def test_garbage_fails_with_authentication_error(pair: Pair, kind: int, body: bytes) -> None:
    with pytest.raises(AuthenticationError):
        pair.bob_session.decrypt(kind, body)
    with pytest.raises(AuthenticationError):
        pair.bob.inbound_session(pair.alice.curve25519, body)


def test_unknown_message_kind_fails_with_authentication_error(pair: Pair) -> None:
    _, body = pair.alice_session.encrypt(b"x")
    for kind in (-1, 2, 2**64):
        with pytest.raises(AuthenticationError):
            pair.bob_session.decrypt(kind, body)


def test_unusable_claimed_keys_are_refused() -> None:
    alice, bob = OlmDevice.create(), OlmDevice.create()
    with pytest.raises(AuthenticationError):  # an all-zero (low-order) key from a server
        alice.outbound_session(bob.curve25519, bytes(32))
    with pytest.raises(AuthenticationError):
        alice.outbound_session(b"short", bytes(range(32)))


def test_one_time_keys_are_fresh_and_distinct() -> None:
    device = OlmDevice.create()
    first = device.new_one_time_keys(10)
    second = device.new_one_time_keys(10)
    keys = {k.key for k in first + second}
    assert len(keys) == 20
    assert all(len(k) == 32 for k in keys)


def test_fallback_key_is_signed_as_a_fallback_key() -> None:
    device = OlmDevice.create()
    fallback = device.new_fallback_key()
    verify_published_key(
        device.ed25519, device.device_id, fallback.key, fallback.signature, fallback=True
    )
    assert device.new_fallback_key().key != fallback.key


def test_session_over_a_fallback_key_works() -> None:
    alice, bob = OlmDevice.create(), OlmDevice.create()
    fallback = bob.new_fallback_key()
    _, body = alice.outbound_session(bob.curve25519, fallback.key).encrypt(b"no one-time keys left")
    _, plaintext = bob.inbound_session(alice.curve25519, body)
    assert plaintext == b"no one-time keys left"


# --- pickles -----------------------------------------------------------------------------------


def test_device_pickle_round_trips(pair: Pair) -> None:
    restored = OlmDevice.from_pickle(pair.bob.pickle(PICKLE_KEY), PICKLE_KEY)
    assert (restored.ed25519, restored.curve25519, restored.device_id) == (
        pair.bob.ed25519,
        pair.bob.curve25519,
        pair.bob.device_id,
    )
    assert restored.sign(b"x") == pair.bob.sign(b"x")


def test_session_pickle_round_trips_and_keeps_its_ratchet(pair: Pair) -> None:
    restored = OlmSession.from_pickle(pair.bob_session.pickle(PICKLE_KEY), PICKLE_KEY)
    assert restored.session_id == pair.bob_session.session_id
    kind, body = pair.alice_session.encrypt(b"after restart")
    assert restored.decrypt(kind, body) == b"after restart"


def test_pickles_hide_their_keys(pair: Pair) -> None:
    pickle = pair.bob.pickle(PICKLE_KEY)
    assert pair.bob.curve25519.hex() not in pickle
    assert repr(pair.bob_session) == "OlmSession(<redacted>)"


@pytest.mark.parametrize("key", [bytes(32), PICKLE_KEY[::-1], b"", PICKLE_KEY[:31]])
def test_pickles_do_not_open_with_another_key(pair: Pair, key: bytes) -> None:
    with pytest.raises(ProfileError):
        OlmDevice.from_pickle(pair.bob.pickle(PICKLE_KEY), key)
    with pytest.raises(ProfileError):
        OlmSession.from_pickle(pair.bob_session.pickle(PICKLE_KEY), key)


@pytest.mark.parametrize("pickle", ["", "not a pickle", "AAAA"])
def test_damaged_pickles_are_a_profile_error(pickle: str) -> None:
    with pytest.raises(ProfileError):
        OlmDevice.from_pickle(pickle, PICKLE_KEY)
    with pytest.raises(ProfileError):
        OlmSession.from_pickle(pickle, PICKLE_KEY)
