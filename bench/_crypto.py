"""The client's per-message crypto, measured through the real pieces.

One message is: build and sign the payload (``seal``), Olm-encrypt it, Olm-decrypt
it on the other device and verify and decode it (``open_signed``). Two real
devices with a real Olm session; no network, no profile storage.
"""

from __future__ import annotations

import secrets
import time

from _report import CryptoResult
from bastion.crypto.olm import NORMAL, OlmDevice
from bastion.crypto.payload import Payload, direct_conversation, open_signed, seal

TEXT_CHARS = 100
_ALICE = "alice"
_BOB = "bob"


class _Pair:
    """Alice's device talking to Bob's device over an established Olm session."""

    def __init__(self) -> None:
        self.alice = OlmDevice.create()
        self.bob = OlmDevice.create()
        otk = self.bob.new_one_time_keys(1)[0]
        self.outbound = self.alice.outbound_session(self.bob.curve25519, otk.key)
        _kind, body = self.outbound.encrypt(b"hello")
        self.inbound, _ = self.bob.inbound_session(self.alice.curve25519, body)
        # Bob answers once so Alice's next messages are normal (not pre-key) messages.
        reply_kind, reply = self.inbound.encrypt(b"hi")
        self.outbound.decrypt(reply_kind, reply)
        self.text = "x" * TEXT_CHARS
        self.conversation = direct_conversation(_ALICE, _BOB)

    def one_message(self) -> int:
        """Send one text from Alice to Bob through every check; returns the ciphertext size."""
        sealed = seal(
            Payload(
                kind="text",
                sender=_ALICE,
                sender_device=self.alice.device_id,
                recipient=_BOB,
                to=_BOB,
                to_device=self.bob.device_id,
                conversation=self.conversation,
                message_id=secrets.token_bytes(16),
                sent_at=time.time_ns() // 1_000_000,
                body=self.text,
            ),
            self.alice.sign,
        )
        kind, body = self.outbound.encrypt(sealed)
        plaintext = self.inbound.decrypt(kind, body)
        open_signed(
            plaintext,
            sender=_ALICE,
            sender_device=self.alice.device_id,
            sender_ed25519=self.alice.ed25519,
            me=_BOB,
            my_device=self.bob.device_id,
        )
        if kind != NORMAL:
            raise RuntimeError("expected a normal Olm message after the session was set up")
        return len(body)


def sample_ciphertext_bytes() -> int:
    """The size of a real Olm ciphertext carrying a signed 100-character text."""
    return _Pair().one_message()


def measure(*, seconds: float, max_messages: int = 1_000_000) -> CryptoResult:
    """Messages per second through seal, encrypt, decrypt and open_signed on this core."""
    pair = _Pair()
    size = pair.one_message()
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while count < max_messages:
        for _ in range(100):
            pair.one_message()
        count += 100
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    return CryptoResult(
        text_chars=TEXT_CHARS, ciphertext_bytes=size, round_trips_per_s=count / elapsed
    )
