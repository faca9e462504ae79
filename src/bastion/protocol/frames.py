"""Every frame on the wire, as strict msgspec Structs, and the codec.

Frames are MessagePack maps carrying a ``type`` tag. Decoding is strict: an
unknown ``type``, a missing or extra field, a wrong type, or a value past its
size bound raises :class:`~bastion.errors.FrameError` and nothing else.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal, TypeVar

import msgspec
from msgspec import Meta

from bastion.errors import FrameError

PROTOCOL_VERSION: Final = 1
MAX_FRAME_BYTES: Final = 256 * 1024
MAX_BODY_BYTES: Final = 64 * 1024
MAX_DEVICES_PER_SEND: Final = 64
MAX_KEYS_PER_UPLOAD: Final = 100
MAX_ACKS_PER_FRAME: Final = 1024
_TOO_DEEP: Final = "values nested too deeply"

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
GROUP_KIND: Final = 2  # Deliver.kind of a group item: the body is an encoded GroupItem
# Deliver.kind of an Olm message sent on a group's room-key path (Send.group_id set):
# ROOM_KEY_PATH + the Olm kind. Only a room key may arrive this way.
ROOM_KEY_PATH: Final = 3
DeliverKind = Annotated[int, Meta(ge=0, le=ROOM_KEY_PATH + 1)]
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


class DeviceList(Record):
    """The account key's signed list of the account's devices, at a version."""

    version: Annotated[int, Meta(ge=1, le=2**53)]
    device_ids: Annotated[list[DeviceId], Meta(max_length=MAX_DEVICES_PER_SEND)]
    signature: Signature


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
    # Set only for a room key of this group: it may pass between two joined members
    # who are not contacts, and is delivered with kind ROOM_KEY_PATH + Olm kind.
    group_id: Key32 | None = None


LinkBlob = Annotated[bytes, Meta(min_length=28, max_length=4096)]
MAX_LINK_PIECE_BYTES: Final = 64 * 1024
LinkPiece = Annotated[bytes, Meta(min_length=28, max_length=MAX_LINK_PIECE_BYTES)]


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


class LinkMore(Frame, tag="link_more"):
    """Before its answer, the existing device hands the joining one a sealed piece of history."""

    req: RequestId
    slot: Key32
    blob: LinkPiece


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


class PublishDeviceList(Frame, tag="publish_device_list"):
    """Store a newer signed device list for the signed-in account."""

    req: RequestId
    device_list: DeviceList


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
    device_list: DeviceList | None = None


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
    kind: DeliverKind
    body: Body


class KeysLow(Frame, tag="keys_low"):
    """This device's one-time key stock fell below the server's threshold."""

    one_time_keys: int


class Synced(Frame, tag="synced"):
    """Everything that was queued for this device when it signed in has been delivered."""


class LinkPush(Frame, tag="link_push"):
    """A sealed link message from the other side of a slot."""

    slot: Key32
    blob: LinkPiece


# --- files: encrypted blobs (see server/blobs.py) ---------------------------------------------

MAX_BLOB_CHUNK_BYTES: Final = 64 * 1024
MAX_BLOB_BYTES: Final = 2**40
MAX_BLOB_RECIPIENTS: Final = 64
BlobId = Annotated[str, Meta(pattern=r"^[0-9a-f]{32}\Z")]
BlobSize = Annotated[int, Meta(ge=0, le=MAX_BLOB_BYTES)]
BlobChunkData = Annotated[bytes, Meta(max_length=MAX_BLOB_CHUNK_BYTES)]


class BlobBegin(Frame, tag="blob_begin"):
    """Start uploading a ciphertext blob of ``size`` bytes that ``recipients`` may download."""

    req: RequestId
    size: BlobSize
    sha256: Key32
    recipients: Annotated[list[Username], Meta(min_length=1, max_length=MAX_BLOB_RECIPIENTS)]


class BlobChunk(Frame, tag="blob_chunk"):
    """The next piece of an upload; ``offset`` must be where the previous piece ended."""

    req: RequestId
    blob_id: BlobId
    offset: BlobSize
    data: BlobChunkData


class BlobEnd(Frame, tag="blob_end"):
    """Finish an upload; the server checks size and SHA-256 and makes the blob available."""

    req: RequestId
    blob_id: BlobId


class BlobGet(Frame, tag="blob_get"):
    """Read up to 64 KiB of a blob from ``offset`` (downloads resume from any offset)."""

    req: RequestId
    blob_id: BlobId
    offset: BlobSize


class BlobDone(Frame, tag="blob_done"):
    """The caller has the whole blob; once every recipient says so, the server deletes it."""

    req: RequestId
    blob_id: BlobId


class BlobStarted(Frame, tag="blob_started"):
    """An upload was accepted; send its chunks under ``blob_id``."""

    req: RequestId
    blob_id: BlobId


class BlobData(Frame, tag="blob_data"):
    """A piece of a blob read from ``offset``; ``size`` is the whole blob's size."""

    req: RequestId
    blob_id: BlobId
    offset: BlobSize
    size: BlobSize
    data: BlobChunkData


