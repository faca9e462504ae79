"""The gateway process: unlock once, stay connected, serve the doors, until told to stop.

:func:`run` is the whole life of ``bastion gateway``: it takes the profile's
gateway lock (one gateway per profile), writes a fresh token, opens the doors,
keeps the connection (reconnecting with backoff, fail closed on what retrying
cannot heal) and publishes every event to the subscribed front ends. On the
way out it closes the doors and removes the socket and the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bastion.cli._common import event_json, message_json
from bastion.client import (
    SENT_AWAY,
    Backoff,
    Client,
    ConnectionStateEvent,
    Event,
    HistoryRecord,
    presence,
    receipts,
)
from bastion.errors import ServerRefusedError
from bastion.gateway import methods, paths
from bastion.gateway.context import GatewayContext
from bastion.gateway.http import HttpDoor
from bastion.gateway.irc import IrcDoor
from bastion.gateway.locked import unlocked_methods
from bastion.gateway.methods.files import WebFiles
from bastion.gateway.rpc import Dispatcher
from bastion.gateway.unix import UnixDoor

log = logging.getLogger(__name__)
OFFLINE_CODES = frozenset({"disconnected", "timeout", "unreachable"})


class Door(Protocol):
    """A local door of the gateway (Unix socket, HTTP and WebSocket, IRC)."""

    @property
    def address(self) -> str: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    """What ``bastion gateway`` was asked to open besides the Unix socket."""

    http_host: str = "127.0.0.1"
    http_port: int | None = None  # None: no HTTP door; 0: any free port
    http_tls: tuple[Path, Path] | None = None  # certificate and key, required off loopback
    http_origins: tuple[str, ...] = ()  # browser apps' origins allowed besides the door's own
    irc_host: str = "127.0.0.1"
    irc_port: int | None = None  # None: no IRC door
    web: bool = False  # the HTTP door also serves the browser app
    notify: bool = False
    reconnect_delay_s: float = 1.0  # the first pause after a lost connection; it grows to 30 s


@dataclass(frozen=True, slots=True)
class Ready:
    """Where the doors listen, once they do (``bastion gateway`` prints it)."""

    socket: str
    http: str | None
    irc: str | None
    web: str | None = None  # the link that signs a browser in (the token in its fragment)

    def to_json(self) -> dict[str, Any]:
        out = {"type": "gateway_ready", "socket": self.socket, "http": self.http, "irc": self.irc}
        if self.web is not None:
            out["web"] = self.web
        return out


def web_link(door: HttpDoor, token: str) -> str:
    """The browser app's link: the token rides in the fragment, which no request carries."""
    return f"{door.address}/#token={token}"


def build_doors(
    ctx: GatewayContext,
    dispatcher: Dispatcher,
    token: str,
    options: GatewayOptions,
    web_door: HttpDoor | None = None,
) -> tuple[list[Door], str | None, str | None]:
    """The doors to open: the Unix socket always, HTTP and IRC when asked for.

    Returns the doors and the URLs of the HTTP and IRC doors; the HTTP door
    takes its port here, so ``--http 0`` tells the port it was given. A
    ``web_door`` opened before the profile was unlocked is kept as the HTTP door.
    """
    profile_dir = ctx.client.profile.path
    doors: list[Door] = [UnixDoor(dispatcher, ctx.hub, paths.socket_path(profile_dir))]
    http: str | None = None
    if web_door is not None:
        doors.append(web_door)
        http = web_door.address
    elif options.http_port is not None:
        door = HttpDoor(
            dispatcher,
            ctx.hub,
            token,
            host=options.http_host,
            port=options.http_port,
            tls=options.http_tls,
            origins=options.http_origins,
            web_app=options.web,
        )
        http = door.bind()
        doors.append(door)
    irc: str | None = None
    if options.irc_port is not None:
        irc_door = IrcDoor(ctx, token, options.irc_host, options.irc_port)
        doors.append(irc_door)
        irc = irc_door.address
    return doors, http, irc


