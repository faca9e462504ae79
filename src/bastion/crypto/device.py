"""Device identity: ids derived from keys, certificates, signed one-time keys.

A device id is a hash of the device's two public keys, so a server cannot make
one id stand for another key (the Matrix 2022 verification break). A device is
accepted only with a certificate: the account identity key's signature over the
username, the device id, both device keys and the creation time.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from bastion.crypto.signing import AccountIdentity, signing_input, verify_signed
from bastion.errors import AuthenticationError

DEVICE_ID_CONTEXT = "bastion/v1/device-id"
CERTIFICATE_CONTEXT = "bastion/v1/device-certificate"
ONE_TIME_KEY_CONTEXT = "bastion/v1/one-time-key"
FALLBACK_KEY_CONTEXT = "bastion/v1/fallback-key"
REVOCATION_CONTEXT = "bastion/v1/device-revocation"


def device_id_for(ed25519: bytes, curve25519: bytes) -> str:
    """The 16-character id of the device with these public keys."""
    digest = hashlib.sha256(signing_input(DEVICE_ID_CONTEXT, [ed25519, curve25519])).digest()
    return base64.b32encode(digest[:10]).decode().lower()


@dataclass(frozen=True, slots=True)
class DeviceCertificate:
    """The account key's statement that a device belongs to the account."""

    username: str
    device_id: str
    ed25519: bytes
    curve25519: bytes
    created_at: int
    signature: bytes

    def _parts(self) -> list[bytes | str | int]:
        return [self.username, self.device_id, self.ed25519, self.curve25519, self.created_at]

    @classmethod
    def issue(
        cls,
        identity: AccountIdentity,
        *,
        username: str,
        ed25519: bytes,
        curve25519: bytes,
        created_at: int,
    ) -> DeviceCertificate:
        """Certify a device's keys under the account identity key."""
        device_id = device_id_for(ed25519, curve25519)
        unsigned = cls(username, device_id, ed25519, curve25519, created_at, b"")
        signature = identity.sign(CERTIFICATE_CONTEXT, unsigned._parts())
        return cls(username, device_id, ed25519, curve25519, created_at, signature)

    def verify(self, identity_key: bytes) -> None:
        """Check id derivation and signature; raises :class:`AuthenticationError`."""
        if device_id_for(self.ed25519, self.curve25519) != self.device_id:
            raise AuthenticationError("device id does not match the device keys")
        verify_signed(identity_key, self.signature, CERTIFICATE_CONTEXT, self._parts())


def key_signing_input(device_id: str, key: bytes, *, fallback: bool) -> bytes:
    """What a device signs to publish a one-time or fallback key."""
    context = FALLBACK_KEY_CONTEXT if fallback else ONE_TIME_KEY_CONTEXT
    return signing_input(context, [device_id, key])


def verify_published_key(
    device_ed25519: bytes, device_id: str, key: bytes, signature: bytes, *, fallback: bool
) -> None:
    """Check a published key's signature by its device; raises :class:`AuthenticationError`."""
    context = FALLBACK_KEY_CONTEXT if fallback else ONE_TIME_KEY_CONTEXT
    verify_signed(device_ed25519, signature, context, [device_id, key])


def sign_revocation(
    identity: AccountIdentity, username: str, device_id: str, revoked_at: int
) -> bytes:
    """The account key's signature revoking a device."""
    return identity.sign(REVOCATION_CONTEXT, [username, device_id, revoked_at])


def verify_revocation(
    identity_key: bytes, signature: bytes, username: str, device_id: str, revoked_at: int
) -> None:
    """Check a revocation; raises :class:`AuthenticationError`."""
    verify_signed(identity_key, signature, REVOCATION_CONTEXT, [username, device_id, revoked_at])
