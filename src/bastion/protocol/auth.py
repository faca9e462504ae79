"""Sign-in by challenge and response, and the server-side connection state.

The server sends a fresh random nonce in a :class:`~bastion.protocol.frames.Challenge`;
the device signs the context ``bastion/v1/signin`` with the server's name, the
nonce, the username and the device id. A nonce is good for one attempt and for
``expires_in`` seconds: a replayed or late answer fails. No password exists.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from bastion.crypto.signing import signing_input, verify_ed25519
from bastion.errors import AuthenticationError, ProtocolError
from bastion.protocol import frames

SIGNIN_CONTEXT = "bastion/v1/signin"
REGISTER_CONTEXT = "bastion/v1/register"


def signin_message(server_name: str, nonce: bytes, username: str, device_id: str) -> bytes:
    """The bytes a device signs to sign in on a connection."""
    return signing_input(SIGNIN_CONTEXT, [server_name, nonce, username, device_id])


def register_message(server_name: str, nonce: bytes, username: str, device_id: str) -> bytes:
    """The bytes a new device signs to prove it holds its key when registering."""
    return signing_input(REGISTER_CONTEXT, [server_name, nonce, username, device_id])


class Phase(enum.Enum):
    """Where a server-side connection is in its life."""

    CHALLENGED = "challenged"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


@dataclass
class ServerSession:
    """The state of one client connection as the server sees it (no I/O).

    The asyncio connection holds one of these, feeds it time and randomness,
    and asks it whether a frame is allowed and whether a sign-in answer is good.
    """

    server_name: str
    challenge_ttl: float
    max_attempts: int
    phase: Phase = Phase.CHALLENGED
    username: str | None = None
    device_id: str | None = None
    attempts: int = 0
    _nonce: bytes | None = field(default=None, repr=False)
    _issued_at: float = 0.0

    def challenge(self, now: float, nonce: bytes) -> frames.Challenge:
        """Issue a fresh challenge; any earlier one is void."""
        if len(nonce) != 32:
            raise ValueError("nonce must be 32 bytes")
        self._nonce = nonce
        self._issued_at = now
        return frames.Challenge(
            version=frames.PROTOCOL_VERSION,
            server_name=self.server_name,
            nonce=nonce,
            expires_in=int(self.challenge_ttl),
        )

    def take_nonce(self, now: float) -> bytes:
        """Consume the current challenge for one attempt.

        Raises :class:`AuthenticationError` if there is none, it was used, it
        expired, or the attempt budget of this connection is spent.
        """
        if self.phase is not Phase.CHALLENGED:
            raise ProtocolError("already signed in")
        self.attempts += 1
        if self.attempts > self.max_attempts:
            raise AuthenticationError("too many sign-in attempts on this connection")
        nonce, self._nonce = self._nonce, None
        if nonce is None:
            raise AuthenticationError("no challenge outstanding")
        if now - self._issued_at > self.challenge_ttl:
            raise AuthenticationError("challenge expired")
        return nonce

    def verify_answer(
        self,
        *,
        nonce: bytes,
        username: str,
        device_id: str,
        device_ed25519: bytes,
        signature: bytes,
    ) -> None:
        """Check a sign-in signature by the device's key over the consumed nonce."""
        verify_ed25519(
            device_ed25519, signature, signin_message(self.server_name, nonce, username, device_id)
        )

    def authenticated(self, username: str, device_id: str) -> None:
        """Bind the connection to a user and device; they are never taken from a frame again."""
        self.phase = Phase.AUTHENTICATED
        self.username = username
        self.device_id = device_id

    def require_signed_in(self) -> tuple[str, str]:
        """The authenticated (username, device id); raises ProtocolError before sign-in."""
        if self.phase is not Phase.AUTHENTICATED or self.username is None or self.device_id is None:
            raise ProtocolError("sign in first")
        return self.username, self.device_id
