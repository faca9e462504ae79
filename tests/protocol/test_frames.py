"""The wire format: exact bytes, round trips, and a strict decoder that raises only FrameError."""

from __future__ import annotations

from typing import Any, get_args

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.errors import FrameError
from bastion.protocol import frames
from bastion.protocol.frames import (
    MAX_BODY_BYTES,
    MAX_DEVICES_PER_SEND,
    decode_client_frame,
    decode_server_frame,
    encode,
)

DEVICE = "abcdefghijklmnop"
OTHER_DEVICE = "qrstuvwxyz234567"
KEY = bytes(range(32))
SIG = bytes(range(64))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- exact bytes -------------------------------------------------------------------------------
# MessagePack maps, ``type`` first, then the fields in declaration order; bytes as ``bin``.

TYPE = "a474797065"  # "type"
ERROR_BODY = [
    "a4636f6465",  # "code"
    "a96261645f6672616d65",  # "bad_frame"
    "a76d657373616765",  # "message"
    "a26e6f",  # "no"
]

VECTORS: list[tuple[frames.Frame, str]] = [
    (frames.Ack(seqs=[5]), "82" + TYPE + "a361636b" + "a473657173" + "9105"),  # the documented one
    (
        frames.Ack(seqs=[1, 2]),
        "".join(
            [
                "82",  # map of 2
                TYPE,
                "a361636b",  # "ack"
                "a473657173",  # "seqs"
                "920102",  # [1, 2]
            ]
        ),
    ),
    (
        frames.Challenge(
            version=1, server_name="bastion.test", nonce=bytes(range(32)), expires_in=60
        ),
        "".join(
            [
                "85",  # map of 5
                TYPE,
                "a96368616c6c656e6765",  # "challenge"
                "a776657273696f6e01",  # "version": 1
                "ab7365727665725f6e616d65",  # "server_name"
                "ac62617374696f6e2e74657374",  # "bastion.test"
                "a56e6f6e6365",  # "nonce"
                "c420" + bytes(range(32)).hex(),  # bin 8, 32 bytes
                "aa657870697265735f696e3c",  # "expires_in": 60
            ]
        ),
    ),
    (
        frames.Error(req=7, code="bad_frame", message="no"),
        "".join(["84", TYPE, "a56572726f72", "a372657107", *ERROR_BODY]),
    ),
    (
        frames.Error(req=None, code="bad_frame", message="no"),
        "".join(["84", TYPE, "a56572726f72", "a3726571c0", *ERROR_BODY]),  # req: nil
    ),
    (frames.Synced(), "".join(["81", TYPE, "a673796e636564"])),  # "synced"
]


@pytest.mark.parametrize(("frame", "wire"), VECTORS, ids=lambda v: type(v).__name__)
def test_frames_encode_to_exact_bytes(frame: frames.Frame, wire: str) -> None:
    assert encode(frame).hex() == wire


@pytest.mark.parametrize(("frame", "wire"), VECTORS, ids=lambda v: type(v).__name__)
def test_exact_bytes_decode_to_the_frame(frame: frames.Frame, wire: str) -> None:
    decode = decode_client_frame if isinstance(frame, frames.Ack) else decode_server_frame
    assert decode(bytes.fromhex(wire)) == frame


# --- one valid example of every frame ----------------------------------------------------------

DEVICE_KEYS = frames.DeviceKeys(
    device_id=DEVICE,
    ed25519=KEY,
    curve25519=KEY[::-1],
    created_at=1_700_000_000_000,
    certificate=SIG,
)
SIGNED_KEY = frames.SignedKey(key=KEY, signature=SIG)
CIPHERTEXT = frames.DeviceCiphertext(user="bob", device_id=DEVICE, kind=0, body=b"\x01" * 40)

