"""Installs every client feature (payload kinds and push handlers) on a new Client.

Adding a feature means adding its ``install`` call here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bastion.client.client import Client


def install(client: Client) -> None:
    """Register each feature's handlers on ``client``."""
    from bastion.client import verification  # noqa: PLC0415 - features import the client

    verification.install(client)
    from bastion.client import receipts  # noqa: PLC0415 - features import the client

    receipts.install(client)
    from bastion.client import policy  # noqa: PLC0415 - features import the client

    policy.install(client)
    from bastion.client import files  # noqa: PLC0415 - features import the client

    files.install(client)
    from bastion.client import groups  # noqa: PLC0415 - features import the client

    groups.install(client)
    from bastion.client import contacts, presence  # noqa: PLC0415 - features import the client

    contacts.install(client)
    presence.install(client)
