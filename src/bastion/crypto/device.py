"""Device identity: ids derived from keys, certificates, signed one-time keys.

A device id is a hash of the device's two public keys, so a server cannot make
one id stand for another key (the Matrix 2022 verification break). A device is
accepted only with a certificate: the account identity key's signature over the
username, the device id, both device keys and the creation time.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from bastion.crypto.signing import AccountIdentity, signing_input, verify_signed
from bastion.errors import AuthenticationError

DEVICE_ID_CONTEXT = "bastion/v1/device-id"
CERTIFICATE_CONTEXT = "bastion/v1/device-certificate"
ONE_TIME_KEY_CONTEXT = "bastion/v1/one-time-key"
FALLBACK_KEY_CONTEXT = "bastion/v1/fallback-key"
REVOCATION_CONTEXT = "bastion/v1/device-revocation"
DEVICE_LIST_CONTEXT = "bastion/v1/device-list"


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


@dataclass(frozen=True, slots=True)
class SignedDeviceList:
    """The account key's statement of which devices the account has, at a version.

    Every link and revocation publishes a new list with a higher version.
    Clients pin the highest version they have seen and refuse a lower one, and
    refuse a device the server lists that the signed list does not name (a
    revoked device the server still hands out).
    """

    username: str
    version: int
    device_ids: tuple[str, ...]
    signature: bytes

    def _parts(self) -> list[bytes | str | int]:
        return [self.username, self.version, len(self.device_ids), *self.device_ids]

    @classmethod
    def issue(
        cls, identity: AccountIdentity, *, username: str, version: int, device_ids: Iterable[str]
    ) -> SignedDeviceList:
        """Sign the set ``device_ids`` (stored sorted) as ``version`` of the account's list."""
        if version < 1:
            raise ValueError("a device list version starts at 1")
        ids = tuple(sorted(set(device_ids)))
        unsigned = cls(username, version, ids, b"")
        return cls(username, version, ids, identity.sign(DEVICE_LIST_CONTEXT, unsigned._parts()))

    def verify(self, identity_key: bytes) -> None:
        """Check the signature and canonical order; raises :class:`AuthenticationError`."""
        if list(self.device_ids) != sorted(set(self.device_ids)) or self.version < 1:
            raise AuthenticationError("the device list is not in canonical form")
        verify_signed(identity_key, self.signature, DEVICE_LIST_CONTEXT, self._parts())