CLIENT_FRAMES: list[frames.Frame] = [
    frames.Register(
        req=1,
        username="alice",
        identity_key=KEY,
        device=DEVICE_KEYS,
        signature=SIG,
        one_time_keys=[SIGNED_KEY, SIGNED_KEY],
        fallback_key=SIGNED_KEY,
        receive=False,
        invite="Invite_code-1",
    ),
    frames.SignIn(req=2, username="alice", device_id=DEVICE, signature=SIG),
    frames.QueryKeys(req=3, user="bob"),
    frames.ClaimKeys(req=4, user="bob"),
    frames.UploadKeys(req=5, one_time_keys=[SIGNED_KEY]),
    frames.UploadKeys(req=6, one_time_keys=[], fallback_key=SIGNED_KEY),
    frames.Send(req=7, client_msg_id=bytes(16), to="bob", ciphertexts=[CIPHERTEXT]),
    frames.Ack(seqs=[0, 2**63 - 1]),
    frames.LinkOpen(req=8, slot=KEY),
    frames.LinkJoin(req=9, slot=KEY, blob=b"\x02" * 28),
    frames.LinkAnswer(req=10, slot=KEY, blob=b"\x03" * 4096),
    frames.LinkMore(req=10, slot=KEY, blob=b"\x05" * frames.MAX_LINK_PIECE_BYTES),
    frames.AddDevice(
        req=11,
        username="alice",
        device=DEVICE_KEYS,
        signature=SIG,
        one_time_keys=[SIGNED_KEY],
        fallback_key=SIGNED_KEY,
    ),
    frames.RevokeDevice(
        req=12, device_id=OTHER_DEVICE, revoked_at=1_700_000_000_000, signature=SIG
    ),
    frames.GetPolicy(req=13),
    frames.PublishDeviceList(
        req=14,
        device_list=frames.DeviceList(version=3, device_ids=[DEVICE, OTHER_DEVICE], signature=SIG),
    ),
    # files
    frames.BlobBegin(req=30, size=2**40, sha256=KEY, recipients=["bob"]),
    frames.BlobChunk(req=31, blob_id="0123456789abcdef" * 2, offset=0, data=b"\x06" * 65536),
    frames.BlobEnd(req=32, blob_id="0123456789abcdef" * 2),
    frames.BlobGet(req=33, blob_id="0123456789abcdef" * 2, offset=65536),
    frames.BlobDone(req=34, blob_id="0123456789abcdef" * 2),
    # contacts and presence
    frames.ContactAction(req=40, user="bob", action="request"),
    frames.ContactList(req=41),
    frames.PresenceWatch(req=42),
    frames.PresenceVisibility(req=43, invisible=True),
    # groups
    frames.GroupPost(req=50, change=b"\x08" * 200),
    frames.GroupFetch(req=51, group_id=KEY, after_seq=-1),
    frames.GroupFetch(req=52, group_id=KEY, after_seq=7),
    frames.GroupSend(req=53, group_id=KEY, client_msg_id=bytes(16), ciphertext=b"\x09" * 120),
    frames.GroupInvites(req=54),
    frames.GroupRespond(req=55, group_id=KEY, accept=True),
    frames.Send(req=56, client_msg_id=bytes(16), to="bob", ciphertexts=[CIPHERTEXT], group_id=KEY),
]
SERVER_FRAMES: list[frames.Frame] = [
    frames.Challenge(version=1, server_name="bastion.test", nonce=KEY, expires_in=60),
    frames.SignedIn(req=2, username="alice", device_id=DEVICE, one_time_keys=40),
    frames.Ok(req=3),
    frames.Error(req=None, code="bad_frame", message="unknown frame type"),
    frames.KeysResult(req=4, user="bob", identity_key=KEY, devices=[DEVICE_KEYS]),
    frames.KeysResult(
        req=4,
        user="bob",
        identity_key=KEY,
        devices=[DEVICE_KEYS],
        device_list=frames.DeviceList(version=1, device_ids=[DEVICE], signature=SIG),
    ),
    frames.ClaimResult(
        req=5,
        user="bob",
        keys=[frames.ClaimedKey(device_id=DEVICE, key=KEY, signature=SIG, fallback=True)],
    ),
    frames.Sent(req=6, server_ts=1_700_000_000_123),
    frames.Deliver(
        seq=9,
        sender="alice",
        sender_device=DEVICE,
        server_ts=1_700_000_000_123,
        kind=1,
        body=b"ciphertext",
    ),
    frames.KeysLow(one_time_keys=3),
    frames.Synced(),
    frames.LinkPush(slot=KEY, blob=b"\x04" * 100),
    frames.PolicyInfo(req=14, key=KEY, document=b"\x05" * 40, signature=SIG),
    # files
    frames.BlobStarted(req=30, blob_id="0123456789abcdef" * 2),
    frames.BlobData(
        req=33, blob_id="0123456789abcdef" * 2, offset=65536, size=70000, data=b"\x07" * 4464
    ),
    # contacts and presence
    frames.ContactResult(req=40, user="bob", state="pending_out"),
    frames.ContactListResult(
        req=41, contacts=[frames.ContactEntry(user="bob", state="accepted", online=True)]
    ),
    frames.ContactChanged(user="bob", state="none", at=1_700_000_000_000),
    frames.PresenceChanged(user="bob", online=False, at=1_700_000_000_000),
    # groups
    frames.GroupPosted(req=50, seq=3, members=["alice", "bob"]),
    frames.GroupChain(
        req=51, group_id=KEY, changes=[b"\x08" * 200, b"\x0a" * 90], more=True, members=["bob"]
    ),
    frames.GroupSent(req=53, server_ts=1_700_000_000_123, members=["alice", "bob", "carol"]),
    frames.GroupChain(
        req=52, group_id=KEY, changes=[], more=False, members=["alice"], invited=["bob"]
    ),
    frames.GroupInviteList(
        req=54,
        invites=[
            frames.GroupInvite(
                group_id=KEY, name="ops", inviter="alice", members=3, at=1_700_000_000_000
            )
        ],
    ),
]


