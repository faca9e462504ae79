"""Megolm room keys for group chats, and the signed plaintext inside every group message.

Each sender device has one outbound Megolm session per group. Its key travels
only over Olm (payload kind ``group.key``), and a receiver files it under the
device that sent it, so a key is only ever used for messages from that device.
Inside the Megolm ciphertext the plaintext names the group, the sender user and
device, a message id, the time, the message's kind and the sender's chain head
(position and hash of the verified group state it was sent from), and is signed
by the sender device's Ed25519 key (DESIGN §4, §5): a ciphertext moved to another
group, claimed by another device, or with its kind or head changed fails the
checks. A room key names the sharer's chain head the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Final

import msgspec
import vodozemac
from msgspec import Meta

from bastion.crypto.payload import MAX_TEXT_CHARS
from bastion.crypto.signing import signing_input, verify_ed25519
from bastion.errors import AuthenticationError, RejectedMessageError
from bastion.protocol.frames import DeviceId, Key32, MessageId, Millis, Seq, Signature, Username

GROUP_MESSAGE_CONTEXT: Final = "bastion/v1/group-message"
ROTATE_AFTER_MESSAGES: Final = 100
ROTATE_AFTER_MS: Final = 7 * 86_400_000
ROOM_KEY_KIND: Final = "group.key"


class GroupPlaintext(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What a group message says, bound to its group and its sender device."""

    group_id: Key32
    sender: Username
    sender_device: DeviceId
    message_id: MessageId
    sent_at: Millis
    body: Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]
    kind: Annotated[str, Meta(pattern=r"^(text|file\.offer)\Z")] = "text"
    chain_seq: Seq
    chain_hash: Key32
    signature: Signature = b""


class RoomKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The body of a ``group.key`` payload (JSON): a Megolm session key for one group."""

    group_id: str
    session_id: Annotated[str, Meta(max_length=128)]
    session_key: Annotated[str, Meta(max_length=4096)]
    chain_seq: Seq
    chain_hash: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")]


class OutboundSession(msgspec.Struct, kw_only=True):
    """This device's sending session in one group, and whom its key went to."""

    group_id: bytes
    session_id: str
    pickle: str
    created_at: int
    sent: int = 0
    shared: dict[str, list[str]] = msgspec.field(default_factory=dict)


class InboundSession(msgspec.Struct, kw_only=True):
    """A sender device's session key, as received over Olm from that device."""

    group_id: bytes
    sender: str
    sender_device: str
    session_id: str
    pickle: str
    last_index: int = -1


_encoder = msgspec.msgpack.Encoder()
_plaintext_decoder = msgspec.msgpack.Decoder(GroupPlaintext)


def _signed_parts(p: GroupPlaintext) -> list[bytes | str | int]:
    return [
        p.group_id,
        p.sender,
        p.sender_device,
        p.message_id,
        p.sent_at,
        p.kind,
        p.chain_seq,
        p.chain_hash,
        p.body,
    ]


def new_outbound(group_id: bytes, pickle_key: bytes, now_ms: int) -> OutboundSession:
    """A fresh Megolm session for sending to ``group_id``."""
    session = vodozemac.GroupSession()
    return OutboundSession(
        group_id=group_id,
        session_id=session.session_id,
        pickle=session.pickle(pickle_key),
        created_at=now_ms,
    )


def needs_rotation(
    out: OutboundSession,
    now_ms: int,
    *,
    max_messages: int = ROTATE_AFTER_MESSAGES,
    max_age_ms: int = ROTATE_AFTER_MS,
) -> bool:
    """True after ``max_messages`` messages or ``max_age_ms`` (default: 100 messages, 7 days).

    Departures and revoked devices are checked by callers.
    """
    return out.sent >= max_messages or now_ms - out.created_at >= max_age_ms


