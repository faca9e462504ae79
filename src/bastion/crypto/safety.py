"""Safety numbers: what two people compare to know they hold each other's keys.

A safety number is computed from the two *account identity keys* and usernames
only, so it stays the same when either person adds or revokes a device. Both
sides compute the same 60 digits, shown as 12 groups of 5. The derivation follows
Signal's numeric fingerprint (iterated SHA-512 per party, 30 digits each, the two
halves sorted), with Bastion's domain-separated encoding; ``docs/safety-numbers.md``
gives it exactly, with a test vector.

The QR code carries both parties' keys and usernames, the shower's first, so one
scan checks both directions: what the shower believes about themselves and about
the scanner.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import struct
from dataclasses import dataclass, field

import segno

from bastion.crypto.signing import ED25519_KEY_BYTES, signing_input
from bastion.errors import ProtocolError

SAFETY_NUMBER_CONTEXT = "bastion/v1/safety-number"
SAFETY_NUMBER_VERSION = 1
SAFETY_NUMBER_ITERATIONS = 5200

DIGITS_PER_PARTY = 30
GROUP_DIGITS = 5
GROUPS_PER_LINE = 4

QR_MAGIC = b"BSN"
QR_VERSION = 1
_MAX_USERNAME_BYTES = 0xFFFF

# Half-block characters: (top module painted, bottom module painted) -> glyph.
_HALF_BLOCKS = {
    (False, False): " ",
    (True, False): "\u2580",  # upper half block
    (False, True): "\u2584",  # lower half block
    (True, True): "\u2588",  # full block
}


@dataclass(frozen=True, slots=True)
class SafetyNumber:
    """The 60-digit safety number of a pair of accounts, seen from one side.

    Two ``SafetyNumber`` objects are equal when their digits are equal, whichever
    side computed them. The side matters only for :meth:`qr_payload`.
    """

    digits: str
    my_user: str = field(compare=False)
    my_key: bytes = field(compare=False, repr=False)
    their_user: str = field(compare=False)
    their_key: bytes = field(compare=False, repr=False)

    @property
    def groups(self) -> list[str]:
        """The digits as 12 groups of 5, in display order."""
        return [self.digits[i : i + GROUP_DIGITS] for i in range(0, len(self.digits), GROUP_DIGITS)]

    def __str__(self) -> str:
        groups = self.groups
        lines = [
            " ".join(groups[i : i + GROUPS_PER_LINE])
            for i in range(0, len(groups), GROUPS_PER_LINE)
        ]
        return "\n".join(lines)

    def qr_payload(self) -> bytes:
        """The bytes to show as a QR code for the other party to scan.

        Versioned; holds this side's username and key first, then the other's.
        """
        return _qr_bytes(self.my_user, self.my_key, self.their_user, self.their_key)


def safety_number(my_user: str, my_key: bytes, their_user: str, their_key: bytes) -> SafetyNumber:
    """Compute the safety number between two accounts.

    ``my_key`` and ``their_key`` are raw 32-byte Ed25519 account identity keys.
    The digits do not depend on which side computes them. Raises
    :class:`ProtocolError` if a key is not 32 bytes or a username is empty.
    """
    mine = _party_digits(my_user, my_key)
    theirs = _party_digits(their_user, their_key)
    low, high = sorted((mine, theirs))
    return SafetyNumber(
        digits=low + high,
        my_user=my_user,
        my_key=bytes(my_key),
        their_user=their_user,
        their_key=bytes(their_key),
    )


def verify_qr(
    payload: bytes, my_user: str, my_key: bytes, their_user: str, their_key: bytes
) -> bool:
    """Check a scanned QR payload shown by the other party.

    True only if the payload says, in the shower's order, exactly
    ``(their_user, their_key)`` for them and ``(my_user, my_key)`` for us: both
    directions agree. Malformed or foreign payloads give False. The comparison
    runs in constant time for payloads of the expected length. Raises
    :class:`ProtocolError` only if our own arguments are malformed.
    """
    expected = _qr_bytes(their_user, their_key, my_user, my_key)
    return hmac.compare_digest(bytes(payload), expected)


def render_qr_text(payload: bytes, *, invert: bool = False, border: int = 2) -> str:
    """Render ``payload`` as a QR code for a terminal, two modules per character.

    Uses only the full, upper and lower half block characters and spaces (no
    colour or escape codes). By default the characters paint the *light*
    modules, which reads correctly on a dark terminal; ``invert=True`` paints the
    dark modules for a light terminal. ``border`` is the quiet zone in modules.
    """
    qr = _make_qr(payload)
    # A module is painted when it is light (dark when inverted).
    paint = [[bool(module) == invert for module in row] for row in qr.matrix_iter(border=border)]
    if len(paint) % 2:  # pad the last line with quiet zone, which is light
        paint.append([not invert] * len(paint[0]))
    lines = []
    for top, bottom in zip(paint[0::2], paint[1::2], strict=True):
        lines.append("".join(_HALF_BLOCKS[(t, b)] for t, b in zip(top, bottom, strict=True)))
    return "\n".join(lines)


def qr_png(payload: bytes, *, scale: int = 8) -> bytes:
    """``payload`` as a QR code PNG image (dark on light, 4-module quiet zone).

    Only the bytes: writing them to a file is the caller's (the command line's).
    """
    out = io.BytesIO()
    _make_qr(payload).save(out, kind="png", scale=scale, border=4)
    return out.getvalue()


def _make_qr(payload: bytes) -> segno.QRCode:
    return segno.make_qr(bytes(payload), error="m")


def _check_party(user: str, key: bytes) -> bytes:
    if len(key) != ED25519_KEY_BYTES:
        raise ProtocolError("account key must be 32 bytes")
    encoded = user.encode()
    if not encoded:
        raise ProtocolError("username must not be empty")
    if len(encoded) > _MAX_USERNAME_BYTES:
        raise ProtocolError("username is too long")
    return encoded


def _party_digits(user: str, key: bytes) -> str:
    _check_party(user, key)
    key = bytes(key)
    digest = signing_input(SAFETY_NUMBER_CONTEXT, [SAFETY_NUMBER_VERSION, key, user])
    for _ in range(SAFETY_NUMBER_ITERATIONS):
        digest = hashlib.sha512(digest + key).digest()
    chunks = (digest[i : i + 5] for i in range(0, DIGITS_PER_PARTY, 5))
    return "".join(f"{int.from_bytes(chunk, 'big') % 100000:05d}" for chunk in chunks)


def _qr_bytes(shower_user: str, shower_key: bytes, scanner_user: str, scanner_key: bytes) -> bytes:
    out = bytearray(QR_MAGIC)
    out.append(QR_VERSION)
    for user, key in ((shower_user, shower_key), (scanner_user, scanner_key)):
        encoded = _check_party(user, key)
        out += key
        out += struct.pack(">H", len(encoded))
        out += encoded
    return bytes(out)