def test_examples_cover_every_frame_type() -> None:
    # A new frame must get an example here (and so a round trip and refusal tests).
    assert {type(f) for f in CLIENT_FRAMES} == set(get_args(frames.ClientFrame))
    assert {type(f) for f in SERVER_FRAMES} == set(get_args(frames.ServerFrame))
    assert set(frames.Frame.__subclasses__()) == {type(f) for f in CLIENT_FRAMES + SERVER_FRAMES}


@pytest.mark.parametrize("frame", CLIENT_FRAMES, ids=lambda f: type(f).__name__)
def test_client_frames_round_trip(frame: frames.Frame) -> None:
    assert decode_client_frame(encode(frame)) == frame


@pytest.mark.parametrize("frame", SERVER_FRAMES, ids=lambda f: type(f).__name__)
def test_server_frames_round_trip(frame: frames.Frame) -> None:
    assert decode_server_frame(encode(frame)) == frame


@pytest.mark.parametrize("frame", SERVER_FRAMES, ids=lambda f: type(f).__name__)
def test_a_client_cannot_send_a_server_frame(frame: frames.Frame) -> None:
    # A client posing as the server (e.g. sending a Deliver or a SignedIn) is an unknown type.
    with pytest.raises(FrameError):
        decode_client_frame(encode(frame))


@pytest.mark.parametrize("frame", CLIENT_FRAMES, ids=lambda f: type(f).__name__)
def test_a_server_cannot_send_a_client_frame(frame: frames.Frame) -> None:
    with pytest.raises(FrameError):
        decode_server_frame(encode(frame))


# --- the strict decoder ------------------------------------------------------------------------


def raw(value: Any) -> bytes:
    """MessagePack of a plain value, bypassing the frame classes."""
    return msgspec.msgpack.encode(value)


DROP = object()


def signin(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "type": "signin",
        "req": 1,
        "username": "alice",
        "device_id": DEVICE,
        "signature": SIG,
    }
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not DROP}


def test_the_plain_signin_fixture_is_valid() -> None:
    # The cases below differ from this one in exactly one way.
    assert decode_client_frame(raw(signin())) == frames.SignIn(
        req=1, username="alice", device_id=DEVICE, signature=SIG
    )


