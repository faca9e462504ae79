"""Sign-in against a real server, spoken frame by frame by a scripted client.

The raw client is the library's own transport (:class:`ServerConnection`) and
crypto layer, driven by hand so that it can replay, forge and misbehave.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from bastion.client import Client
from bastion.client.records import AccountInfo
from bastion.client.transport import ServerConnection
from bastion.crypto.device import DeviceCertificate
from bastion.crypto.olm import OlmDevice
from bastion.crypto.signing import AccountIdentity
from bastion.errors import ServerRefusedError, UntrustedServerError
from bastion.protocol import frames
from bastion.protocol.auth import register_message, signin_message
from bastion.server.config import Limits
from tests.conftest import PASSPHRASE, Profiles, ServerProcess
from tests.helpers import drain, next_events, texts
from tests.malicious_server import RECORD_ENV, SCRIPT, TAMPER_ENV, read_record

pytestmark = pytest.mark.network

WRONG_PIN = "SHA256:" + "00" * 32


class RawConnection(ServerConnection):
    """The client transport, also keeping the error frames that answer no request."""

    def __init__(self, pin: str | None) -> None:
        super().__init__(pin)
        self.stray_errors: list[frames.Error] = []
        self.used_nonces: set[bytes] = set()

    def on_frame(self, frame: frames.ServerFrame) -> None:
        if isinstance(frame, frames.Error) and frame.req is None:
            self.stray_errors.append(frame)
        super().on_frame(frame)

    async def fresh_challenge(self, *, wait_s: float = 5.0) -> frames.Challenge:
        """The newest challenge, waiting for one that has not been answered yet."""
        deadline = time.monotonic() + wait_s
        while self.challenge.nonce in self.used_nonces:
            assert time.monotonic() < deadline, "the server sent no fresh challenge"
            await asyncio.sleep(0.01)
        challenge = self.challenge
        self.used_nonces.add(challenge.nonce)
        return challenge

    async def stray_error(self, count: int, *, wait_s: float = 5.0) -> frames.Error:
        """The ``count``-th error frame that answered no request."""
        deadline = time.monotonic() + wait_s
        while len(self.stray_errors) < count:
            assert time.monotonic() < deadline, "the server did not answer the frame"
            await asyncio.sleep(0.01)
        return self.stray_errors[count - 1]


async def connect(server: ServerProcess, *, pin: str | None = None) -> RawConnection:
    conn = await RawConnection.open(server.url, pin=pin or server.fingerprint)
    assert isinstance(conn, RawConnection)
    return conn


class RawClients:
    """Raw connections to the test's server, all closed when the test ends."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.opened: list[RawConnection] = []

    async def connect(self) -> RawConnection:
        conn = await connect(self.server)
        self.opened.append(conn)
        return conn

    async def close(self) -> None:
        for conn in self.opened:
            await conn.aclose()


@pytest.fixture
async def raw(server: ServerProcess) -> AsyncIterator[RawClients]:
    clients = RawClients(server)
    yield clients
    await clients.close()


@dataclass
class RawAccount:
    """An account registered frame by frame; the test holds its keys."""

    username: str
    identity: AccountIdentity
    device: OlmDevice

    @property
    def device_id(self) -> str:
        return self.device.device_id


async def register_raw(server: ServerProcess, username: str) -> RawAccount:
    conn = await connect(server)
    try:
        challenge = await conn.fresh_challenge()
        identity = AccountIdentity.generate()
        device = OlmDevice.create()
        created = time.time_ns() // 1_000_000
        cert = DeviceCertificate.issue(
            identity,
            username=username,
            ed25519=device.ed25519,
            curve25519=device.curve25519,
            created_at=created,
        )
        keys = device.new_one_time_keys(5)
        fallback = device.new_fallback_key()
        req = conn.next_req()
        reply = await conn.request(
            frames.Register(
                req=req,
                username=username,
                identity_key=identity.public_bytes,
                device=frames.DeviceKeys(
                    device_id=device.device_id,
                    ed25519=device.ed25519,
                    curve25519=device.curve25519,
                    created_at=created,
                    certificate=cert.signature,
                ),
                signature=device.sign(
                    register_message(
                        challenge.server_name, challenge.nonce, username, device.device_id
                    )
                ),
                one_time_keys=[frames.SignedKey(key=k.key, signature=k.signature) for k in keys],
                fallback_key=frames.SignedKey(key=fallback.key, signature=fallback.signature),
                receive=False,
            ),
            req,
        )
        assert isinstance(reply, frames.SignedIn)
    finally:
        await conn.aclose()
    return RawAccount(username, identity, device)


