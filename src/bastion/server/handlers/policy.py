"""Serving the organisation policy, signed with the server's policy key.

The key lives in ``DATA/policy.key`` (mode 0600), made on first use. Every
node of a cluster must hold the same key file (docs/deploy.md), or clients
that pinned one node's key refuse the others.
"""

from __future__ import annotations

import os
from pathlib import Path

from bastion.crypto.policy import PolicyDocument, sign_policy
from bastion.crypto.signing import AccountIdentity
from bastion.errors import StorageError
from bastion.protocol import frames
from bastion.server.handlers._context import Route, Services
from bastion.server.handlers._request import Request

POLICY_KEY_FILE = "policy.key"


def ensure_policy_key(data_dir: Path) -> AccountIdentity:
    """The policy signing key in ``data_dir``, generated on first use (mode 0600)."""
    path = data_dir / POLICY_KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        try:
            return AccountIdentity.from_private_bytes(path.read_bytes())
        except (OSError, ValueError):
            raise StorageError(f"{path} is unreadable or damaged") from None
    key = AccountIdentity.generate()
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes())
    return key


async def get_policy(request: Request, services: Services, frame: frames.GetPolicy) -> None:
    """Answer with the current policy, signed."""
    key = services.policy_key
    policy = services.admin.policy
    raw, signature = sign_policy(
        key,
        PolicyDocument(
            version=policy.version,
            registration=policy.registration,
            file_transfer=policy.file_transfer,
            max_file_mb=policy.max_file_mb,
        ),
    )
    request.reply(
        frames.PolicyInfo(req=frame.req, key=key.public_bytes, document=raw, signature=signature)
    )


ROUTES = (Route(frames.GetPolicy, get_policy, before_signin=True),)