REFUSED_CLIENT: dict[str, Any] = {
    "unknown type": signin(type="become_admin"),
    "no type": signin(type=DROP),
    "type not a string": signin(type=1),
    "missing field": signin(signature=DROP),
    "extra field": signin(admin=True),
    "req as text": signin(req="1"),
    "req negative": signin(req=-1),
    "req too large": signin(req=2**31),
    "bool for int": signin(req=True),
    "signature as text": signin(signature=SIG.hex()),
    "username uppercase": signin(username="Alice"),
    "username too short": signin(username="al"),
    "username too long": signin(username="a" * 33),
    "username with slash": signin(username="../alice"),
    "username with space": signin(username="ali ce"),
    "device id too short": signin(device_id=DEVICE[:-1]),
    "device id not base32": signin(device_id="abcdefghijklmno1"),
    "signature 63 bytes": signin(signature=SIG[:-1]),
    "signature 65 bytes": signin(signature=SIG + b"\0"),
    "not a map": ["signin", 1, "alice", DEVICE, SIG],
    "identity key 31 bytes": {
        **msgspec.to_builtins(CLIENT_FRAMES[0], builtin_types=(bytes,)),
        "identity_key": KEY[:31],
    },
    "device key 33 bytes": {
        **msgspec.to_builtins(CLIENT_FRAMES[0], builtin_types=(bytes,)),
        "device": {
            **msgspec.to_builtins(DEVICE_KEYS, builtin_types=(bytes,)),
            "curve25519": KEY + b"\0",
        },
    },
    "extra field in nested value": {
        **msgspec.to_builtins(CLIENT_FRAMES[0], builtin_types=(bytes,)),
        "fallback_key": {"key": KEY, "signature": SIG, "fallback": False},
    },
    "olm kind 2": {
        "type": "send",
        "req": 1,
        "client_msg_id": bytes(16),
        "to": "bob",
        "ciphertexts": [{"user": "bob", "device_id": DEVICE, "kind": 2, "body": b""}],
    },
    "no ciphertexts": {
        "type": "send",
        "req": 1,
        "client_msg_id": bytes(16),
        "to": "bob",
        "ciphertexts": [],
    },
    "too many ciphertexts": {
        "type": "send",
        "req": 1,
        "client_msg_id": bytes(16),
        "to": "bob",
        "ciphertexts": [{"user": "bob", "device_id": DEVICE, "kind": 1, "body": b"x"}]
        * (MAX_DEVICES_PER_SEND + 1),
    },
    "oversize ciphertext body": {
        "type": "send",
        "req": 1,
        "client_msg_id": bytes(16),
        "to": "bob",
        "ciphertexts": [
            {"user": "bob", "device_id": DEVICE, "kind": 1, "body": b"x" * (MAX_BODY_BYTES + 1)}
        ],
    },
    "message id 15 bytes": {
        "type": "send",
        "req": 1,
        "client_msg_id": bytes(15),
        "to": "bob",
        "ciphertexts": [{"user": "bob", "device_id": DEVICE, "kind": 1, "body": b"x"}],
    },
    "empty ack": {"type": "ack", "seqs": []},
    "too many acks": {"type": "ack", "seqs": list(range(frames.MAX_ACKS_PER_FRAME + 1))},
    "link blob too short": {"type": "link_join", "req": 1, "slot": KEY, "blob": bytes(27)},
    "link blob too long": {"type": "link_answer", "req": 1, "slot": KEY, "blob": bytes(4097)},
    "link piece too long": {"type": "link_more", "req": 1, "slot": KEY, "blob": bytes(65537)},
    "revocation signature short": {
        "type": "revoke_device",
        "req": 1,
        "device_id": DEVICE,
        "revoked_at": 0,
        "signature": SIG[:32],
    },
    "invite too short": {
        **msgspec.to_builtins(CLIENT_FRAMES[0], builtin_types=(bytes,)),
        "invite": "short",
    },
    "group id 31 bytes": {"type": "group_fetch", "req": 1, "group_id": KEY[:31], "after_seq": -1},
    "group fetch before -1": {"type": "group_fetch", "req": 1, "group_id": KEY, "after_seq": -2},
    "empty group change": {"type": "group_post", "req": 1, "change": b""},
    "oversize group change": {
        "type": "group_post",
        "req": 1,
        "change": b"x" * (frames.MAX_GROUP_CHANGE_BYTES + 1),
    },
    "group send without message id": {
        "type": "group_send",
        "req": 1,
        "group_id": KEY,
        "ciphertext": b"x",
    },
    "too many one-time keys": {
        "type": "upload_keys",
        "req": 1,
        "one_time_keys": [{"key": KEY, "signature": SIG}] * (frames.MAX_KEYS_PER_UPLOAD + 1),
    },
}


