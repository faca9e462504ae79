"""The organisation policy as a signed document that clients pin and check.

The server signs each version of its policy with its policy key (Ed25519,
context ``bastion/v1/policy``). Clients pin that key on first use, like the
certificate, and refuse a policy that is unsigned, signed by another key, or
older than one they have already seen (a rollback).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from bastion.crypto.signing import AccountIdentity, signing_input, verify_ed25519
from bastion.errors import AuthenticationError

POLICY_CONTEXT = "bastion/v1/policy"


class PolicyDocument(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """What the organisation allows, as the server states it."""

    version: Annotated[int, Meta(ge=1)]
    registration: Literal["open", "invite", "closed"]
    file_transfer: bool
    max_file_mb: Annotated[int, Meta(ge=1)]


def sign_policy(key: AccountIdentity, document: PolicyDocument) -> tuple[bytes, bytes]:
    """(encoded document, signature) for the wire."""
    raw = msgspec.msgpack.encode(document)
    return raw, key.sign(POLICY_CONTEXT, [raw])


def open_policy(public_key: bytes, raw: bytes, signature: bytes) -> PolicyDocument:
    """Verify and decode a signed policy; raises :class:`AuthenticationError`."""
    verify_ed25519(public_key, signature, signing_input(POLICY_CONTEXT, [raw]))
    try:
        return msgspec.msgpack.decode(raw, type=PolicyDocument)
    except msgspec.MsgspecError:
        raise AuthenticationError("the signed policy is malformed") from None
