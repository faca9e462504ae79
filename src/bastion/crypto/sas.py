"""Short authentication strings (SAS) for interactive verification, from vodozemac.

Both devices exchange ephemeral Curve25519 keys (the responder commits to its
key first, so neither side can choose its key after seeing the other's), derive
seven emoji or three four-digit numbers, and the users compare them. When they
match, each device sends a MAC of its account identity key under the shared
secret; each side checks it against the key it had pinned when the
verification started.
"""

from __future__ import annotations

import base64
import hashlib

import vodozemac

from bastion.crypto.signing import signing_input
from bastion.errors import AuthenticationError

CODES_CONTEXT = "bastion/v1/sas-codes"
MAC_CONTEXT = "bastion/v1/sas-mac"
COMMITMENT_CONTEXT = "bastion/v1/sas-commitment"

EMOJI: tuple[tuple[str, str], ...] = (
    ("🐶", "Dog"), ("🐱", "Cat"), ("🦁", "Lion"), ("🐎", "Horse"),
    ("🦄", "Unicorn"), ("🐷", "Pig"), ("🐘", "Elephant"), ("🐰", "Rabbit"),
    ("🐼", "Panda"), ("🐓", "Rooster"), ("🐧", "Penguin"), ("🐢", "Turtle"),
    ("🐟", "Fish"), ("🐙", "Octopus"), ("🦋", "Butterfly"), ("🌷", "Flower"),
    ("🌳", "Tree"), ("🌵", "Cactus"), ("🍄", "Mushroom"), ("🌏", "Globe"),
    ("🌙", "Moon"), ("☁️", "Cloud"), ("🔥", "Fire"), ("🍌", "Banana"),
    ("🍎", "Apple"), ("🍓", "Strawberry"), ("🌽", "Corn"), ("🍕", "Pizza"),
    ("🎂", "Cake"), ("❤️", "Heart"), ("😀", "Smiley"), ("🤖", "Robot"),
    ("🎩", "Hat"), ("👓", "Glasses"), ("🔧", "Spanner"), ("🎅", "Santa"),
    ("👍", "Thumbs Up"), ("☂️", "Umbrella"), ("⌛", "Hourglass"), ("⏰", "Clock"),
    ("🎁", "Gift"), ("💡", "Light Bulb"), ("📕", "Book"), ("✏️", "Pencil"),
    ("📎", "Paperclip"), ("✂️", "Scissors"), ("🔒", "Lock"), ("🔑", "Key"),
    ("🔨", "Hammer"), ("☎️", "Telephone"), ("🏁", "Flag"), ("🚂", "Train"),
    ("🚲", "Bicycle"), ("✈️", "Aeroplane"), ("🚀", "Rocket"), ("🏆", "Trophy"),
    ("⚽", "Ball"), ("🎸", "Guitar"), ("🎺", "Trumpet"), ("🔔", "Bell"),
    ("⚓", "Anchor"), ("🎧", "Headphones"), ("📁", "Folder"), ("📌", "Pin"),
)  # fmt: skip


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def commitment(public_key: str, start: bytes) -> str:
    """The responder's commitment to its SAS key, bound to the start message."""
    return hashlib.sha256(signing_input(COMMITMENT_CONTEXT, [public_key, start])).hexdigest()


class SasKeys:
    """One side's ephemeral SAS key pair, usable for a single exchange."""

    __slots__ = ("_sas", "public_key")

    def __init__(self) -> None:
        self._sas: vodozemac.Sas | None = vodozemac.Sas()
        self.public_key = self._sas.public_key.to_base64()

    def establish(self, their_public_key: str) -> EstablishedSas:
        """Combine with the other side's key; raises AuthenticationError if it is unusable."""
        if self._sas is None:
            raise AuthenticationError("this SAS key was already used")
        sas, self._sas = self._sas, None
        try:
            key = vodozemac.Curve25519PublicKey.from_base64(their_public_key)
            return EstablishedSas(sas.diffie_hellman(key))
        except (vodozemac.KeyException, vodozemac.SasException):
            raise AuthenticationError("the other side's SAS key is not usable") from None

    def __repr__(self) -> str:
        return "SasKeys(<redacted>)"


class EstablishedSas:
    """The shared secret of one verification."""

    __slots__ = ("_established",)

    def __init__(self, established: vodozemac.EstablishedSas) -> None:
        self._established = established

    def codes(self, info: bytes) -> tuple[list[tuple[str, str]], tuple[int, int, int]]:
        """Seven emoji (symbol, name) and three decimals, the same on both sides."""
        sas_bytes = self._established.bytes(_b64(signing_input(CODES_CONTEXT, [info])))
        emoji = [EMOJI[i] for i in sas_bytes.emoji_indices]
        first, second, third = sas_bytes.decimals
        return emoji, (first, second, third)

    def mac(self, identity_key: bytes, info: bytes) -> str:
        """A MAC of an account identity key under the shared secret."""
        return self._established.calculate_mac(
            _b64(identity_key), _b64(signing_input(MAC_CONTEXT, [info]))
        )

    def verify_mac(self, identity_key: bytes, info: bytes, tag: str) -> None:
        """Check the other side's MAC over the key we pinned; raises AuthenticationError."""
        try:
            self._established.verify_mac(
                _b64(identity_key), _b64(signing_input(MAC_CONTEXT, [info])), tag
            )
        except vodozemac.SasException:
            raise AuthenticationError(
                "the verification code does not match the pinned key"
            ) from None

    def __repr__(self) -> str:
        return "EstablishedSas(<redacted>)"
