"""The gateway's JSON-RPC methods, one module per area, each exporting ``METHODS``.

Every method is ``async def name(ctx, session, params)``: ``ctx`` is the
:class:`~bastion.gateway.context.GatewayContext`, ``session`` the calling front
end's :class:`~bastion.gateway.rpc.Session`, ``params`` already checked against
the method's schema. Results are the JSON objects ``bastion ... --json`` prints.
"""

from __future__ import annotations

import functools

from bastion.gateway.context import GatewayContext
from bastion.gateway.methods import contacts, files, groups, identity, messages
from bastion.gateway.methods._base import ContextMethod
from bastion.gateway.rpc import Method

MODULES = (messages, contacts, groups, files, identity)


def table(ctx: GatewayContext) -> dict[str, Method]:
    """Every method of every module, bound to ``ctx``; a name claimed twice is refused."""
    out: dict[str, Method] = {}
    for module in MODULES:
        methods: dict[str, ContextMethod] = module.METHODS
        for name, method in methods.items():
            if name in out:
                raise ValueError(f"method {name!r} is defined twice")
            out[name] = functools.partial(method, ctx)
    return out