def room_key(
    out: OutboundSession, pickle_key: bytes, *, chain_seq: int, chain_hash: bytes
) -> RoomKey:
    """The key to share for ``out`` at its current message index, naming the chain head."""
    session = vodozemac.GroupSession.from_pickle(out.pickle, pickle_key)
    return RoomKey(
        out.group_id.hex(),
        session.session_id,
        session.session_key.to_base64(),
        chain_seq,
        chain_hash.hex(),
    )


def encrypt(
    out: OutboundSession,
    plaintext: GroupPlaintext,
    sign: Callable[[bytes], bytes],
    pickle_key: bytes,
) -> tuple[OutboundSession, bytes]:
    """Sign ``plaintext`` with ``sign`` (the device key) and Megolm-encrypt it.

    Returns the advanced session and the ciphertext.
    """
    signature = sign(signing_input(GROUP_MESSAGE_CONTEXT, _signed_parts(plaintext)))
    sealed = _encoder.encode(msgspec.structs.replace(plaintext, signature=signature))
    session = vodozemac.GroupSession.from_pickle(out.pickle, pickle_key)
    message = session.encrypt(sealed)
    advanced = msgspec.structs.replace(out, pickle=session.pickle(pickle_key), sent=out.sent + 1)
    return advanced, message.to_bytes()


def import_room_key(
    key: RoomKey, *, group_id: bytes, sender: str, sender_device: str, pickle_key: bytes
) -> InboundSession:
    """Turn a received room key into an inbound session; raises RejectedMessageError."""
    try:
        session = vodozemac.InboundGroupSession(vodozemac.SessionKey(key.session_key))
    except (vodozemac.SessionKeyDecodeException, ValueError):
        raise RejectedMessageError("malformed room key") from None
    if session.session_id != key.session_id:
        raise RejectedMessageError("room key does not match its session id")
    return InboundSession(
        group_id=group_id,
        sender=sender,
        sender_device=sender_device,
        session_id=session.session_id,
        pickle=session.pickle(pickle_key),
        last_index=session.first_known_index - 1,
    )


def decrypt(
    inbound: InboundSession,
    ciphertext: bytes,
    *,
    group_id: bytes,
    sender: str,
    sender_device: str,
    sender_ed25519: bytes,
    pickle_key: bytes,
) -> tuple[InboundSession, GroupPlaintext]:
    """Decrypt and check a group message from the device ``inbound`` belongs to.

    Checks: Megolm authenticity, a message index above every index seen (no
    replay, no reordering), the sender device's signature, and that group,
    sender and device inside match. Raises :class:`RejectedMessageError`;
    ``inbound`` itself is not changed (the caller stores the returned one).
    """
    try:
        message = vodozemac.MegolmMessage.from_bytes(ciphertext)
        session = vodozemac.InboundGroupSession.from_pickle(inbound.pickle, pickle_key)
        decrypted = session.decrypt(message)
    except (vodozemac.DecodeException, vodozemac.MegolmDecryptionException, ValueError):
        raise RejectedMessageError("group message could not be decrypted") from None
    if decrypted.message_index <= inbound.last_index:
        raise RejectedMessageError("replayed or reordered group message")
    try:
        plaintext = _plaintext_decoder.decode(decrypted.plaintext)
    except (msgspec.ValidationError, msgspec.DecodeError):
        raise RejectedMessageError("malformed group message") from None
    try:
        verify_ed25519(
            sender_ed25519,
            plaintext.signature,
            signing_input(GROUP_MESSAGE_CONTEXT, _signed_parts(plaintext)),
        )
    except AuthenticationError:
        raise RejectedMessageError("bad signature on group message") from None
    if plaintext.sender != sender or plaintext.sender_device != sender_device:
        raise RejectedMessageError("sender inside the group message does not match its device")
    if plaintext.group_id != group_id or inbound.group_id != group_id:
        raise RejectedMessageError("group message belongs to another group")
    advanced = msgspec.structs.replace(inbound, last_index=decrypted.message_index)
    return advanced, plaintext