@pytest.mark.parametrize("value", REFUSED_CLIENT.values(), ids=REFUSED_CLIENT.keys())
def test_client_decoder_refuses(value: Any) -> None:
    with pytest.raises(FrameError):
        decode_client_frame(raw(value))


# A pattern ending in '$' would also match before a final newline ("alice\n").


def test_username_with_trailing_newline_is_refused() -> None:
    # "alice\n" prints as "alice": a second account that looks like the first.
    with pytest.raises(FrameError):
        decode_client_frame(raw(signin(username="alice\n")))


def test_device_id_with_trailing_newline_is_refused() -> None:
    with pytest.raises(FrameError):
        decode_client_frame(raw(signin(device_id=DEVICE + "\n")))


# msgspec raises UnicodeDecodeError (not a msgspec error) for a string that is not UTF-8;
# the codec must turn it into a FrameError like any other bad input.
@pytest.mark.parametrize(
    "data",
    [
        b"\x82\xa4type\xa2o\xffk\xa3req\x00",  # in the type tag
        b"\x82\xa4type\xa2ok\xa3r\xffq\x00",  # in a field name
        raw({"type": "error", "req": None, "code": "x", "message": "ok"}).replace(
            b"\xa2ok", b"\xa2\xff\xfe"
        ),  # in a value
    ],
    ids=["tag", "field-name", "value"],
)
def test_invalid_utf8_is_a_frame_error(data: bytes) -> None:
    with pytest.raises(FrameError):
        decode_server_frame(data)


def test_limits_are_inclusive_bounds() -> None:
    # Exactly at each bound is accepted, so the refusals above are about the bound itself.
    at_limit = frames.Send(
        req=2**31 - 1,
        client_msg_id=bytes(16),
        to="a" * 32,
        ciphertexts=[
            frames.DeviceCiphertext(
                user="bob", device_id=DEVICE, kind=1, body=b"x" * MAX_BODY_BYTES
            )
        ]
        + [CIPHERTEXT] * (MAX_DEVICES_PER_SEND - 1),
    )
    assert decode_client_frame(encode(at_limit)) == at_limit


def test_oversize_body_from_the_server_is_refused() -> None:
    deliver = frames.Deliver(
        seq=1,
        sender="alice",
        sender_device=DEVICE,
        server_ts=0,
        kind=1,
        body=b"x" * (MAX_BODY_BYTES + 1),
    )
    with pytest.raises(FrameError):
        decode_server_frame(encode(deliver))


def test_oversize_frame_is_refused_before_decoding() -> None:
    frame = encode(frames.Ack(seqs=list(range(100))))
    assert decode_client_frame(frame, max_bytes=len(frame)) == frames.Ack(seqs=list(range(100)))
    with pytest.raises(FrameError, match="exceeds"):
        decode_client_frame(frame, max_bytes=len(frame) - 1)
    with pytest.raises(FrameError, match="exceeds"):
        decode_server_frame(encode(SERVER_FRAMES[0]), max_bytes=10)


def test_default_frame_limit_applies() -> None:
    padding = b"\0" * (frames.MAX_FRAME_BYTES + 1)
    with pytest.raises(FrameError, match="exceeds"):
        decode_client_frame(padding)
    with pytest.raises(FrameError, match="exceeds"):
        decode_server_frame(padding)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x80", b"\x81\xa4type", b"\x91\x01", b"\xff" * 10, raw({"type": "ack"})],
)
def test_garbage_is_a_frame_error(data: bytes) -> None:
    for decode in (decode_client_frame, decode_server_frame):
        with pytest.raises(FrameError):
            decode(data)


def test_deep_nesting_in_an_unknown_field_is_a_frame_error() -> None:
    nested = b"\x83\xa4type\xa3ack\xa4seqs\x91\x01\xa1x" + b"\x91" * 50_000 + b"\x01"
    with pytest.raises(FrameError):
        decode_client_frame(nested)


