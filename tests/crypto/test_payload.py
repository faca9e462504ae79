"""The signed payload inside every ciphertext, and every check the receiver makes on it."""

from __future__ import annotations

import msgspec
import pytest

from bastion.crypto.olm import OlmDevice
from bastion.crypto.payload import (
    MESSAGE_CONTEXT,
    Payload,
    SignedPayload,
    direct_conversation,
    open_signed,
    seal,
)
from bastion.crypto.signing import signing_input
from bastion.errors import RejectedMessageError

ALICE = OlmDevice.create()  # alice's phone, the sender
ALICE_LAPTOP = OlmDevice.create()  # alice's other device, which gets sync copies
BOB = OlmDevice.create()  # the recipient
BOB_TABLET = OlmDevice.create()
MALLORY = OlmDevice.create()


def message(**changes: object) -> Payload:
    payload = Payload(
        kind="text",
        sender="alice",
        sender_device=ALICE.device_id,
        recipient="bob",
        to="bob",
        to_device=BOB.device_id,
        conversation=direct_conversation("alice", "bob"),
        message_id=bytes(range(16)),
        sent_at=1_700_000_000_000,
        body="meet at noon",
    )
    return msgspec.structs.replace(payload, **changes)


def open_as_bob(
    plaintext: bytes,
    *,
    sender: str = "alice",
    sender_device: OlmDevice = ALICE,
    me: str = "bob",
    my_device: OlmDevice = BOB,
) -> Payload:
    """Open as the device whose Olm session with ``sender_device`` decrypted the message."""
    return open_signed(
        plaintext,
        sender=sender,
        sender_device=sender_device.device_id,
        sender_ed25519=sender_device.ed25519,
        me=me,
        my_device=my_device.device_id,
    )


def test_direct_conversation_is_the_same_for_both_sides() -> None:
    assert direct_conversation("bob", "alice") == direct_conversation("alice", "bob")
    assert direct_conversation("alice", "bob") == "dm:alice,bob"


def test_sealed_message_opens_for_its_recipient() -> None:
    assert open_as_bob(seal(message(), ALICE.sign)) == message()


def test_sealed_bytes_do_not_depend_on_anything_but_the_payload() -> None:
    # Ed25519 is deterministic: the same payload seals to the same bytes, a change changes them.
    assert seal(message(), ALICE.sign) == seal(message(), ALICE.sign)
    assert seal(message(), ALICE.sign) != seal(message(body="meet at one"), ALICE.sign)


def test_signature_covers_the_domain_separated_payload() -> None:
    signed = msgspec.msgpack.decode(seal(message(), ALICE.sign), type=SignedPayload)
    expected = ALICE.sign(signing_input(MESSAGE_CONTEXT, [signed.payload]))
    assert signed.signature == expected
    # A signature over the bare payload (no context) is refused.
    bare = SignedPayload(signed.payload, ALICE.sign(signed.payload))
    with pytest.raises(RejectedMessageError, match="bad signature"):
        open_as_bob(msgspec.msgpack.encode(bare))


def resign(
    plaintext: bytes, *, payload: bytes | None = None, signature: bytes | None = None
) -> bytes:
    signed = msgspec.msgpack.decode(plaintext, type=SignedPayload)
    return msgspec.msgpack.encode(
        SignedPayload(
            signed.payload if payload is None else payload,
            signed.signature if signature is None else signature,
        )
    )


def test_flipped_signature_bit_is_rejected() -> None:
    good = seal(message(), ALICE.sign)
    signed = msgspec.msgpack.decode(good, type=SignedPayload)
    bad = bytearray(signed.signature)
    bad[10] ^= 0x01
    with pytest.raises(RejectedMessageError, match="bad signature"):
        open_as_bob(resign(good, signature=bytes(bad)))


def test_altered_payload_is_rejected() -> None:
    good = seal(message(), ALICE.sign)
    altered = msgspec.msgpack.encode(message(body="meet at midnight"))
    with pytest.raises(RejectedMessageError, match="bad signature"):
        open_as_bob(resign(good, payload=altered))


def test_message_signed_by_another_device_is_rejected() -> None:
    # Mallory writes a message in alice's name but can only sign it with her own key.
    with pytest.raises(RejectedMessageError, match="bad signature"):
        open_as_bob(seal(message(), MALLORY.sign))


def test_sender_named_inside_must_be_the_session_sender() -> None:
    # Mallory's own, validly signed message claims to come from alice (the Matrix 2025 break).
    forged = seal(message(sender_device=MALLORY.device_id), MALLORY.sign)
    with pytest.raises(RejectedMessageError, match="sender inside"):
        open_as_bob(forged, sender="mallory", sender_device=MALLORY)


def test_sender_device_named_inside_must_be_the_session_device() -> None:
    # Signed by the right key, but it names alice's laptop as the sending device.
    forged = seal(message(sender_device=ALICE_LAPTOP.device_id), ALICE.sign)
    with pytest.raises(RejectedMessageError, match="sender inside"):
        open_as_bob(forged)