# --- groups (group chats with signed membership) ---------------------------------------------

MAX_GROUP_MEMBERS: Final = 1000
MAX_GROUP_CHANGE_BYTES: Final = 192 * 1024
GroupChangeBytes = Annotated[bytes, Meta(min_length=1, max_length=MAX_GROUP_CHANGE_BYTES)]
GroupMembers = Annotated[list[Username], Meta(max_length=MAX_GROUP_MEMBERS)]


class GroupPost(Frame, tag="group_post"):
    """Append one signed change (an encoded ``GroupChange``) to a group's chain."""

    req: RequestId
    change: GroupChangeBytes


class GroupFetch(Frame, tag="group_fetch"):
    """Ask for a group's changes with a sequence number above ``after_seq`` (-1: all)."""

    req: RequestId
    group_id: Key32
    after_seq: Annotated[int, Meta(ge=-1, le=2**63 - 1)] = -1


class GroupSend(Frame, tag="group_send"):
    """One Megolm ciphertext for every member device of a group (the server fans it out)."""

    req: RequestId
    group_id: Key32
    client_msg_id: MessageId
    ciphertext: Body


class GroupPosted(Frame, tag="group_posted"):
    """A change was appended; ``members`` is who the server now delivers to.

    ``invited`` are members the chain names who have not joined (the server
    delivers nothing of the group to them).
    """

    req: RequestId
    seq: Seq
    members: GroupMembers
    invited: GroupMembers = []


class GroupChain(Frame, tag="group_chain"):
    """Changes of a group, oldest first; ``more`` when the rest needs another fetch."""

    req: RequestId
    group_id: Key32
    changes: Annotated[list[GroupChangeBytes], Meta(max_length=256)]
    more: bool
    members: GroupMembers
    invited: GroupMembers = []


class GroupSent(Frame, tag="group_sent"):
    """A group message is durable; ``members`` is who the server fans it out to."""

    req: RequestId
    server_ts: Millis
    members: GroupMembers
    invited: GroupMembers = []


MAX_GROUP_INVITES: Final = 256


class GroupInvites(Frame, tag="group_invites"):
    """Ask for the invitations to groups that wait for this account's answer."""

    req: RequestId


class GroupRespond(Frame, tag="group_respond"):
    """Accept (join) or decline an invitation to a group."""

    req: RequestId
    group_id: Key32
    accept: bool


class GroupInvite(Record):
    """An invitation: the group, its name and size at the head, who added you, when."""

    group_id: Key32
    name: Annotated[str, Meta(min_length=1, max_length=256)]
    inviter: Username
    members: Annotated[int, Meta(ge=0, le=MAX_GROUP_MEMBERS)]
    at: Millis


class GroupInviteList(Frame, tag="group_invite_list"):
    """The invitations waiting for an answer, oldest first."""

    req: RequestId
    invites: Annotated[list[GroupInvite], Meta(max_length=MAX_GROUP_INVITES)]


class GroupItem(msgspec.Struct, tag_field="item", forbid_unknown_fields=True, kw_only=True):
    """Base of what a ``Deliver`` of kind ``GROUP_KIND`` carries (encoded as its body)."""