@pytest.mark.parametrize("tag", [{"type": "ack", "seqs": [1]}, {"type": "synced"}])
def test_deep_nesting_before_the_type_tag_is_a_frame_error(tag: dict[str, object]) -> None:
    # The decoder skips an unknown field's value while it looks for the tag: 1,000 levels
    # (a 1 KiB frame) took it past the recursion limit, and RecursionError escaped.
    deep = b"\xa1z" + b"\x91" * 1000 + b"\x00"
    head = raw(tag)
    data = bytes([head[0] + 1]) + deep + head[1:]
    for decode in (decode_client_frame, decode_server_frame):
        with pytest.raises(FrameError, match="nested too deeply"):
            decode(data)
    item = raw({"item": "message", "group_id": "g"})
    with pytest.raises(FrameError, match="nested too deeply"):
        frames.decode_item(bytes([item[0] + 1]) + deep + item[1:])


# --- properties --------------------------------------------------------------------------------

usernames = st.from_regex(r"[a-z0-9._-]{3,32}", fullmatch=True)
device_ids = st.from_regex(r"[a-z2-7]{16}", fullmatch=True)
key32 = st.binary(min_size=32, max_size=32)
sigs = st.binary(min_size=64, max_size=64)
reqs = st.integers(0, 2**31 - 1)
seqs = st.integers(0, 2**63 - 1)
millis = st.integers(0, 2**53)
bodies = st.binary(max_size=300)
link_blobs = st.binary(min_size=28, max_size=300)
int64 = st.integers(-(2**63), 2**63 - 1)
signed_keys = st.builds(frames.SignedKey, key=key32, signature=sigs)
device_keys = st.builds(
    frames.DeviceKeys,
    device_id=device_ids,
    ed25519=key32,
    curve25519=key32,
    created_at=millis,
    certificate=sigs,
)
ciphertexts = st.builds(
    frames.DeviceCiphertext,
    user=usernames,
    device_id=device_ids,
    kind=st.integers(0, 1),
    body=bodies,
)

