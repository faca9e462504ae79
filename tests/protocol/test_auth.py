"""Sign-in by challenge and response, driven without a network (the sans-I/O session)."""

from __future__ import annotations

import pytest

from bastion.crypto.olm import OlmDevice
from bastion.errors import AuthenticationError, ProtocolError
from bastion.protocol import frames
from bastion.protocol.auth import Phase, ServerSession, register_message, signin_message

SERVER = "bastion.test"
NONCE = bytes(range(32))
OTHER_NONCE = bytes(range(1, 33))
T0 = 1000.0
TTL = 30.0


@pytest.fixture
def device() -> OlmDevice:
    return OlmDevice.create()


def new_session(*, max_attempts: int = 3) -> ServerSession:
    return ServerSession(server_name=SERVER, challenge_ttl=TTL, max_attempts=max_attempts)


def answer(
    device: OlmDevice,
    *,
    server: str = SERVER,
    nonce: bytes = NONCE,
    username: str = "alice",
    device_id: str | None = None,
) -> bytes:
    return device.sign(signin_message(server, nonce, username, device_id or device.device_id))


def verify(session: ServerSession, device: OlmDevice, nonce: bytes, signature: bytes) -> None:
    session.verify_answer(
        nonce=nonce,
        username="alice",
        device_id=device.device_id,
        device_ed25519=device.ed25519,
        signature=signature,
    )


def test_challenge_frame_carries_name_nonce_and_lifetime() -> None:
    challenge = new_session().challenge(T0, NONCE)
    assert challenge == frames.Challenge(
        version=frames.PROTOCOL_VERSION, server_name=SERVER, nonce=NONCE, expires_in=30
    )


def test_challenge_nonce_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        new_session().challenge(T0, NONCE[:31])


def test_valid_answer_signs_in(device: OlmDevice) -> None:
    session = new_session()
    session.challenge(T0, NONCE)
    nonce = session.take_nonce(T0 + 1)
    assert nonce == NONCE
    verify(session, device, nonce, answer(device))
    session.authenticated("alice", device.device_id)
    assert session.phase is Phase.AUTHENTICATED
    assert session.require_signed_in() == ("alice", device.device_id)


def test_nonce_is_single_use() -> None:
    session = new_session()
    session.challenge(T0, NONCE)
    session.take_nonce(T0)
    with pytest.raises(AuthenticationError, match="no challenge"):
        session.take_nonce(T0)


def test_no_challenge_no_nonce() -> None:
    with pytest.raises(AuthenticationError):
        new_session().take_nonce(T0)


def test_challenge_is_good_until_its_lifetime_ends() -> None:
    session = new_session()
    session.challenge(T0, NONCE)
    assert session.take_nonce(T0 + TTL) == NONCE


def test_expired_challenge_fails() -> None:
    session = new_session()
    session.challenge(T0, NONCE)
    with pytest.raises(AuthenticationError, match="expired"):
        session.take_nonce(T0 + TTL + 0.001)
    # ...and it is gone: a late retry with the same nonce is not possible either.
    with pytest.raises(AuthenticationError):
        session.take_nonce(T0 + 1)


def test_a_new_challenge_voids_the_old_one(device: OlmDevice) -> None:
    session = new_session()
    session.challenge(T0, NONCE)
    session.challenge(T0 + 1, OTHER_NONCE)
    nonce = session.take_nonce(T0 + 2)
    assert nonce == OTHER_NONCE
    with pytest.raises(AuthenticationError):
        verify(session, device, nonce, answer(device, nonce=NONCE))


def test_attempts_past_the_limit_fail_even_with_a_fresh_challenge() -> None:
    session = new_session(max_attempts=3)
    for i in range(3):
        session.challenge(T0 + i, NONCE)
        session.take_nonce(T0 + i)
    session.challenge(T0 + 3, NONCE)
    with pytest.raises(AuthenticationError, match="too many"):
        session.take_nonce(T0 + 3)


@pytest.mark.parametrize(
    ("server", "nonce", "username", "device_id"),
    [
        ("evil.example", NONCE, "alice", None),
        (SERVER, OTHER_NONCE, "alice", None),
        (SERVER, NONCE, "mallory", None),
        (SERVER, NONCE, "alice", "abcdefghijklmnop"),
    ],
    ids=["server-name", "nonce", "username", "device-id"],
)
def test_signature_over_anything_else_fails(
    device: OlmDevice, server: str, nonce: bytes, username: str, device_id: str | None
) -> None:
    session = new_session()
    session.challenge(T0, NONCE)
    taken = session.take_nonce(T0)
    signature = answer(device, server=server, nonce=nonce, username=username, device_id=device_id)
    with pytest.raises(AuthenticationError):
        verify(session, device, taken, signature)
    assert session.phase is Phase.CHALLENGED


def test_signature_by_another_device_key_fails(device: OlmDevice) -> None:
    session = new_session()
    session.challenge(T0, NONCE)
    nonce = session.take_nonce(T0)
    thief = OlmDevice.create()
    # The thief knows alice's device id and signs everything right, but with its own key.
    signature = thief.sign(signin_message(SERVER, nonce, "alice", device.device_id))
    with pytest.raises(AuthenticationError):
        verify(session, device, nonce, signature)


def test_register_signature_is_not_a_signin_signature(device: OlmDevice) -> None:
    session = new_session()
    session.challenge(T0, NONCE)
    nonce = session.take_nonce(T0)
    signature = device.sign(register_message(SERVER, nonce, "alice", device.device_id))
    with pytest.raises(AuthenticationError):
        verify(session, device, nonce, signature)


def test_signin_and_register_messages_differ() -> None:
    parts = (SERVER, NONCE, "alice", "abcdefghijklmnop")
    assert signin_message(*parts) != register_message(*parts)


def test_malformed_signature_fails(device: OlmDevice) -> None:
    session = new_session()
    session.challenge(T0, NONCE)
    nonce = session.take_nonce(T0)
    for signature in (b"", answer(device)[:63], bytes(64)):
        with pytest.raises(AuthenticationError):
            verify(session, device, nonce, signature)


def test_require_signed_in_before_auth_raises() -> None:
    session = new_session()
    with pytest.raises(ProtocolError, match="sign in first"):
        session.require_signed_in()
    session.challenge(T0, NONCE)
    session.take_nonce(T0)
    with pytest.raises(ProtocolError):
        session.require_signed_in()


def test_no_second_signin_on_an_authenticated_connection(device: OlmDevice) -> None:
    session = new_session()
    session.challenge(T0, NONCE)
    session.take_nonce(T0)
    session.authenticated("alice", device.device_id)
    session.challenge(T0, OTHER_NONCE)
    with pytest.raises(ProtocolError):
        session.take_nonce(T0)
    assert session.require_signed_in() == ("alice", device.device_id)
