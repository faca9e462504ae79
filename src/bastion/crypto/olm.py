"""A device's Olm account (vodozemac) and the sessions it makes.

Thin, typed wrappers: vodozemac does the cryptography; this module converts
keys to raw bytes, signs published keys with the device key, and maps
vodozemac's exceptions into Bastion's error tree.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import vodozemac

from bastion.crypto.device import device_id_for, key_signing_input
from bastion.errors import AuthenticationError, ProfileError

PRE_KEY = 0
NORMAL = 1


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class PublishedKey:
    """A Curve25519 key and the device's signature over it."""

    key: bytes
    signature: bytes


class OlmDevice:
    """One device's long-term Olm account: identity keys, one-time keys, sessions."""

    __slots__ = ("_account",)

    def __init__(self, account: vodozemac.Account) -> None:
        self._account = account

    @classmethod
    def create(cls) -> OlmDevice:
        """Make a new device account with fresh keys."""
        return cls(vodozemac.Account())

    @classmethod
    def from_pickle(cls, pickle: str, key: bytes) -> OlmDevice:
        """Restore from an encrypted pickle; raises :class:`ProfileError` if it will not open."""
        try:
            return cls(vodozemac.Account.from_pickle(pickle, key))
        except vodozemac.PickleException:
            raise ProfileError("the device account could not be restored") from None

    def pickle(self, key: bytes) -> str:
        """The account encrypted under ``key`` (32 bytes)."""
        return self._account.pickle(key)

    @property
    def ed25519(self) -> bytes:
        """The device's Ed25519 signing key."""
        return _b64decode(self._account.ed25519_key.to_base64())

    @property
    def curve25519(self) -> bytes:
        """The device's Curve25519 identity key."""
        return self._account.curve25519_key.to_bytes()

    @property
    def device_id(self) -> str:
        """The id derived from both public keys."""
        return device_id_for(self.ed25519, self.curve25519)

    def sign(self, message: bytes) -> bytes:
        """Sign ``message`` (already domain-separated) with the device's Ed25519 key."""
        return _b64decode(self._account.sign(message).to_base64())

    def new_one_time_keys(self, count: int) -> list[PublishedKey]:
        """Generate ``count`` one-time keys, sign them, and mark them published."""
        self._account.generate_one_time_keys(count)
        keys = [k.to_bytes() for k in self._account.one_time_keys.values()]
        self._account.mark_keys_as_published()
        return [self._publish(k, fallback=False) for k in keys]

    def new_fallback_key(self) -> PublishedKey:
        """Generate a fallback key (the previous one stays usable for a while) and sign it."""
        # The type stubs shipped with vodozemac omit the fallback-key methods.
        self._account.generate_fallback_key()  # type: ignore[attr-defined]
        fallback: dict[str, vodozemac.Curve25519PublicKey] = self._account.fallback_key  # type: ignore[attr-defined]
        keys = [k.to_bytes() for k in fallback.values()]
        self._account.mark_keys_as_published()
        return self._publish(keys[0], fallback=True)

    def _publish(self, key: bytes, *, fallback: bool) -> PublishedKey:
        signature = self.sign(key_signing_input(self.device_id, key, fallback=fallback))
        return PublishedKey(key, signature)

    def outbound_session(self, their_curve25519: bytes, their_one_time_key: bytes) -> OlmSession:
        """Start a session to a device using one of its claimed keys."""
        try:
            session = self._account.create_outbound_session(
                vodozemac.Curve25519PublicKey.from_bytes(their_curve25519),
                vodozemac.Curve25519PublicKey.from_bytes(their_one_time_key),
            )
        except (vodozemac.KeyException, vodozemac.SessionCreationException):
            raise AuthenticationError("the device's keys are not usable") from None
        return OlmSession(session)

    def inbound_session(self, their_curve25519: bytes, body: bytes) -> tuple[OlmSession, bytes]:
        """Accept a pre-key message from the device with ``their_curve25519``.

        Returns the new session and the plaintext; raises :class:`AuthenticationError`
        if the message is not from that key or does not decrypt.
        """
        try:
            message = vodozemac.AnyOlmMessage.from_parts(PRE_KEY, body).to_pre_key()
            if message is None:
                raise AuthenticationError("not a pre-key message")
            session, plaintext = self._account.create_inbound_session(
                vodozemac.Curve25519PublicKey.from_bytes(their_curve25519), message
            )
        except (
            vodozemac.DecodeException,
            vodozemac.KeyException,
            vodozemac.SessionCreationException,
        ):
            raise AuthenticationError("pre-key message rejected") from None
        return OlmSession(session), plaintext

    def __repr__(self) -> str:
        return f"OlmDevice({self.device_id})"


class OlmSession:
    """A double-ratchet session with one other device."""

    __slots__ = ("_session",)

    def __init__(self, session: vodozemac.Session) -> None:
        self._session = session

    @classmethod
    def from_pickle(cls, pickle: str, key: bytes) -> OlmSession:
        """Restore from an encrypted pickle; raises :class:`ProfileError`."""
        try:
            return cls(vodozemac.Session.from_pickle(pickle, key))
        except vodozemac.PickleException:
            raise ProfileError("a session could not be restored") from None

    def pickle(self, key: bytes) -> str:
        """The session encrypted under ``key``."""
        return self._session.pickle(key)

    @property
    def session_id(self) -> str:
        """vodozemac's id for this session."""
        return self._session.session_id

    def matches(self, body: bytes) -> bool:
        """Whether a pre-key message belongs to this session."""
        try:
            message = vodozemac.AnyOlmMessage.from_parts(PRE_KEY, body).to_pre_key()
        except vodozemac.DecodeException:
            return False
        return message is not None and self._session.session_matches(message)

    def encrypt(self, plaintext: bytes) -> tuple[int, bytes]:
        """Encrypt; returns (kind, body) with kind 0 for pre-key and 1 for normal messages."""
        kind, body = self._session.encrypt(plaintext).to_parts()
        return kind, body

    def decrypt(self, kind: int, body: bytes) -> bytes:
        """Decrypt a message; raises :class:`AuthenticationError` if it fails."""
        if kind not in (PRE_KEY, NORMAL):
            raise AuthenticationError("unknown Olm message kind")
        try:
            return self._session.decrypt(vodozemac.AnyOlmMessage.from_parts(kind, body))
        except (vodozemac.DecodeException, vodozemac.OlmDecryptionException):
            raise AuthenticationError("message does not decrypt") from None

    def __repr__(self) -> str:
        return "OlmSession(<redacted>)"
