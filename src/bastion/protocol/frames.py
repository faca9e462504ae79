"""Every frame on the wire, as strict msgspec Structs, and the codec.

Frames are MessagePack maps carrying a ``type`` tag. Decoding is strict: an
unknown ``type``, a missing or extra field, a wrong type, or a value past its
size bound raises :class:`~bastion.errors.FrameError` and nothing else.
"""

from __future__ import annotations

from typing import Annotated, Final, TypeVar

import msgspec
from msgspec import Meta

from bastion.errors import FrameError

PROTOCOL_VERSION: Final = 1
MAX_FRAME_BYTES: Final = 256 * 1024
MAX_BODY_BYTES: Final = 64 * 1024
MAX_DEVICES_PER_SEND: Final = 64
MAX_KEYS_PER_UPLOAD: Final = 100
MAX_ACKS_PER_FRAME: Final = 1024

USERNAME_PATTERN: Final = r"^[a-z0-9._-]{3,32}\Z"

Username = Annotated[str, Meta(pattern=USERNAME_PATTERN)]
DeviceId = Annotated[str, Meta(pattern=r"^[a-z2-7]{16}\Z")]
Key32 = Annotated[bytes, Meta(min_length=32, max_length=32)]
Signature = Annotated[bytes, Meta(min_length=64, max_length=64)]
Nonce = Annotated[bytes, Meta(min_length=32, max_length=32)]
MessageId = Annotated[bytes, Meta(min_length=16, max_length=16)]
RequestId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Seq = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Millis = Annotated[int, Meta(ge=0, le=2**53)]
Body = Annotated[bytes, Meta(max_length=MAX_BODY_BYTES)]
ShortText = Annotated[str, Meta(max_length=256)]
ErrorCode = Annotated[str, Meta(pattern=r"^[a-z_]{1,32}\Z")]
OlmKind = Annotated[int, Meta(ge=0, le=1)]
InviteCode = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{8,64}\Z")]


class Frame(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True):
    """Base of every frame."""