def test_message_for_another_device_of_mine_is_rejected() -> None:
    # The copy alice made for bob's tablet, forwarded to bob's phone.
    forwarded = seal(message(to_device=BOB_TABLET.device_id), ALICE.sign)
    with pytest.raises(RejectedMessageError, match="another device"):
        open_as_bob(forwarded)


def test_message_for_another_user_is_rejected() -> None:
    # Alice's message to carol, forwarded by carol to bob.
    to_carol = message(
        recipient="carol",
        to="carol",
        to_device=BOB.device_id,
        conversation=direct_conversation("alice", "carol"),
    )
    with pytest.raises(RejectedMessageError, match="another device"):
        open_as_bob(seal(to_carol, ALICE.sign))


def test_message_addressed_to_me_but_meant_for_someone_else_is_rejected() -> None:
    # Delivered to bob's device, but the conversation is alice and carol's.
    about_carol = message(recipient="carol", conversation=direct_conversation("alice", "carol"))
    with pytest.raises(RejectedMessageError, match="another user"):
        open_as_bob(seal(about_carol, ALICE.sign))


@pytest.mark.parametrize(
    "conversation", ["dm:alice,carol", "dm:bob,alice", "group:1", "", "dm:alice,bob "]
)
def test_wrong_conversation_is_rejected(conversation: str) -> None:
    with pytest.raises(RejectedMessageError, match="conversation"):
        open_as_bob(seal(message(conversation=conversation), ALICE.sign))


def sign_raw(payload: bytes) -> bytes:
    """A correctly signed wrapper around arbitrary payload bytes."""
    signature = ALICE.sign(signing_input(MESSAGE_CONTEXT, [payload]))
    return msgspec.msgpack.encode(SignedPayload(payload, signature))


VALID_FIELDS = msgspec.to_builtins(message(), builtin_types=(bytes,))

MALFORMED = {
    "empty": b"",
    "not msgpack": b"\xc1\xc1",
    "not a wrapper": msgspec.msgpack.encode({"payload": b"x"}),
    "wrapper with extra field": msgspec.msgpack.encode(
        {"payload": b"x", "signature": bytes(64), "admin": True}
    ),
    "short signature": msgspec.msgpack.encode([b"x", bytes(63)]),
    "signed garbage": sign_raw(b"\xc1"),
    "signed extra field": sign_raw(msgspec.msgpack.encode({**VALID_FIELDS, "forwarded": True})),
    "signed missing field": sign_raw(
        msgspec.msgpack.encode({k: v for k, v in VALID_FIELDS.items() if k != "to_device"})
    ),
    "signed version 2": sign_raw(msgspec.msgpack.encode({**VALID_FIELDS, "v": 2})),
    "signed bad username": sign_raw(msgspec.msgpack.encode({**VALID_FIELDS, "to": "Bob"})),
    "signed oversize text": sign_raw(
        msgspec.msgpack.encode({**VALID_FIELDS, "body": "x" * 16_001})
    ),
}


@pytest.mark.parametrize("plaintext", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_plaintext_is_rejected(plaintext: bytes) -> None:
    with pytest.raises(RejectedMessageError, match="malformed"):
        open_as_bob(plaintext)


def test_the_malformed_cases_differ_from_a_valid_one_only_in_their_defect() -> None:
    assert open_as_bob(sign_raw(msgspec.msgpack.encode(VALID_FIELDS))) == message()


# --- sync copies (what my own other devices receive) -------------------------------------------


def sync_copy(**changes: object) -> Payload:
    """The copy of alice's message to bob that alice's laptop receives."""
    base = message(to="alice", to_device=ALICE_LAPTOP.device_id)
    return msgspec.structs.replace(base, **changes)


def open_as_laptop(
    plaintext: bytes, *, sender: str = "alice", device: OlmDevice = ALICE
) -> Payload:
    return open_as_bob(
        plaintext, sender=sender, sender_device=device, me="alice", my_device=ALICE_LAPTOP
    )


def test_sync_copy_from_my_own_device_is_accepted() -> None:
    opened = open_as_laptop(seal(sync_copy(), ALICE.sign))
    assert (opened.sender, opened.recipient, opened.body) == ("alice", "bob", "meet at noon")


def test_sync_copy_cannot_come_from_someone_else() -> None:
    # Mallory's "copy of a message alice sent" (the XMPP Carbons break) names alice as sender.
    forged = seal(sync_copy(sender_device=MALLORY.device_id), MALLORY.sign)
    with pytest.raises(RejectedMessageError, match="sender inside"):
        open_as_laptop(forged, sender="mallory", device=MALLORY)
    # Mallory's own copy of a message from mallory to bob is not alice's business.
    own = sync_copy(
        sender="mallory",
        sender_device=MALLORY.device_id,
        conversation=direct_conversation("mallory", "bob"),
    )
    with pytest.raises(RejectedMessageError, match="another user"):
        open_as_laptop(seal(own, MALLORY.sign), sender="mallory", device=MALLORY)


def test_sync_copy_must_name_someone_else_as_recipient() -> None:
    to_self = sync_copy(recipient="alice", conversation=direct_conversation("alice", "alice"))
    with pytest.raises(RejectedMessageError):
        open_as_laptop(seal(to_self, ALICE.sign))
