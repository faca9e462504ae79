"""Domain-separated signing input and the account identity key.

Every signature and every KDF input in Bastion starts with a *context string*
naming its purpose (``bastion/v1/device-certificate``, ``bastion/v1/signin``...),
so a signature made for one purpose can never be replayed as another
(the Threema 2023 break). :func:`signing_input` builds that input as an
unambiguous, length-prefixed byte string.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bastion.errors import AuthenticationError

PROTOCOL_PREFIX = "bastion/v1/"

Part = bytes | str | int

ED25519_KEY_BYTES = 32
ED25519_SIGNATURE_BYTES = 64


def signing_input(context: str, parts: Iterable[Part]) -> bytes:
    """Return the canonical bytes that are signed for ``context`` over ``parts``.

    Each part is tagged with its kind and length-prefixed, so no two distinct
    sequences of parts encode to the same bytes. ``context`` must start with
    ``bastion/v1/``; raises ``ValueError`` otherwise.
    """
    if not context.startswith(PROTOCOL_PREFIX):
        raise ValueError("signing context must start with " + PROTOCOL_PREFIX)
    out = bytearray()
    _put(out, b"C", context.encode())
    for part in parts:
        if isinstance(part, bool):
            raise TypeError("booleans are not signing parts; use an int")
        if isinstance(part, bytes):
            _put(out, b"B", part)
        elif isinstance(part, str):
            _put(out, b"S", part.encode())
        else:
            _put(out, b"I", struct.pack(">q", part))
    return bytes(out)


def _put(out: bytearray, tag: bytes, data: bytes) -> None:
    out += tag
    out += struct.pack(">I", len(data))
    out += data


def verify_ed25519(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Check an Ed25519 signature; raise :class:`AuthenticationError` if it is bad."""
    if len(public_key) != ED25519_KEY_BYTES or len(signature) != ED25519_SIGNATURE_BYTES:
        raise AuthenticationError("malformed key or signature")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except InvalidSignature:
        raise AuthenticationError("signature does not verify") from None


class AccountIdentity:
    """An account's long-term Ed25519 identity key (the private half).

    Safety numbers and verification are about this key: it signs device
    certificates, revocations and group changes. ``repr`` never shows it.
    """

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> AccountIdentity:
        """Make a fresh identity key from the operating system's CSPRNG."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> AccountIdentity:
        """Load a 32-byte raw private key; raises ``ValueError`` if malformed."""
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        """The raw private key, for encrypted storage only."""
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, context: str, parts: Iterable[Part]) -> bytes:
        """Sign ``parts`` under ``context`` (see :func:`signing_input`)."""
        return self._key.sign(signing_input(context, parts))

    def __repr__(self) -> str:
        return "AccountIdentity(<redacted>)"


def verify_signed(public_key: bytes, signature: bytes, context: str, parts: Iterable[Part]) -> None:
    """Verify a signature made with :meth:`AccountIdentity.sign` or a device key.

    Raises :class:`AuthenticationError` when it does not verify.
    """
    verify_ed25519(public_key, signature, signing_input(context, parts))