def signin_frame(
    challenge: frames.Challenge,
    req: int,
    *,
    username: str,
    device_id: str,
    signer: OlmDevice,
    server_name: str | None = None,
    nonce: bytes | None = None,
    context: Callable[[str, bytes, str, str], bytes] = signin_message,
) -> frames.SignIn:
    """A SignIn answering ``challenge`` (or whatever the overrides make of it)."""
    signed = context(
        challenge.server_name if server_name is None else server_name,
        challenge.nonce if nonce is None else nonce,
        username,
        device_id,
    )
    return frames.SignIn(
        req=req,
        username=username,
        device_id=device_id,
        signature=signer.sign(signed),
        receive=False,
    )


async def sign_in(
    conn: RawConnection, build: Callable[[frames.Challenge, int], frames.SignIn]
) -> frames.ServerFrame:
    """Answer the next challenge; waits out a sign-in back-off instead of counting it."""
    deadline = time.monotonic() + 20
    while True:
        challenge = await conn.fresh_challenge()
        req = conn.next_req()
        try:
            return await conn.request(build(challenge, req), req)
        except ServerRefusedError as exc:
            if exc.code != "rate_limited" or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.25)


async def refusal(
    conn: RawConnection, build: Callable[[frames.Challenge, int], frames.SignIn]
) -> ServerRefusedError:
    """The refusal of a sign-in that must fail."""
    with pytest.raises(ServerRefusedError) as refused:
        await sign_in(conn, build)
    return refused.value


async def assert_not_signed_in(conn: RawConnection) -> None:
    req = conn.next_req()
    with pytest.raises(ServerRefusedError) as refused:
        await conn.request(frames.QueryKeys(req=req, user="alice"), req)
    assert refused.value.code == "not_signed_in"


def as_owner(account: RawAccount) -> Callable[[frames.Challenge, int], frames.SignIn]:
    return lambda ch, req: signin_frame(
        ch, req, username=account.username, device_id=account.device_id, signer=account.device
    )


# --- the honest path, so that the refusals below mean something ---------------------------------


async def test_device_key_signs_in_and_binds_the_connection(
    server: ServerProcess, raw: RawClients
) -> None:
    alice = await register_raw(server, "alice")
    conn = await raw.connect()
    reply = await sign_in(conn, as_owner(alice))
    assert isinstance(reply, frames.SignedIn)
    assert (reply.username, reply.device_id) == ("alice", alice.device_id)
    req = conn.next_req()
    keys = await conn.request(frames.QueryKeys(req=req, user="alice"), req)
    assert isinstance(keys, frames.KeysResult)
    assert [d.device_id for d in keys.devices] == [alice.device_id]
    await conn.aclose()


# --- replays and forgeries ------------------------------------------------------------------------


async def test_captured_signin_frame_fails_on_a_new_connection(
    server: ServerProcess, raw: RawClients
) -> None:
    alice = await register_raw(server, "alice")
    first = await raw.connect()
    challenge = await first.fresh_challenge()
    captured = signin_frame(
        challenge, 1, username="alice", device_id=alice.device_id, signer=alice.device
    )
    assert isinstance(await first.request(captured, captured.req), frames.SignedIn)
    await first.aclose()

    second = await raw.connect()
    await second.fresh_challenge()
    with pytest.raises(ServerRefusedError) as refused:
        await second.request(captured, captured.req)
    assert refused.value.code == "auth_failed"
    await assert_not_signed_in(second)
    await second.aclose()


