"""Imports every feature module that registers frame handlers (see :mod:`handlers`).

The relay imports this module once; adding a feature means adding its import here.
"""

from __future__ import annotations

from bastion.server.handlers import (
    blobs,  # noqa: F401 - file transfer
    contacts,  # noqa: F401 - contacts and presence
    device_lists,  # noqa: F401 - signed device lists
    group_invites,  # noqa: F401 - invitations to groups
    groups,  # noqa: F401 - group chats
    policy,  # noqa: F401 - signed organisation policy
)
