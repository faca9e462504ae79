"""Marking a contact verified only after a real comparison.

Three ways, each a check of what the other person shows, never one click:

- the whole 60-digit safety number the other side reads out (:func:`confirm_number`);
- the last group of five digits, typed while both look at the full number
  (:func:`confirm_last_group`, what the terminal app asks for);
- a photo or screenshot of the QR code the other side shows (:func:`confirm_qr_image`),
  or the bytes a camera scan decoded from it (:func:`confirm_qr_payload`).

A wrong answer raises :class:`ComparisonMismatch` and changes nothing. The QR
image is decoded with zxing-cpp; the decoded bytes are checked by
:func:`bastion.crypto.safety.verify_qr` (both directions, constant time).
"""

from __future__ import annotations

import hmac
import os
import re

from bastion.client import trust
from bastion.client.feature import ClientCore
from bastion.crypto.safety import (
    GROUP_DIGITS,
    SafetyNumber,
    qr_png,
    render_qr_text,
    safety_number,
    verify_qr,
)
from bastion.errors import SecurityError, StateError

__all__ = [
    "MAX_QR_IMAGE_BYTES",
    "MAX_QR_IMAGE_PIXELS",
    "SAFETY_NUMBER_DIGITS",
    "ComparisonMismatch",
    "SafetyNumber",
    "confirm_last_group",
    "confirm_number",
    "confirm_qr_image",
    "confirm_qr_payload",
    "current_number",
    "decode_qr_image",
    "normalise_number",
    "qr_png",
    "render_qr_text",
]

SAFETY_NUMBER_DIGITS = 60
MAX_QR_IMAGE_BYTES = 20 * 1024 * 1024
MAX_QR_IMAGE_PIXELS = 40_000_000
_SEPARATORS = re.compile(r"[\s\-]+")


class ComparisonMismatch(SecurityError):
    """What was typed or scanned is not what this device computes: nothing was marked."""


def normalise_number(typed: str, *, digits: int = SAFETY_NUMBER_DIGITS) -> str:
    """``typed`` without spaces or dashes; raises ValueError unless exactly ``digits`` digits."""
    compact = _SEPARATORS.sub("", typed)
    if len(compact) != digits or not compact.isascii() or not compact.isdigit():
        raise ValueError(
            f"a safety number is {digits} digits (spaces allowed); got {len(compact)} characters"
        )
    return compact


def current_number(client: ClientCore, user: str) -> SafetyNumber:
    """The safety number with ``user``'s pinned key; StateError if none can be verified now."""
    contact = client.contact(user)
    if contact is None:
        raise StateError(f"no key is pinned for {user} yet: run 'bastion verify {user}' first")
    if contact.trust in ("changed", "self"):
        raise StateError(f"{user} cannot be marked verified now ({contact.trust})")
    return safety_number(
        client.account.username, client.identity().public_bytes, user, contact.identity_key
    )


def confirm_number(client: ClientCore, user: str, typed: str) -> SafetyNumber:
    """Mark ``user`` verified if ``typed`` is the whole safety number; returns it.

    Raises ValueError for something that is not 60 digits, ComparisonMismatch for
    a different number, StateError if ``user`` cannot be verified now.
    """
    number = current_number(client, user)
    given = normalise_number(typed)
    if not hmac.compare_digest(given.encode(), number.digits.encode()):
        raise ComparisonMismatch(
            f"that is not the safety number with {user}: nothing was marked verified. "
            "If they read it out correctly, you are not talking to the same keys."
        )
    trust.mark_verified(client, user, number)
    return number


def confirm_last_group(client: ClientCore, number: SafetyNumber, typed: str) -> None:
    """Mark ``number.their_user`` verified if ``typed`` is the number's last group of five.

    The person reads the whole number while the other side reads out the last group;
    typing it proves the comparison happened. Raises ValueError for something that is
    not five digits, ComparisonMismatch for other digits, StateError if the key
    changed since the number was shown.
    """
    given = normalise_number(typed, digits=GROUP_DIGITS)
    if not hmac.compare_digest(given.encode(), number.groups[-1].encode()):
        raise ComparisonMismatch(
            f"those are not the last five digits of the safety number with "
            f"{number.their_user}: nothing was marked verified"
        )
    trust.mark_verified(client, number.their_user, number)


def decode_qr_image(path: str | os.PathLike[str]) -> list[bytes]:
    """The byte contents of every QR code found in an image file (PNG, JPEG, ...).

    Raises ValueError if the file cannot be read, is not an image, or is too large.
    """
    import zxingcpp  # noqa: PLC0415 - only this command needs the decoder
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    try:
        if os.path.getsize(path) > MAX_QR_IMAGE_BYTES:
            raise ValueError(f"the image is larger than {MAX_QR_IMAGE_BYTES >> 20} MiB")
        with Image.open(path) as image:
            if image.width * image.height > MAX_QR_IMAGE_PIXELS:
                raise ValueError("the image has too many pixels to scan")
            found = zxingcpp.read_barcodes(
                image.convert("L"), formats=zxingcpp.barcode_formats_from_str("QRCode")
            )
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not an image that can be read: {exc}") from None
    except OSError as exc:
        raise ValueError(f"cannot read the image: {exc.strerror or exc}") from None
    return [bytes(code.bytes) for code in found]


def confirm_qr_image(client: ClientCore, user: str, path: str | os.PathLike[str]) -> SafetyNumber:
    """Mark ``user`` verified if the image holds the QR code ``user`` shows for us.

    Raises ValueError if the image holds no QR code, ComparisonMismatch if no code in
    it matches both keys, StateError if ``user`` cannot be verified now.
    """
    payloads = decode_qr_image(path)
    if not payloads:
        raise ValueError("no QR code was found in the image; try a sharper, straighter photo")
    return _confirm_qr(client, user, payloads)


def confirm_qr_payload(client: ClientCore, user: str, payload: bytes) -> SafetyNumber:
    """Mark ``user`` verified if ``payload`` (decoded from their QR code by a camera
    scan in a front end) is the code ``user`` shows for us.

    Raises ComparisonMismatch if it does not match both keys, StateError if
    ``user`` cannot be verified now.
    """
    return _confirm_qr(client, user, [payload])


def _confirm_qr(client: ClientCore, user: str, payloads: list[bytes]) -> SafetyNumber:
    number = current_number(client, user)
    if not any(
        verify_qr(p, number.my_user, number.my_key, number.their_user, number.their_key)
        for p in payloads
    ):
        raise ComparisonMismatch(
            f"the QR code is not the one {user} would show for you: nothing was marked "
            "verified. It may be another person's code, or an old key."
        )
    trust.mark_verified(client, user, number)
    return number