class GroupMessageItem(GroupItem, tag="message"):
    """A group message: the Megolm ciphertext as the sender posted it."""

    group_id: Key32
    ciphertext: Body


class GroupChangeItem(GroupItem, tag="change"):
    """A notice that a group's chain grew to ``seq``: fetch and check the new changes."""

    group_id: Key32
    seq: Seq


class GroupInviteItem(GroupItem, tag="invite"):
    """An invitation to a group: answer it with ``GroupRespond`` (nothing else arrives before)."""

    invite: GroupInvite


GroupItems = GroupMessageItem | GroupChangeItem | GroupInviteItem
_item_decoder: msgspec.msgpack.Decoder[GroupItems] = msgspec.msgpack.Decoder(GroupItems)


def encode_item(item: GroupItem) -> bytes:
    """Encode a group item (the body of a ``Deliver`` of kind ``GROUP_KIND``)."""
    return msgspec.msgpack.encode(item)


def decode_item(data: bytes) -> GroupItems:
    """Decode a group item; raises :class:`FrameError` on anything invalid."""
    try:
        return _item_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise FrameError(f"invalid group item: {exc}") from None
    except RecursionError:
        raise FrameError(f"invalid group item: {_TOO_DEEP}") from None


# --- contacts and presence (see server/contacts.py) -----------------------------------------

MAX_CONTACTS: Final = 1000
ContactActionName = Literal["request", "accept", "decline", "remove", "block", "unblock"]
ContactState = Literal["none", "pending_out", "pending_in", "accepted", "blocked"]


class ContactEntry(Record):
    """One row of a contact list as the server holds it (``online`` only for accepted ones)."""

    user: Username
    state: ContactState
    online: bool = False


class ContactAction(Frame, tag="contact_action"):
    """Request, accept, decline, remove, block or unblock ``user`` as a contact."""

    req: RequestId
    user: Username
    action: ContactActionName


class ContactList(Frame, tag="contact_list"):
    """Ask for this account's contact list as the server holds it."""

    req: RequestId


class PresenceWatch(Frame, tag="presence_watch"):
    """Send this connection contact and presence pushes; answered with a snapshot."""

    req: RequestId


class PresenceVisibility(Frame, tag="presence_visibility"):
    """Show this account offline to everyone while connected (invisible), or not."""

    req: RequestId
    invisible: bool


class ContactResult(Frame, tag="contact_result"):
    """The state of ``user`` as seen by the caller after a contact action."""

    req: RequestId
    user: Username
    state: ContactState


class ContactListResult(Frame, tag="contact_list_result"):
    """The caller's contacts, each with its state (and whether it is online, if accepted)."""

    req: RequestId
    contacts: Annotated[list[ContactEntry], Meta(max_length=MAX_CONTACTS)]


class ContactChanged(Frame, tag="contact_changed"):
    """Push: the caller's relation to ``user`` changed (a request, an acceptance, a removal)."""

    user: Username
    state: ContactState
    at: Millis


class PresenceChanged(Frame, tag="presence_changed"):
    """Push: an accepted contact came online or went offline."""

    user: Username
    online: bool
    at: Millis


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
    | LinkMore
    | AddDevice
    | RevokeDevice
    | PublishDeviceList
    | BlobBegin
    | BlobChunk
    | BlobEnd
    | BlobGet
    | BlobDone
    | GroupPost
    | GroupFetch
    | GroupSend
    | GroupInvites
    | GroupRespond
    | ContactAction
    | ContactList
    | PresenceWatch
    | PresenceVisibility
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
    | BlobStarted
    | BlobData
    | GroupPosted
    | GroupChain
    | GroupSent
    | GroupInviteList
    | ContactResult
    | ContactListResult
    | ContactChanged
    | PresenceChanged
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
    except RecursionError:
        # msgspec skips an unknown field's value before it refuses the field (when the
        # field comes before the type tag); a value nested past the interpreter's recursion
        # limit then stops the decoder with RecursionError instead of a ValidationError.
        raise FrameError(f"undecodable frame: {_TOO_DEEP}") from None
