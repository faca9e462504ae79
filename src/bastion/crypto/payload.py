"""The signed plaintext inside every Olm ciphertext.

DESIGN §4: the payload names sender user and device, the user and device the
ciphertext was made for, the conversation, a message id, the time and the
body, and is signed by the sender device's Ed25519 key. The receiver checks
all of it before anything is shown or stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import msgspec
from msgspec import Meta

from bastion.crypto.signing import signing_input, verify_ed25519
from bastion.errors import AuthenticationError, RejectedMessageError
from bastion.protocol.frames import DeviceId, MessageId, Millis, Signature, Username

MESSAGE_CONTEXT = "bastion/v1/message"
MAX_TEXT_CHARS = 16_000


class Payload(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """What a sender says, bound to who says it and to whom."""

    v: Annotated[int, Meta(ge=1, le=1)] = 1
    kind: Annotated[str, Meta(pattern=r"^[a-z_]{1,16}(\.[a-z_]{1,16})?\Z")]
    sender: Username
    sender_device: DeviceId
    recipient: Username
    to: Username
    to_device: DeviceId
    conversation: Annotated[str, Meta(max_length=128)]
    message_id: MessageId
    sent_at: Millis
    body: Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]


class SignedPayload(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A payload's bytes and the sender device's signature over them."""

    payload: Annotated[bytes, Meta(max_length=64 * 1024)]
    signature: Signature


_payload_decoder = msgspec.msgpack.Decoder(Payload)
_signed_decoder = msgspec.msgpack.Decoder(SignedPayload)
_encoder = msgspec.msgpack.Encoder()


def direct_conversation(a: str, b: str) -> str:
    """The conversation id of the 1:1 chat between two users (same on both sides)."""
    first, second = sorted((a, b))
    return f"dm:{first},{second}"


def seal(payload: Payload, sign: Callable[[bytes], bytes]) -> bytes:
    """Encode ``payload`` and sign it with the sender device's key."""
    raw = _encoder.encode(payload)
    signature = sign(signing_input(MESSAGE_CONTEXT, [raw]))
    return _encoder.encode(SignedPayload(raw, signature))


def open_signed(
    plaintext: bytes,
    *,
    sender: str,
    sender_device: str,
    sender_ed25519: bytes,
    me: str,
    my_device: str,
) -> Payload:
    """Verify and decode a decrypted payload from the device that the Olm session is bound to.

    ``sender``/``sender_device``/``sender_ed25519`` describe the device whose
    Olm session decrypted the message (checked against its certificate by the
    caller). Raises :class:`RejectedMessageError` naming the failed check.
    """
    try:
        signed = _signed_decoder.decode(plaintext)
    except (msgspec.ValidationError, msgspec.DecodeError):
        raise RejectedMessageError("malformed payload") from None
    try:
        verify_ed25519(
            sender_ed25519, signed.signature, signing_input(MESSAGE_CONTEXT, [signed.payload])
        )
    except AuthenticationError:
        raise RejectedMessageError("bad signature") from None
    try:
        payload = _payload_decoder.decode(signed.payload)
    except (msgspec.ValidationError, msgspec.DecodeError):
        raise RejectedMessageError("malformed payload") from None
    if payload.sender != sender or payload.sender_device != sender_device:
        raise RejectedMessageError("sender inside the message does not match its session")
    if payload.to != me or payload.to_device != my_device:
        raise RejectedMessageError("message was addressed to another device")
    if payload.recipient == payload.sender:
        raise RejectedMessageError("message names its sender as its recipient")
    if me not in (sender, payload.recipient):
        raise RejectedMessageError("message was meant for another user")
    if payload.conversation != direct_conversation(payload.sender, payload.recipient):
        raise RejectedMessageError("conversation does not match its members")
    return payload
