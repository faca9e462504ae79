"""The type of a method before it is bound to the gateway's context."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

from bastion.gateway.context import GatewayContext
from bastion.gateway.rpc import Session

ContextMethod: TypeAlias = Callable[[GatewayContext, Session, dict[str, Any]], Awaitable[Any]]
