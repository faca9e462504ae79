"""The signed organisation policy on the client: pinned key, no rollback.

On every connection the client fetches the policy, checks its signature with
the policy key pinned on first use, and refuses a policy older than the newest
it has seen. Front ends show it (``bastion server-info``) and obey it (no file
upload is attempted when file transfer is off).
"""

from __future__ import annotations

import hashlib

import msgspec

from bastion.client.feature import ClientCore, FeatureSpec, Hooks
from bastion.crypto.policy import PolicyDocument, open_policy
from bastion.errors import AuthenticationError, UntrustedServerError
from bastion.protocol import frames

RECORD = "server-policy"


def install(client: ClientCore, hooks: Hooks) -> None:
    """Check the signed policy on every connection of ``client``."""

    async def check() -> None:
        await refresh(client)

    hooks.on_connect.append(check)


FEATURE = FeatureSpec("policy", install)


class PinnedPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """The pinned policy key and the newest policy seen under it."""

    key: bytes
    document: bytes
    signature: bytes


def key_fingerprint(key: bytes) -> str:
    """How the policy key is shown to people."""
    return "SHA256:" + hashlib.sha256(key).hexdigest()


async def refresh(client: ClientCore) -> PolicyDocument:
    """Fetch, check and remember the server's policy.

    Raises :class:`UntrustedServerError` if the key is not the pinned one, the
    signature does not verify, or the policy is older than one seen before.
    """
    reply = await client.request(frames.GetPolicy(req=0))
    if not isinstance(reply, frames.PolicyInfo):
        raise UntrustedServerError("the server answered the policy request with something else")
    pinned = client.profile.get(RECORD, PinnedPolicy)
    if pinned is not None and pinned.key != reply.key:
        raise UntrustedServerError(
            "the server's policy key changed; someone may be impersonating the server, "
            "or the operator replaced the key: confirm with them before trusting it"
        )
    try:
        document = open_policy(reply.key, reply.document, reply.signature)
    except AuthenticationError:
        raise UntrustedServerError("the server's policy is not validly signed") from None
    if pinned is not None:
        previous = open_policy(pinned.key, pinned.document, pinned.signature)
        if document.version < previous.version:
            raise UntrustedServerError(
                f"the server presented policy version {document.version}, older than "
                f"version {previous.version} seen before: refusing a rolled-back policy"
            )
    with client.profile.transaction():
        client.profile.put(
            RECORD, PinnedPolicy(key=reply.key, document=reply.document, signature=reply.signature)
        )
    return document


def current(client: ClientCore) -> PolicyDocument | None:
    """The newest checked policy, if any was fetched yet."""
    pinned = client.profile.get(RECORD, PinnedPolicy)
    if pinned is None:
        return None
    return open_policy(pinned.key, pinned.document, pinned.signature)


def pinned_key(client: ClientCore) -> bytes | None:
    """The pinned policy key."""
    pinned = client.profile.get(RECORD, PinnedPolicy)
    return None if pinned is None else pinned.key
