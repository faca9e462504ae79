"""Where features built on the relay register the frames they handle.

The relay dispatches the core frames itself; any other client frame is looked
up here by type. A feature module (contacts, files, groups...) registers its
handlers at import time with :func:`handles`, and the relay imports it once.
Handlers run only for signed-in connections unless registered with
``before_signin=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from bastion.protocol import frames

if TYPE_CHECKING:
    from bastion.server.net.connection import ClientConnection

F = TypeVar("F", bound=frames.Frame)
Handler = Callable[["ClientConnection", Any], Coroutine[Any, Any, None]]

SIGNED_IN: dict[type[frames.Frame], Handler] = {}
BEFORE_SIGNIN: dict[type[frames.Frame], Handler] = {}


def handles(
    frame_type: type[F], *, before_signin: bool = False
) -> Callable[[Callable[[ClientConnection, F], Coroutine[Any, Any, None]]], Handler]:
    """Register the decorated coroutine function as the handler of ``frame_type``."""

    def register(fn: Callable[[ClientConnection, F], Coroutine[Any, Any, None]]) -> Handler:
        table = BEFORE_SIGNIN if before_signin else SIGNED_IN
        if frame_type in table:
            raise RuntimeError(f"{frame_type.__name__} already has a handler")
        table[frame_type] = fn
        return fn

    return register
