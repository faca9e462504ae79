"""What a gateway method works with: the unlocked client, the event hub and the connection state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from bastion import __version__
from bastion.client import Client, HistoryRecord, outbox
from bastion.gateway.hub import EventHub
from bastion.gateway.rpc import MethodError


@dataclass(slots=True)
class GatewayContext:
    """The gateway's state as the methods and doors see it.

    ``online`` is True from the moment the kept connection is signed in and its
    queued messages went out, until it is lost; while it is False a send is
    queued in the profile (encrypted at rest) and goes out on reconnect.
    ``send_lock`` keeps sends in the order they were made, queued ones first.
    """

    client: Client
    hub: EventHub = field(default_factory=EventHub)
    online: bool = False
    connection: str = "connecting"  # connecting | connected | reconnecting | stopped
    reason: str = ""
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    started_at: float = 0.0

    def require_online(self) -> None:
        """Raise a ``disconnected`` refusal unless the kept connection is up."""
        if not self.online:
            raise MethodError(
                "disconnected",
                "the server cannot be reached right now; the gateway is reconnecting"
                + (f" ({self.reason})" if self.reason else ""),
            )

    def status(self) -> dict[str, Any]:
        """The ``status`` method's answer."""
        account = self.client.account
        return {
            "type": "gateway",
            "version": __version__,
            "user": account.username,
            "device": account.device_id,
            "server": account.server_url,
            "connection": self.connection,
            "reason": self.reason,
            "queued": len(outbox.queued_messages(self.client)),
            "kept": len(outbox.kept_messages(self.client)),
            "subscribers": self.hub.count,
        }

    async def send_queued(self) -> tuple[list[HistoryRecord], list[HistoryRecord]]:
        """Send what is queued, in order, under the send lock (see :func:`outbox.send_queued`)."""
        async with self.send_lock:
            if not self.online or not outbox.queued_messages(self.client):
                return [], []
            return await outbox.send_queued(self.client)