client_frames: st.SearchStrategy[frames.Frame] = st.one_of(
    st.builds(
        frames.Register,
        req=reqs,
        username=usernames,
        identity_key=key32,
        device=device_keys,
        signature=sigs,
        one_time_keys=st.lists(signed_keys, max_size=4),
        fallback_key=signed_keys,
        receive=st.booleans(),
        invite=st.none() | st.from_regex(r"[A-Za-z0-9_-]{8,64}", fullmatch=True),
    ),
    st.builds(
        frames.SignIn,
        req=reqs,
        username=usernames,
        device_id=device_ids,
        signature=sigs,
        receive=st.booleans(),
    ),
    st.builds(frames.QueryKeys, req=reqs, user=usernames),
    st.builds(frames.ClaimKeys, req=reqs, user=usernames),
    st.builds(
        frames.UploadKeys,
        req=reqs,
        one_time_keys=st.lists(signed_keys, max_size=4),
        fallback_key=st.none() | signed_keys,
    ),
    st.builds(
        frames.Send,
        req=reqs,
        client_msg_id=st.binary(min_size=16, max_size=16),
        to=usernames,
        ciphertexts=st.lists(ciphertexts, min_size=1, max_size=4),
    ),
    st.builds(frames.Ack, seqs=st.lists(seqs, min_size=1, max_size=8)),
    st.builds(frames.LinkOpen, req=reqs, slot=key32),
    st.builds(frames.LinkJoin, req=reqs, slot=key32, blob=link_blobs),
    st.builds(frames.LinkAnswer, req=reqs, slot=key32, blob=link_blobs),
    st.builds(frames.LinkMore, req=reqs, slot=key32, blob=link_blobs),
    st.builds(
        frames.AddDevice,
        req=reqs,
        username=usernames,
        device=device_keys,
        signature=sigs,
        one_time_keys=st.lists(signed_keys, max_size=4),
        fallback_key=signed_keys,
        receive=st.booleans(),
    ),
    st.builds(
        frames.RevokeDevice, req=reqs, device_id=device_ids, revoked_at=millis, signature=sigs
    ),
    st.builds(frames.GroupPost, req=reqs, change=st.binary(min_size=1, max_size=300)),
    st.builds(frames.GroupFetch, req=reqs, group_id=key32, after_seq=st.integers(-1, 2**63 - 1)),
    st.builds(
        frames.GroupSend,
        req=reqs,
        group_id=key32,
        client_msg_id=st.binary(min_size=16, max_size=16),
        ciphertext=bodies,
    ),
    st.builds(frames.GroupInvites, req=reqs),
    st.builds(frames.GroupRespond, req=reqs, group_id=key32, accept=st.booleans()),
)
server_frames: st.SearchStrategy[frames.Frame] = st.one_of(
    st.builds(
        frames.Challenge,
        version=int64,
        server_name=st.text(max_size=256),
        nonce=key32,
        expires_in=int64,
    ),
    st.builds(
        frames.SignedIn, req=reqs, username=usernames, device_id=device_ids, one_time_keys=int64
    ),
    st.builds(frames.Ok, req=reqs),
    st.builds(
        frames.Error,
        req=st.none() | reqs,
        code=st.from_regex(r"[a-z_]{1,32}", fullmatch=True),
        message=st.text(max_size=256),
    ),
    st.builds(
        frames.KeysResult,
        req=reqs,
        user=usernames,
        identity_key=key32,
        devices=st.lists(device_keys, max_size=3),
    ),
    st.builds(
        frames.ClaimResult,
        req=reqs,
        user=usernames,
        keys=st.lists(
            st.builds(
                frames.ClaimedKey,
                device_id=device_ids,
                key=key32,
                signature=sigs,
                fallback=st.booleans(),
            ),
            max_size=3,
        ),
    ),
    st.builds(frames.Sent, req=reqs, server_ts=millis),
    st.builds(
        frames.Deliver,
        seq=seqs,
        sender=usernames,
        sender_device=device_ids,
        server_ts=millis,
        kind=st.integers(0, frames.ROOM_KEY_PATH + 1),
        body=bodies,
    ),
    st.builds(frames.KeysLow, one_time_keys=int64),
    st.just(frames.Synced()),
    st.builds(frames.LinkPush, slot=key32, blob=link_blobs),
    st.builds(frames.GroupPosted, req=reqs, seq=seqs, members=st.lists(usernames, max_size=4)),
    st.builds(
        frames.GroupChain,
        req=reqs,
        group_id=key32,
        changes=st.lists(st.binary(min_size=1, max_size=100), max_size=4),
        more=st.booleans(),
        members=st.lists(usernames, max_size=4),
    ),
    st.builds(
        frames.GroupSent, req=reqs, server_ts=millis, members=st.lists(usernames, max_size=4)
    ),
)


@FUZZ
@given(client_frames)
def test_generated_client_frames_round_trip(frame: frames.Frame) -> None:
    assert decode_client_frame(encode(frame)) == frame


@FUZZ
@given(server_frames)
def test_generated_server_frames_round_trip(frame: frames.Frame) -> None:
    assert decode_server_frame(encode(frame)) == frame


def decodes_or_frame_error(data: bytes) -> None:
    """Only FrameError may escape; whatever decodes must survive a second round trip."""
    for decode in (decode_client_frame, decode_server_frame):
        try:
            frame = decode(data)
        except FrameError:
            continue
        assert decode(encode(frame)) == frame


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_frame_error(data: bytes) -> None:
    decodes_or_frame_error(data)


mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
        st.integers(0, 2**16),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for op, position, value in ops:
        at = position % (len(out) + 1)
        if op == "insert":
            out[at:at] = bytes([value])
        elif op == "truncate":
            del out[at:]
        elif out and op in ("flip", "set", "delete"):
            at %= len(out)
            if op == "flip":
                out[at] ^= 1 << (value % 8)
            elif op == "set":
                out[at] = value
            else:
                del out[at]
    return bytes(out)


@FUZZ
@given(client_frames | server_frames, mutations)
def test_mutated_frames_raise_only_frame_error(
    frame: frames.Frame, ops: list[tuple[str, int, int]]
) -> None:
    decodes_or_frame_error(mutate(encode(frame), ops))