async def run(
    client: Client,
    options: GatewayOptions,
    *,
    stop: asyncio.Event,
    on_ready: Callable[[Ready], None] = lambda ready: None,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
    web_door: HttpDoor | None = None,
    token: str | None = None,
) -> None:
    """Serve ``client``'s profile until ``stop`` is set; raises what ends it otherwise.

    ``on_event`` sees every published event too (desktop notifications).
    ``web_door`` and ``token``: the browser app's door, already serving the page
    that unlocked the profile, and the token it was opened with.
    Ends with the error when the connection cannot come back by retrying
    (a server that is not the pinned one, a revoked device...): fail closed.
    """
    profile_dir = client.profile.path
    paths.check_private_folder(profile_dir)
    lock = paths.hold_lock(profile_dir)
    ctx = GatewayContext(client=client, started_at=time.monotonic())
    dispatcher = Dispatcher({**methods.table(ctx), **unlocked_methods(client.account.username)})
    token = paths.new_token(profile_dir, token)
    doors: list[Door] = []
    opened: list[Door] = []
    keeper: asyncio.Task[None] | None = None
    try:
        doors, http, irc = build_doors(ctx, dispatcher, token, options, web_door)
        for door in doors:
            if door is web_door:
                await web_door.attach(dispatcher, ctx.hub, WebFiles(ctx))
            else:
                await door.start()
                if isinstance(door, HttpDoor) and door.web_app:
                    door.serve_files(WebFiles(ctx))
            opened.append(door)
        keeper = asyncio.create_task(
            keep_connected(ctx, on_event, Backoff(base_s=options.reconnect_delay_s))
        )
        web: str | None = None
        for door in opened:
            if isinstance(door, HttpDoor) and door.web_app:
                web = web_link(door, token)
        on_ready(Ready(socket=opened[0].address, http=http, irc=irc, web=web))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({keeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if keeper.done() and not keeper.cancelled():
            exc = keeper.exception()
            if exc is not None:
                publish(ctx, {"type": "connection", "state": "stopped", "reason": str(exc)})
                raise exc
    finally:
        ctx.online = False
        ctx.connection = "stopped"
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await keeper
        for door in reversed(doors):  # a door bound but never started lets go of its port too
            with contextlib.suppress(Exception):
                await door.close()
        with contextlib.suppress(FileNotFoundError):
            (profile_dir / paths.TOKEN_FILE).unlink()
        await client.disconnect()
        if lock is not None:
            os.close(lock)


def publish(ctx: GatewayContext, event: dict[str, Any]) -> None:
    """Send ``event`` to every subscribed front end."""
    ctx.hub.publish(event)


async def keep_connected(
    ctx: GatewayContext,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
    backoff: Backoff | None = None,
) -> None:
    """Receive for ever, reconnecting as needed; publish each event and each change of state."""
    client = ctx.client
    receipts.enable(client)
    backoff = backoff if backoff is not None else Backoff()

    def out(event: dict[str, Any]) -> None:
        publish(ctx, event)
        on_event(event)

    while True:
        try:
            async for event in client.stay_connected(backoff=backoff):
                if isinstance(event, ConnectionStateEvent):
                    await state_changed(ctx, event, out)
                else:
                    out(event_json(event))
        except ServerRefusedError as exc:
            if exc.code != SENT_AWAY:
                raise
            # Another connection of this device took over receiving (a command run without
            # the gateway): come back after a pause, which grows if it keeps happening.
            delay = backoff.next_delay()
            went_offline(ctx, f"{exc.message}", delay, out)
            await asyncio.sleep(delay)


def went_offline(
    ctx: GatewayContext, reason: str, delay: float, out: Callable[[dict[str, Any]], None]
) -> None:
    ctx.online = False
    ctx.connection = "reconnecting"
    ctx.reason = reason
    out(
        {
            "type": "connection",
            "state": "reconnecting",
            "reason": reason,
            "retry_in_s": round(delay, 3),
        }
    )


async def state_changed(
    ctx: GatewayContext, event: ConnectionStateEvent, out: Callable[[dict[str, Any]], None]
) -> None:
    """Follow the kept connection: online or not, what went out, who is online."""
    if event.state == "reconnecting":
        went_offline(ctx, event.reason, event.retry_in_s, out)
        return
    ctx.online = True
    ctx.connection = "connected"
    ctx.reason = ""
    out({"type": "connection", "state": "connected"})
    sent_states(event.sent, event.failed, out)
    try:
        # Sends queued while stay_connected was sending the queue went in behind it.
        sent, failed = await ctx.send_queued()
        sent_states(sent, failed, out)
        for snapshot in await presence.watch(ctx.client):
            out(snapshot.to_json())
    except ServerRefusedError as exc:
        if exc.code not in OFFLINE_CODES:
            raise
        # Lost again at once: the kept connection says so and tries again.


def sent_states(sent: Any, failed: Any, out: Callable[[dict[str, Any]], None]) -> None:
    """Publish the new state of messages that left the outbox or the queue."""
    records: list[HistoryRecord] = [*sent, *failed]
    for record in records:
        out(message_json(record, verified=False))


__all__ = ["Event", "GatewayOptions", "Ready", "run"]