class Record(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of nested values inside frames."""


# --- nested values ---------------------------------------------------------------------------


class DeviceKeys(Record):
    """A device's public keys and the account key's certificate over them."""

    device_id: DeviceId
    ed25519: Key32
    curve25519: Key32
    created_at: Millis
    certificate: Signature


class SignedKey(Record):
    """A Curve25519 one-time or fallback key signed by its device's Ed25519 key."""

    key: Key32
    signature: Signature


class ClaimedKey(Record):
    """One key claimed from a device's stock (a fallback key when the stock is empty)."""

    device_id: DeviceId
    key: Key32
    signature: Signature
    fallback: bool


class DeviceCiphertext(Record):
    """An Olm ciphertext for one device (of the recipient, or of the sender's own account)."""

    user: Username
    device_id: DeviceId
    kind: OlmKind
    body: Body


# --- client to server ------------------------------------------------------------------------


class Register(Frame, tag="register"):
    """Create an account with its first device; signs the connection's challenge."""

    req: RequestId
    username: Username
    identity_key: Key32
    device: DeviceKeys
    signature: Signature
    one_time_keys: Annotated[list[SignedKey], Meta(max_length=MAX_KEYS_PER_UPLOAD)]
    fallback_key: SignedKey
    receive: bool = True
    invite: InviteCode | None = None


class SignIn(Frame, tag="signin"):
    """Answer the connection's challenge with a device signature."""

    req: RequestId
    username: Username
    device_id: DeviceId
    signature: Signature
    receive: bool = True


class QueryKeys(Frame, tag="query_keys"):
    """Ask for a user's account key and certified devices."""

    req: RequestId
    user: Username


class ClaimKeys(Frame, tag="claim_keys"):
    """Claim one one-time key (or the fallback key) of each device of a user."""

    req: RequestId
    user: Username


class UploadKeys(Frame, tag="upload_keys"):
    """Top up this device's one-time key stock, and optionally replace its fallback key."""

    req: RequestId
    one_time_keys: Annotated[list[SignedKey], Meta(max_length=MAX_KEYS_PER_UPLOAD)]
    fallback_key: SignedKey | None = None


class Send(Frame, tag="send"):
    """One message: a ciphertext per device of ``to`` and of the sender's other devices."""

    req: RequestId
    client_msg_id: MessageId
    to: Username
    ciphertexts: Annotated[
        list[DeviceCiphertext], Meta(min_length=1, max_length=MAX_DEVICES_PER_SEND)
    ]


LinkBlob = Annotated[bytes, Meta(min_length=28, max_length=4096)]


class LinkOpen(Frame, tag="link_open"):
    """A signed-in device opens a one-time link slot (the hash of a code it shows the user)."""

    req: RequestId
    slot: Key32


class LinkJoin(Frame, tag="link_join"):
    """A new device, not signed in, answers a slot with its keys sealed under the code."""

    req: RequestId
    slot: Key32
    blob: LinkBlob


class LinkAnswer(Frame, tag="link_answer"):
    """The existing device answers the new one (account key and certificate, sealed)."""

    req: RequestId
    slot: Key32
    blob: LinkBlob


class AddDevice(Frame, tag="add_device"):
    """A linked or imported device joins its account; signs the connection's challenge."""

    req: RequestId
    username: Username
    device: DeviceKeys
    signature: Signature
    one_time_keys: Annotated[list[SignedKey], Meta(max_length=MAX_KEYS_PER_UPLOAD)]
    fallback_key: SignedKey
    receive: bool = True


class RevokeDevice(Frame, tag="revoke_device"):
    """Remove a device from the account, signed by the account identity key."""

    req: RequestId
    device_id: DeviceId
    revoked_at: Millis
    signature: Signature


class Ack(Frame, tag="ack"):
    """Acknowledge delivered envelopes; the server then deletes them."""

    seqs: Annotated[list[Seq], Meta(min_length=1, max_length=MAX_ACKS_PER_FRAME)]


# --- server to client ------------------------------------------------------------------------


class Challenge(Frame, tag="challenge"):
    """Sent on connect and after a failed sign-in: a fresh nonce to sign."""

    version: int
    server_name: ShortText
    nonce: Nonce
    expires_in: int


class SignedIn(Frame, tag="signed_in"):
    """The connection is now bound to this user and device."""

    req: RequestId
    username: Username
    device_id: DeviceId
    one_time_keys: int


class Ok(Frame, tag="ok"):
    """A request succeeded and has nothing else to say."""

    req: RequestId


class Error(Frame, tag="error"):
    """A request (or, with ``req`` None, a frame) was refused."""

    req: RequestId | None
    code: ErrorCode
    message: ShortText


class KeysResult(Frame, tag="keys"):
    """A user's account key and devices, as the server holds them (clients verify)."""

    req: RequestId
    user: Username
    identity_key: Key32
    devices: Annotated[list[DeviceKeys], Meta(max_length=MAX_DEVICES_PER_SEND)]


class ClaimResult(Frame, tag="claimed"):
    """Keys claimed for a user's devices."""

    req: RequestId
    user: Username
    keys: Annotated[list[ClaimedKey], Meta(max_length=MAX_DEVICES_PER_SEND)]


class Sent(Frame, tag="sent"):
    """The message is durable on the server; ``server_ts`` is when it was accepted."""

    req: RequestId
    server_ts: Millis


class Deliver(Frame, tag="deliver"):
    """A queued ciphertext for this device; acknowledge ``seq`` once it is processed."""

    seq: Seq
    sender: Username
    sender_device: DeviceId
    server_ts: Millis
    kind: OlmKind
    body: Body


class KeysLow(Frame, tag="keys_low"):
    """This device's one-time key stock fell below the server's threshold."""

    one_time_keys: int


class Synced(Frame, tag="synced"):
    """Everything that was queued for this device when it signed in has been delivered."""


class LinkPush(Frame, tag="link_push"):
    """A sealed link message from the other side of a slot."""

    slot: Key32
    blob: LinkBlob


# --- signed organisation policy ---------------------------------------------------------------


class GetPolicy(Frame, tag="get_policy"):
    """Ask for the server's signed policy (allowed before sign-in)."""

    req: RequestId


class PolicyInfo(Frame, tag="policy"):
    """The policy document, the key that signed it, and the signature."""

    req: RequestId
    key: Key32
    document: Annotated[bytes, Meta(max_length=4096)]
    signature: Signature


ClientFrame = (
    GetPolicy
    | Register
    | SignIn
    | QueryKeys
    | ClaimKeys
    | UploadKeys
    | Send
    | Ack
    | LinkOpen
    | LinkJoin
    | LinkAnswer
    | AddDevice
    | RevokeDevice
)
ServerFrame = (
    PolicyInfo
    | Challenge
    | SignedIn
    | Ok
    | Error
    | KeysResult
    | ClaimResult
    | Sent
    | Deliver
    | KeysLow
    | Synced
    | LinkPush
)

_encoder = msgspec.msgpack.Encoder()
_client_decoder: msgspec.msgpack.Decoder[ClientFrame] = msgspec.msgpack.Decoder(ClientFrame)
_server_decoder: msgspec.msgpack.Decoder[ServerFrame] = msgspec.msgpack.Decoder(ServerFrame)


def encode(frame: Frame) -> bytes:
    """Encode a frame to MessagePack bytes."""
    return _encoder.encode(frame)


def decode_client_frame(data: bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> ClientFrame:
    """Decode a frame sent by a client; raises :class:`FrameError` on anything invalid."""
    return _decode(_client_decoder, data, max_bytes)


def decode_server_frame(data: bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> ServerFrame:
    """Decode a frame sent by a server; raises :class:`FrameError` on anything invalid."""
    return _decode(_server_decoder, data, max_bytes)


T = TypeVar("T")


def _decode(decoder: msgspec.msgpack.Decoder[T], data: bytes, max_bytes: int) -> T:
    if len(data) > max_bytes:
        raise FrameError(f"frame of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise FrameError(f"invalid frame: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise FrameError(f"undecodable frame: {exc}") from None
