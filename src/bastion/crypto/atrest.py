"""Encryption at rest: a passphrase-derived key and an authenticated box.

The passphrase goes through Argon2id (PyCA cryptography) into a 32-byte master
key; purpose keys are derived from it with HKDF-SHA256 and a context string
each. Records are sealed with AES-256-GCM under a random 96-bit nonce, with
the record's identity as associated data so rows cannot be swapped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bastion.crypto.signing import signing_input
from bastion.errors import ProfileError

KEY_BYTES = 32
NONCE_BYTES = 12
SALT_BYTES = 16


@dataclass(frozen=True, slots=True)
class KdfParams:
    """Argon2id cost; the defaults follow RFC 9106's second recommended option."""

    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4

    def check(self) -> None:
        """Refuse parameters too weak to protect a passphrase, or absurdly costly ones.

        The upper bounds stop an edited profile header from making unlocking
        allocate gigabytes or run for hours. Raises ProfileError.
        """
        if self.memory_kib < 19 * 1024 or self.iterations < 2 or not 1 <= self.lanes <= 16:
            raise ProfileError("key derivation parameters are below the safe minimum")
        if self.memory_kib > 4 * 1024 * 1024 or self.iterations > 64:
            raise ProfileError("key derivation parameters are beyond the supported maximum")


def derive_master_key(passphrase: str, salt: bytes, params: KdfParams) -> bytes:
    """Argon2id over the passphrase; raises :class:`ProfileError` on weak params or salt."""
    params.check()
    if len(salt) < SALT_BYTES:
        raise ProfileError("salt too short")
    kdf = Argon2id(
        salt=salt,
        length=KEY_BYTES,
        iterations=params.iterations,
        lanes=params.lanes,
        memory_cost=params.memory_kib,
    )
    return kdf.derive(passphrase.encode())


def purpose_key(master: bytes, purpose: str) -> bytes:
    """A 32-byte key for one purpose, derived from the master key with HKDF."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=None,
        info=signing_input("bastion/v1/at-rest-key", [purpose]),
    )
    return hkdf.derive(master)


class SecretBox:
    """AES-256-GCM with a random nonce per record; the key never appears in ``repr``."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("key must be 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext`` bound to ``aad``."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        """Decrypt a sealed record; raises :class:`ProfileError` if it was altered or moved."""
        if len(blob) < NONCE_BYTES + 16:
            raise ProfileError("stored record is damaged")
        try:
            return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        except InvalidTag:
            raise ProfileError("stored record is damaged or was altered") from None

    def __repr__(self) -> str:
        return "SecretBox(<redacted>)"
