"""The IRC door of the gateway: any IRC client on this machine, as the profile's account.

:mod:`.protocol` is the wire format and the cleaning of peers' text,
:mod:`.channels` names groups as channels, :mod:`.session` serves one IRC
client, :mod:`.door` listens on the loopback. docs/gateway.md has the mapping
of IRC commands to Bastion.
"""

from __future__ import annotations

from bastion.gateway.irc.door import MAX_CLIENTS, IrcDoor, check_host

__all__ = ["MAX_CLIENTS", "IrcDoor", "check_host"]
