"""The gateway before its profile is open: the browser app creates or unlocks it.

``bastion gateway --web`` with no passphrase at hand (no ``BASTION_PASSPHRASE``,
nothing kept in the keyring) opens the HTTP door at once and serves these
methods only; the person then registers a new account or types the passphrase
in the page. Once the profile is open, :attr:`Unlocker.opened` holds the client
and the gateway starts as usual, swapping in its full set of methods.

The passphrase travels from the page to the gateway on the loopback, inside the
door's checks (token or cookie, Host, Origin); it is never written anywhere and
never quoted back in an error (the schema marks it ``writeOnly``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion.client import Client, check_new_passphrase, check_username, weakness
from bastion.errors import ProfileError
from bastion.gateway.rpc import Method, MethodError, Session

FAILED_UNLOCK_PAUSE_S = 1.0  # after a wrong passphrase, before answering


@dataclass(slots=True)
class Unlocker:
    """The locked gateway's methods for one profile folder, and the client they open."""

    folder: Path
    on_open: Callable[[Client, str], None] = lambda client, secret: None
    opened: asyncio.Future[Client] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    _busy: asyncio.Lock = field(default_factory=asyncio.Lock)

    def methods(self) -> dict[str, Method]:
        return {
            "profile.state": self.state,
            "profile.create": self.create,
            "profile.unlock": self.unlock,
        }

    def _state(self) -> str:
        if self.opened.done():
            return "unlocked"
        return "locked" if Client.exists(self.folder) else "new"

    async def state(self, session: Session, params: dict[str, Any]) -> dict[str, Any]:
        """Whether a profile must be created or unlocked (or is open already)."""
        return {"type": "profile", "state": self._state()}

    def _opened(self, client: Client, secret: str) -> None:
        self.on_open(client, secret)
        self.opened.set_result(client)

    async def create(self, session: Session, params: dict[str, Any]) -> dict[str, Any]:
        """Register a new account on a server and make this profile for it."""
        async with self._busy:
            if self._state() != "new":
                raise MethodError("exists", "this profile exists already: unlock it instead")
            username, secret = params["username"], params["passphrase"]
            check_username(username)
            check_new_passphrase(secret)
            weak = weakness(secret, user_inputs=[username])
            if weak is not None:
                raise ValueError(weak)
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            client = await Client.register(
                self.folder,
                secret,
                username=username,
                server_url=params["server"],
                fingerprint=params.get("fingerprint") or None,
                invite=params.get("invite") or None,
            )
            account = client.account
            self._opened(client, secret)
            return {
                "type": "registered",
                "user": account.username,
                "device": account.device_id,
                "server": account.server_url,
                "fingerprint": account.fingerprint,
            }

    async def unlock(self, session: Session, params: dict[str, Any]) -> dict[str, Any]:
        """Open the profile with its passphrase."""
        async with self._busy:
            state = self._state()
            if state == "new":
                raise MethodError("new", "there is no profile here yet: create one")
            if state == "unlocked":
                raise MethodError("unlocked", "the profile is open already")
            try:
                # The key derivation is memory-hard on purpose: a second or so, once.
                client = Client.open(self.folder, params["passphrase"])
            except ProfileError:
                await asyncio.sleep(FAILED_UNLOCK_PAUSE_S)
                raise
            self._opened(client, params["passphrase"])
            return {"type": "unlocked", "user": client.account.username}


def unlocked_methods(user: str) -> dict[str, Method]:
    """``profile.*`` once the profile is open: the state says so, the rest refuse clearly."""

    async def state(session: Session, params: dict[str, Any]) -> dict[str, Any]:
        return {"type": "profile", "state": "unlocked", "user": user}

    async def already(session: Session, params: dict[str, Any]) -> dict[str, Any]:
        raise MethodError("unlocked", "the profile is open already")

    return {"profile.state": state, "profile.create": already, "profile.unlock": already}
