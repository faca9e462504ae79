"""``bastion gateway``: run the profile's gateway in the foreground (see :mod:`bastion.gateway`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from bastion.cli._common import Subcommands, passphrase, profile_dir
from bastion.client import Client
from bastion.errors import ConfigError
from bastion.gateway import daemon, http, paths, unlock
from bastion.gateway.daemon import GatewayOptions, Ready, web_link
from bastion.gateway.hub import EventHub
from bastion.gateway.irc import check_host
from bastion.gateway.locked import Unlocker
from bastion.gateway.notify import Notifier
from bastion.gateway.rpc import Dispatcher


def options_from(args: argparse.Namespace) -> GatewayOptions:
    """The doors and switches asked for on the command line."""
    tls: tuple[Path, Path] | None = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        tls = (Path(args.tls_cert), Path(args.tls_key))
    if not 0 < args.reconnect_delay <= 30:
        raise ConfigError("--reconnect-delay is more than 0 and at most 30 seconds")
    origins = tuple(args.http_origin or ())
    if args.web and args.http is None:
        args.http = 0  # the browser app needs the HTTP door: any free port unless one is given
    if args.http is not None:
        # Refused here, before the passphrase is asked for and the profile opened.
        if not 0 <= args.http <= 65535:
            raise ConfigError(f"--http {args.http} is not a port (0 to 65535; 0: any free one)")
        http.check_bind(args.http_host, tls)
        if tls is not None:
            http.server_context(tls)  # a certificate that cannot load stops us now
        origins = tuple(http.normal_origin(origin) for origin in origins)
    elif origins or tls:
        raise ConfigError("--http-origin, --tls-cert and --tls-key need --http PORT")
    if args.irc is not None:
        check_host(args.irc_host)  # before the passphrase is asked for
    return GatewayOptions(
        http_host=args.http_host,
        http_port=args.http,
        http_tls=tls,
        http_origins=origins,
        irc_host=args.irc_host,
        irc_port=args.irc,
        web=args.web,
        notify=not args.no_notify,
        reconnect_delay_s=args.reconnect_delay,
    )


def passphrase_at_hand(folder: Path, use_keyring: bool) -> bool:
    """Whether the profile can be unlocked without asking (environment or keyring)."""
    if not Client.exists(folder):
        return False
    if os.environ.get("BASTION_PASSPHRASE"):
        return True
    return use_keyring and bool(unlock.passphrase_for(folder, use_keyring=True, ask=lambda: ""))


async def unlock_in_browser(
    args: argparse.Namespace, folder: Path, door: http.HttpDoor, token: str, stop: asyncio.Event
) -> Client | None:
    """Serve the page that creates or unlocks the profile; the client once it did, or None."""

    def keep(client: Client, secret: str) -> None:
        if args.keyring:
            unlock.remember(folder, secret)

    unlocker = Unlocker(folder, on_open=keep)
    await door.attach(Dispatcher(unlocker.methods()), EventHub(), None)
    await door.start()
    link = web_link(door, token)
    state = "locked" if Client.exists(folder) else "new"
    if args.json:
        print(json.dumps({"type": "gateway_waiting", "state": state, "web": link}), flush=True)
    else:
        what = "unlock the profile" if state == "locked" else "create your account"
        print(f"open this link in your browser to {what}:", flush=True)
        print(f"  {link}", flush=True)
    stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    opened: asyncio.Future[Any] = unlocker.opened
    await asyncio.wait({opened, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not unlocker.opened.done():
        unlocker.opened.cancel()
        await door.close()
        return None
    return unlocker.opened.result()


async def cmd_gateway(args: argparse.Namespace) -> int:
    options = options_from(args)
    folder = profile_dir(args)
    if paths.gateway_running(folder):
        raise ConfigError("a gateway is already running for this profile")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    web_door: http.HttpDoor | None = None
    token: str | None = None
    if options.web and not passphrase_at_hand(folder, args.keyring):
        token = paths.fresh_token()
        web_door = http.HttpDoor(
            Dispatcher({}),
            EventHub(),
            token,
            host=options.http_host,
            port=options.http_port or 0,
            tls=options.http_tls,
            origins=options.http_origins,
            web_app=True,
        )
        web_door.bind()
        opened = await unlock_in_browser(args, folder, web_door, token, stop)
        if opened is None:
            print("gateway stopped", file=sys.stderr, flush=True)
            return 0
        client = opened
    else:
        secret = unlock.passphrase_for(folder, use_keyring=args.keyring, ask=passphrase)
        client = Client.open(folder, secret)
        if args.keyring:
            unlock.remember(folder, secret)
        del secret

    def ready(where: Ready) -> None:
        if args.json:
            print(json.dumps(where.to_json()), flush=True)
            return
        print(f"gateway for {client.account.username} ready", flush=True)
        print(f"  socket: {where.socket}", flush=True)
        if where.web:
            print(f"  web:    {where.web}", flush=True)
            print(
                "          (open it in your browser; it works until the gateway stops)", flush=True
            )
        elif where.http:
            print(f"  http:   {where.http} (token in {folder / 'gateway.token'})", flush=True)
        if where.irc:
            print(f"  irc:    {where.irc} (password: the token)", flush=True)

    notifier = None
    if options.notify:
        notifier = Notifier(client.account.username)
    try:
        await daemon.run(
            client,
            options,
            stop=stop,
            on_ready=ready,
            on_event=notifier.show if notifier is not None else (lambda event: None),
            web_door=web_door,
            token=token,
        )
    finally:
        await client.close()
        if notifier is not None:
            await notifier.close()
    print("gateway stopped", file=sys.stderr, flush=True)
    return 0


def add_commands(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Register ``bastion gateway`` on the main parser."""
    gw = sub.add_parser(
        "gateway",
        parents=[common],
        help="run this profile's gateway: one connection for every local program",
        description=(
            "Unlock the profile once, stay connected, and serve local programs: JSON-RPC on "
            "a Unix socket in the profile folder (the bastion commands use it), and, when "
            "asked for, JSON-RPC over HTTP and WebSocket and an IRC server on 127.0.0.1."
        ),
    )
    gw.add_argument(
        "--web",
        action="store_true",
        help="serve the browser app on the HTTP door (any free port unless --http PORT) and "
        "print the link to open; with no passphrase at hand, create or unlock the profile there",
    )
    gw.add_argument("--http", type=int, metavar="PORT", help="serve JSON-RPC over HTTP/WebSocket")
    gw.add_argument("--http-host", default="127.0.0.1", help="address of the HTTP door")
    gw.add_argument("--tls-cert", help="certificate for an HTTP door off the loopback")
    gw.add_argument("--tls-key", help="private key for --tls-cert")
    gw.add_argument(
        "--http-origin",
        action="append",
        metavar="URL",
        help="let a browser app from this origin (e.g. https://app.example) use the HTTP door "
        "(repeatable)",
    )
    gw.add_argument("--irc", type=int, metavar="PORT", help="serve IRC (e.g. 6667)")
    gw.add_argument("--irc-host", default="127.0.0.1", help="address of the IRC door (loopback)")
    gw.add_argument(
        "--keyring",
        action="store_true",
        help="take the passphrase from the OS keyring, and keep it there once it unlocks",
    )
    gw.add_argument(
        "--reconnect-delay",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="first pause after a lost connection (it doubles, with jitter, up to 30 s)",
    )
    gw.add_argument("--no-notify", action="store_true", help="no desktop notifications")
    gw.set_defaults(run=cmd_gateway)
