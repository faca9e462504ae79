"""The connection a frame came from, as a handler sees it.

The connection (``server/net/connection.ClientConnection``) implements
:class:`Request`; handlers and the per-node services (``_services.py``) know
it only by this interface, so neither imports the network layer.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from bastion.protocol import frames
from bastion.protocol.auth import ServerSession
from bastion.protocol.codes import ErrorCode


class Request(Protocol):
    """The connection a frame came from, as far as a handler may touch it."""

    address: str  # the client's address (as a trusted balancer told us, if any)
    limit_key: str  # what per-address limits count the address as (an IPv6 /64)
    session: ServerSession  # the sans-I/O sign-in state of this connection

    @property
    def closed(self) -> bool:
        """True once the connection is closing or gone: replies go nowhere."""
        ...

    def signed_in(self) -> tuple[str, str]:
        """The signed-in (username, device id); raises ProtocolError before sign-in."""
        ...

    def reply(self, frame: frames.Frame) -> None:
        """Send a frame to this client (nothing once closed)."""
        ...

    def refuse(self, req: int | None, code: ErrorCode, message: str) -> None:
        """Answer a request (or, with ``req`` None, a frame) with an error frame."""
        ...

    def watch(self, topic: str) -> None:
        """Have pushes on ``topic`` (Bus ``Push`` events) sent to this connection."""
        ...

    def rechallenge(self) -> None:
        """After a failed sign-in: a new challenge, or the close after the last attempt."""
        ...

    def spawn(self, req: int | None, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task counted against this connection's requests in flight.

        Errors are answered as for any handler (``req`` is the request they answer).
        """
        ...

    def hold(self) -> None:
        """Count a store call this connection waits for without a task (see :meth:`release`)."""
        ...

    def release(self) -> None:
        """The store call counted by :meth:`hold` answered."""
        ...

    def ack(self, seqs: list[int]) -> None:
        """Take acknowledgements of delivered envelopes (the delivery window's)."""
        ...

    def on_close(self, key: str, release: Callable[[], None]) -> None:
        """Call ``release`` when the connection closes (one per key; a later one replaces it)."""
        ...

    async def bind(self, req: int, user: str, device_id: str, *, receive: bool) -> None:
        """Sign the connection in as the device, answer ``signed_in`` and start delivery."""
        ...
