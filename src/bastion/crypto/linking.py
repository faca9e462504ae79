"""Linking a new device through an existing one, with a one-time code.

The existing device shows a code of 128 random bits. Both sides derive from it
a *slot* (the only thing the server sees, to pair them) and a sealing key. The
new device sends its public keys sealed under that key; the existing device
answers with the account identity key and a certificate for the new device,
sealed likewise. Without the code the server can neither read the answer nor
substitute its own keys: AES-GCM under the code-derived key authenticates both
directions, and each direction has its own associated data.

Before the grant, the existing device may send the history in *pieces*, each
sealed under the same key with its index in the associated data and the
number of pieces inside; the grant names that number and the SHA-256 of the whole, so
a piece dropped, repeated, reordered or taken from another link is refused.
"""

from __future__ import annotations

import base64
import os

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bastion.crypto.signing import signing_input
from bastion.errors import AuthenticationError

CODE_BYTES = 16
SLOT_CONTEXT = "bastion/v1/link-slot"
KEY_CONTEXT = "bastion/v1/link-key"
REQUEST_CONTEXT = "bastion/v1/link-request"
GRANT_CONTEXT = "bastion/v1/link-grant"
PIECE_CONTEXT = "bastion/v1/link-history"
NONCE_BYTES = 12


class LinkRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The new device's public keys."""

    ed25519: bytes
    curve25519: bytes
    created_at: int


class LinkGrant(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """What the existing device hands over: the account name, its identity key, the server.

    The new device then certifies its own keys with the account key. It checks
    that the server it reached presents ``server_fingerprint``, the certificate
    the existing device has pinned, and pins that one. ``history_pieces`` is the
    number of history pieces sent before the grant and ``history_sha256`` the
    hash of their contents joined (none: no history was sent).
    """

    username: str
    identity_private: bytes
    server_name: str
    server_fingerprint: str = ""
    history_pieces: int = 0
    history_sha256: bytes = b""

    def __repr__(self) -> str:
        return f"LinkGrant({self.username}, <redacted>)"


def new_code() -> str:
    """A fresh one-time code, as the user reads it (e.g. ``ABCD-EFGH-...``)."""
    text = base64.b32encode(os.urandom(CODE_BYTES)).decode().rstrip("=")
    return "-".join(text[i : i + 4] for i in range(0, len(text), 4))


def parse_code(text: str) -> bytes:
    """The code's bytes; raises ValueError with a sentence if it was mistyped."""
    cleaned = text.replace("-", "").replace(" ", "").upper()
    problem = "that link code is not valid; copy it again from the other device"
    try:
        raw = base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))
    except ValueError:
        raise ValueError(problem) from None
    if len(raw) != CODE_BYTES:
        raise ValueError(problem)
    return raw


def _derive(code: bytes, context: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=signing_input(context, [])
    ).derive(code)


def slot_and_key(code: bytes) -> tuple[bytes, bytes]:
    """(slot shown to the server, sealing key kept by the devices)."""
    return _derive(code, SLOT_CONTEXT), _derive(code, KEY_CONTEXT)


def _seal(key: bytes, context: str, slot: bytes, value: msgspec.Struct) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    aad = signing_input(context, [slot])
    return nonce + AESGCM(key).encrypt(nonce, msgspec.msgpack.encode(value), aad)


def _open(key: bytes, context: str, slot: bytes, blob: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(
            blob[:NONCE_BYTES], blob[NONCE_BYTES:], signing_input(context, [slot])
        )
    except (InvalidTag, ValueError):
        raise AuthenticationError("the link message was not sealed with this code") from None


def seal_request(key: bytes, slot: bytes, request: LinkRequest) -> bytes:
    """Seal the new device's keys."""
    return _seal(key, REQUEST_CONTEXT, slot, request)


def open_request(key: bytes, slot: bytes, blob: bytes) -> LinkRequest:
    """Open and check a request; raises :class:`AuthenticationError`."""
    try:
        return msgspec.msgpack.decode(_open(key, REQUEST_CONTEXT, slot, blob), type=LinkRequest)
    except msgspec.MsgspecError:
        raise AuthenticationError("malformed link request") from None


def seal_grant(key: bytes, slot: bytes, grant: LinkGrant) -> bytes:
    """Seal the account key and certificate for the new device."""
    return _seal(key, GRANT_CONTEXT, slot, grant)


def open_grant(key: bytes, slot: bytes, blob: bytes) -> LinkGrant:
    """Open and check a grant; raises :class:`AuthenticationError`."""
    try:
        return msgspec.msgpack.decode(_open(key, GRANT_CONTEXT, slot, blob), type=LinkGrant)
    except msgspec.MsgspecError:
        raise AuthenticationError("malformed link grant") from None


class HistoryPiece(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One sealed piece of the history sent before the grant."""

    index: int
    total: int
    data: bytes

    def __repr__(self) -> str:
        return f"HistoryPiece({self.index}/{self.total}, <redacted>)"


def seal_piece(key: bytes, slot: bytes, index: int, total: int, data: bytes) -> bytes:
    """Seal piece ``index`` of ``total`` (its place is bound into the associated data)."""
    nonce = os.urandom(NONCE_BYTES)
    aad = signing_input(PIECE_CONTEXT, [slot, index.to_bytes(4, "big")])
    plain = msgspec.msgpack.encode(HistoryPiece(index=index, total=total, data=data))
    return nonce + AESGCM(key).encrypt(nonce, plain, aad)


def open_piece(key: bytes, slot: bytes, index: int, blob: bytes) -> HistoryPiece:
    """Open the piece expected at ``index``; raises :class:`AuthenticationError`.

    A piece sealed for another place or another link does not open; the caller
    checks ``total`` against the first piece and the grant.
    """
    try:
        plain = AESGCM(key).decrypt(
            blob[:NONCE_BYTES],
            blob[NONCE_BYTES:],
            signing_input(PIECE_CONTEXT, [slot, index.to_bytes(4, "big")]),
        )
        piece = msgspec.msgpack.decode(plain, type=HistoryPiece)
    except (InvalidTag, ValueError, msgspec.MsgspecError):
        raise AuthenticationError("a piece of the history was not sealed for this link") from None
    if piece.index != index:
        raise AuthenticationError("a piece of the history is out of place")
    return piece
