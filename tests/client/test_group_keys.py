"""The signature inside a group message covers its kind and the sender's chain head."""

from __future__ import annotations

import msgspec
import pytest
import vodozemac

from bastion.client import group_keys
from bastion.crypto.olm import OlmDevice
from bastion.crypto.signing import signing_input
from bastion.errors import RejectedMessageError

PICKLE_KEY = bytes(range(32))
GROUP = bytes([7]) * 32


def _sealed(
    device: OlmDevice, signed: group_keys.GroupPlaintext, shown: group_keys.GroupPlaintext
) -> tuple[group_keys.InboundSession, bytes]:
    """Sign ``signed`` but Megolm-encrypt ``shown`` with that signature (a tamper inside)."""
    out = group_keys.new_outbound(GROUP, PICKLE_KEY, 1)
    key = group_keys.room_key(out, PICKLE_KEY, chain_seq=3, chain_hash=bytes(32))
    inbound = group_keys.import_room_key(
        key, group_id=GROUP, sender="alice", sender_device=device.device_id, pickle_key=PICKLE_KEY
    )
    parts = group_keys._signed_parts(signed)
    signature = device.sign(signing_input(group_keys.GROUP_MESSAGE_CONTEXT, parts))
    body = msgspec.msgpack.encode(msgspec.structs.replace(shown, signature=signature))
    session = vodozemac.GroupSession.from_pickle(out.pickle, PICKLE_KEY)
    return inbound, session.encrypt(body).to_bytes()


def _plaintext(device: OlmDevice, **changes: object) -> group_keys.GroupPlaintext:
    base = group_keys.GroupPlaintext(
        group_id=GROUP,
        sender="alice",
        sender_device=device.device_id,
        message_id=bytes(16),
        sent_at=1,
        body='{"name": "report.pdf"}',
        kind="file.offer",
        chain_seq=3,
        chain_hash=bytes(32),
    )
    return msgspec.structs.replace(base, **changes)


def _decrypt(
    device: OlmDevice, inbound: group_keys.InboundSession, ciphertext: bytes
) -> group_keys.GroupPlaintext:
    _, plaintext = group_keys.decrypt(
        inbound,
        ciphertext,
        group_id=GROUP,
        sender="alice",
        sender_device=device.device_id,
        sender_ed25519=device.ed25519,
        pickle_key=PICKLE_KEY,
    )
    return plaintext


def test_an_untampered_message_decrypts_with_its_kind_and_head() -> None:
    device = OlmDevice.create()
    original = _plaintext(device)
    inbound, ciphertext = _sealed(device, original, original)
    plaintext = _decrypt(device, inbound, ciphertext)
    assert (plaintext.kind, plaintext.chain_seq, plaintext.body) == ("file.offer", 3, original.body)


@pytest.mark.parametrize(
    "tamper",
    [{"kind": "text"}, {"chain_seq": 2}, {"chain_hash": bytes([1]) * 32}],
    ids=["kind", "chain_seq", "chain_hash"],
)
def test_a_changed_kind_or_head_under_the_same_signature_is_rejected(
    tamper: dict[str, object],
) -> None:
    device = OlmDevice.create()
    original = _plaintext(device)
    inbound, ciphertext = _sealed(device, original, _plaintext(device, **tamper))
    with pytest.raises(RejectedMessageError, match="bad signature"):
        _decrypt(device, inbound, ciphertext)