FORGERIES: dict[
    str, Callable[[RawAccount, RawAccount], Callable[[frames.Challenge, int], frames.SignIn]]
] = {
    # alice's name and device id, signed by a key that is not her device's
    "wrong-device-key": lambda alice, bob: (
        lambda ch, req: signin_frame(
            ch, req, username="alice", device_id=alice.device_id, signer=OlmDevice.create()
        )
    ),
    # bob's device id (and key) under alice's name
    "another-users-device-id": lambda alice, bob: (
        lambda ch, req: signin_frame(
            ch, req, username="alice", device_id=bob.device_id, signer=bob.device
        )
    ),
    # alice's own device under bob's name
    "own-device-other-name": lambda alice, bob: (
        lambda ch, req: signin_frame(
            ch, req, username="bob", device_id=alice.device_id, signer=alice.device
        )
    ),
    # a signature meant for another server
    "other-server-name": lambda alice, bob: (
        lambda ch, req: signin_frame(
            ch,
            req,
            username="alice",
            device_id=alice.device_id,
            signer=alice.device,
            server_name="elsewhere.example:443",
        )
    ),
    # a nonce the server never issued
    "made-up-nonce": lambda alice, bob: (
        lambda ch, req: signin_frame(
            ch,
            req,
            username="alice",
            device_id=alice.device_id,
            signer=alice.device,
            nonce=secrets.token_bytes(32),
        )
    ),
    # the right key and nonce, but a signature made for registration (another purpose)
    "register-signature": lambda alice, bob: (
        lambda ch, req: signin_frame(
            ch,
            req,
            username="alice",
            device_id=alice.device_id,
            signer=alice.device,
            context=register_message,
        )
    ),
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
async def test_forged_signin_is_refused(
    server: ServerProcess, raw: RawClients, forgery: str
) -> None:
    alice = await register_raw(server, "alice")
    bob = await register_raw(server, "bob")
    conn = await raw.connect()
    refused = await refusal(conn, FORGERIES[forgery](alice, bob))
    assert (refused.code, refused.message) == ("auth_failed", "sign-in failed")
    await assert_not_signed_in(conn)
    # The same connection still takes the owner's real answer to a fresh challenge.
    reply = await sign_in(conn, as_owner(alice))
    assert isinstance(reply, frames.SignedIn)
    await conn.aclose()


async def test_unknown_user_and_wrong_key_are_refused_alike(
    server: ServerProcess, raw: RawClients
) -> None:
    alice = await register_raw(server, "alice")
    attempts = {
        "unknown user": lambda ch, req: signin_frame(
            ch, req, username="nobody", device_id=alice.device_id, signer=alice.device
        ),
        "unknown device": lambda ch, req: signin_frame(
            ch,
            req,
            username="alice",
            device_id=OlmDevice.create().device_id,
            signer=alice.device,
        ),
        "wrong key": lambda ch, req: signin_frame(
            ch, req, username="alice", device_id=alice.device_id, signer=OlmDevice.create()
        ),
    }
    answers = {}
    for name, build in attempts.items():
        conn = await raw.connect()
        refused = await refusal(conn, build)
        answers[name] = (refused.code, refused.message)
        await conn.aclose()
    assert set(answers.values()) == {("auth_failed", "sign-in failed")}


async def test_connection_is_closed_after_the_attempt_limit(
    server: ServerProcess, raw: RawClients
) -> None:
    alice = await register_raw(server, "alice")
    limit = Limits().signin_attempts_per_connection
    conn = await raw.connect()
    wrong_key = OlmDevice.create()
    for _ in range(limit):
        refused = await refusal(
            conn,
            lambda ch, req: signin_frame(
                ch, req, username="alice", device_id=alice.device_id, signer=wrong_key
            ),
        )
        assert refused.code == "auth_failed"
    await asyncio.wait_for(conn.disconnected.wait(), 5)
    assert conn.close_reason is not None
    assert "too many sign-in attempts" in conn.close_reason
    # The owner, on a new connection, is not locked out.
    again = await raw.connect()
    assert isinstance(await sign_in(again, as_owner(alice)), frames.SignedIn)
    await again.aclose()


# --- frames out of place ----------------------------------------------------------------------


async def test_requests_before_signin_get_not_signed_in(
    server: ServerProcess, raw: RawClients
) -> None:
    alice = await register_raw(server, "alice")
    conn = await raw.connect()
    early: list[Callable[[int], frames.Frame]] = [
        lambda req: frames.QueryKeys(req=req, user="alice"),
        lambda req: frames.ClaimKeys(req=req, user="alice"),
        lambda req: frames.UploadKeys(req=req, one_time_keys=[]),
        lambda req: frames.Send(
            req=req,
            client_msg_id=secrets.token_bytes(16),
            to="alice",
            ciphertexts=[
                frames.DeviceCiphertext(
                    user="alice", device_id=alice.device_id, kind=0, body=b"x" * 64
                )
            ],
        ),
    ]
    for make in early:
        req = conn.next_req()
        with pytest.raises(ServerRefusedError) as refused:
            await conn.request(make(req), req)
        assert refused.value.code == "not_signed_in"
    conn.send(frames.Ack(seqs=[1]))
    assert (await conn.stray_error(1)).code == "not_signed_in"
    # None of that used up the challenge: the owner signs in on the same connection.
    assert isinstance(await sign_in(conn, as_owner(alice)), frames.SignedIn)
    await conn.aclose()


MALFORMED = {
    "not-msgpack": b"\xc1\xc1\xc1",
    "not-a-map": msgspec.msgpack.encode([1, 2, 3]),
    "unknown-type": msgspec.msgpack.encode({"type": "teleport", "req": 1}),
    "missing-field": msgspec.msgpack.encode({"type": "query_keys", "req": 1}),
    "extra-field": msgspec.msgpack.encode(
        {"type": "query_keys", "req": 1, "user": "alice", "admin": True}
    ),
    "wrong-type": msgspec.msgpack.encode({"type": "query_keys", "req": "one", "user": "alice"}),
    "bad-username": msgspec.msgpack.encode({"type": "query_keys", "req": 1, "user": "../etc"}),
    "server-frame": frames.encode(frames.Synced()),
    # About 1 KiB: an unknown field nested 1,000 deep, placed before the type tag so the
    # decoder must skip it (msgspec raised RecursionError: closed 1011, not bad_frame).
    "deep-unknown-field": b"\x83\xa1z"
    + b"\x91" * 1000
    + b"\x00"
    + msgspec.msgpack.encode({"type": "query_keys", "req": 1})[1:],
}


async def test_malformed_frames_get_bad_frame_and_the_connection_lives_on(
    server: ServerProcess, raw: RawClients
) -> None:
    alice = await register_raw(server, "alice")
    conn = await raw.connect()
    for count, data in enumerate(MALFORMED.values(), start=1):
        conn.send_raw(data)
        error = await conn.stray_error(count)
        assert error.code == "bad_frame"
    assert not conn.disconnected.is_set()
    assert isinstance(await sign_in(conn, as_owner(alice)), frames.SignedIn)
    req = conn.next_req()
    assert isinstance(
        await conn.request(frames.QueryKeys(req=req, user="alice"), req), frames.KeysResult
    )
    await conn.aclose()


# --- trusting the server ----------------------------------------------------------------------


@pytest.fixture
def recording_server(
    server_factory: Callable[..., ServerProcess], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> ServerProcess:
    """An honest server that records every frame it receives and sends."""
    monkeypatch.setenv(TAMPER_ENV, "record")
    monkeypatch.setenv(RECORD_ENV, str(tmp_path / "frames.txt"))
    return server_factory("recording-server", script=SCRIPT)


def frames_received(tmp_path: Path) -> list[frames.ClientFrame]:
    return [
        frames.decode_client_frame(data)
        for direction, data in read_record(tmp_path / "frames.txt")
        if direction == "in"
    ]


async def test_pinned_fingerprint_mismatch_is_refused_before_any_frame(
    recording_server: ServerProcess, tmp_path: Path
) -> None:
    with pytest.raises(UntrustedServerError, match="certificate changed"):
        await connect(recording_server, pin=WRONG_PIN)
    with pytest.raises(UntrustedServerError):
        await Client.register(
            tmp_path / "alice",
            PASSPHRASE,
            username="alice",
            server_url=recording_server.url,
            fingerprint=WRONG_PIN,
        )
    assert not (tmp_path / "alice" / "profile.json").exists()
    assert frames_received(tmp_path) == []

    # A profile whose pin no longer matches will not sign in either.
    profiles = Profiles(tmp_path, recording_server)
    alice = await profiles.register("alice")
    sent_before = len(frames_received(tmp_path))
    with alice.profile.transaction():
        alice.profile.put("account", msgspec.structs.replace(alice.account, fingerprint=WRONG_PIN))
    await alice.close()
    reopened = Client.open(profiles.path("alice"), PASSPHRASE)
    try:
        with pytest.raises(UntrustedServerError):
            await reopened.connect()
    finally:
        await reopened.close()
    assert len(frames_received(tmp_path)) == sent_before


async def test_server_with_another_name_is_refused(
    recording_server: ServerProcess, tmp_path: Path
) -> None:
    profiles = Profiles(tmp_path, recording_server)
    alice = await profiles.register("alice")
    await alice.connect(receive=False)  # the honest name is accepted
    await alice.close()

    # Same certificate, same address, but the server now calls itself something else.
    assert recording_server.stop() == 0
    (recording_server.data_dir / "server-name").write_text("impostor.example:443\n")
    recording_server.start()
    signins_before = sum(isinstance(f, frames.SignIn) for f in frames_received(tmp_path))
    alice = Client.open(profiles.path("alice"), PASSPHRASE)
    try:
        with pytest.raises(UntrustedServerError, match="impostor"):
            await alice.connect()
        account = alice.profile.get("account", AccountInfo)
        assert account is not None
        assert account.server_name != "impostor.example:443"
    finally:
        await alice.close()
    assert sum(isinstance(f, frames.SignIn) for f in frames_received(tmp_path)) == signins_before


async def test_sign_in_brute_force_is_slowed_down_and_honest_sessions_carry_on(
    server: ServerProcess, raw: RawClients, profiles: Profiles
) -> None:
    alice = await register_raw(server, "alice")
    bob = await profiles.online("bob", receive=False)
    carol = await profiles.online("carol")
    await profiles.befriend("bob", "carol")
    assert texts(await drain(carol)) == []
    wrong_key = OlmDevice.create()

    def guess(ch: frames.Challenge, req: int) -> frames.SignIn:
        return signin_frame(ch, req, username="alice", device_id=alice.device_id, signer=wrong_key)

    codes = []
    waits = []
    for _ in range(Limits().signin_free_failures + 3):
        conn = await raw.connect()
        challenge = await conn.fresh_challenge()
        req = conn.next_req()
        with pytest.raises(ServerRefusedError) as refused:
            await conn.request(guess(challenge, req), req)
        codes.append(refused.value.code)
        if refused.value.code == "rate_limited":
            waits.append(refused.value.message)
        await conn.aclose()
    free = Limits().signin_free_failures
    assert codes[:free] == ["auth_failed"] * free
    assert "rate_limited" in codes[free:]
    assert all("try again in" in w for w in waits)

    # Sessions signed in before the attack are untouched.
    await bob.send_text("carol", "still here")
    assert texts(await next_events(carol, 1)) == ["still here"]
