"""Commands about identity: verification, trust, devices, linking, export and import.

With a gateway running for the profile, every command here but ``link`` and
``account import`` (which make a profile) goes through the gateway's methods,
whose answers are built by the functions here, so the output is the same.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from bastion.cli._common import Subcommands, passphrase, profile_dir, with_client, with_profile
from bastion.cli._gateway import absolute, gateway_holds, with_gateway_or_client
from bastion.client import (
    Client,
    comparison,
    devices,
    link_history,
    policy,
    trust,
    verification,
)
from bastion.display import escape_text
from bastion.errors import BastionError
from bastion.gateway.link import GatewayLink

LINK_MARGIN_S = 30.0  # past the code's lifetime, how long to wait for the gateway's outcome
CANCEL_S = 5.0  # how long an interrupted verification waits for the gateway to cancel it


async def cmd_verify_sas(args: argparse.Namespace) -> int:
    if not sys.stdin.isatty():
        raise BastionError("interactive verification needs a terminal to confirm the codes")

    async def compare(codes: verification.SasCodes) -> bool:
        print(f"Compare with what {args.user} sees:\n{codes}", flush=True)
        answer = await asyncio.to_thread(input, "Do they match exactly? [y/N] ")
        return answer.strip().lower() in ("y", "yes")

    def waiting(me: str) -> None:
        print(f"Waiting for {args.user} (they run: bastion verify {me} --sas)", flush=True)

    async def via_gateway(link: GatewayLink) -> int:
        waiting((await link.call("whoami"))["user"])
        await verify_sas_via_gateway(link, args.user, compare)
        print(f"{args.user} is verified.")
        return 0

    async def work(client: Client) -> int:
        async def pump() -> None:
            async for _ in client.receive():
                pass  # verification steps are handled as they arrive

        waiting(client.account.username)
        pumping = asyncio.create_task(pump())
        try:
            await verification.verify_interactively(client, args.user, compare)
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumping
        print(f"{args.user} is verified.")
        return 0

    async def direct() -> int:
        if gateway_holds(args):
            # Verifying needs this device's deliveries; taking them over would cut the
            # gateway off. It holds the profile but does not answer yet.
            raise BastionError(
                "a gateway runs for this profile but does not answer on its socket yet; "
                "try again in a moment, or stop the gateway to verify without it"
            )
        return await with_client(args, work, receive=True)

    return await with_gateway_or_client(args, via_gateway=via_gateway, direct=direct)


async def verify_sas_via_gateway(
    link: GatewayLink, user: str, compare: Callable[[verification.SasCodes], Awaitable[bool]]
) -> None:
    """Run a SAS verification in the gateway, asking the person through ``compare``.

    The gateway runs the exchange (``verify.sas_start``) and publishes the codes
    as a ``verification_codes`` event; the answer goes back as
    ``verify.sas_confirm`` or ``verify.sas_cancel``. Raises BastionError, with
    the gateway's reason, unless both sides confirmed.
    """
    await link.call("subscribe")
    flow = (await link.call("verify.sas_start", user=user))["id"]
    events = link.events()
    async for event in events:
        if event.get("id") != flow:
            continue
        kind = event.get("type")
        if kind == "verification_failed":
            raise BastionError(str(event.get("reason") or "the verification failed"))
        if kind != "verification_codes":
            continue
        codes = verification.SasCodes(
            emoji=[(e["symbol"], e["name"]) for e in event["emoji"]],
            decimals=(event["decimals"][0], event["decimals"][1], event["decimals"][2]),
        )
        try:
            matches = await compare(codes)
        except BaseException:
            # Interrupted at the question: the gateway refuses the codes now, not at its timeout.
            with contextlib.suppress(BastionError, OSError):
                await asyncio.wait_for(link.call("verify.sas_cancel", id=flow), CANCEL_S)
            raise
        if matches:
            await link.call("verify.sas_confirm", id=flow)
            return
        await link.call("verify.sas_cancel", id=flow)
        raise BastionError("the codes did not match; nothing was marked verified")
    raise BastionError("the gateway stopped; nothing was marked verified")


async def cmd_verify(args: argparse.Namespace) -> int:
    if args.sas:
        return await cmd_verify_sas(args)

    confirming = args.confirm is not None or args.qr_image is not None

    def refuse_changed() -> None:
        if confirming:
            raise BastionError(
                f"{args.user}'s key changed: nothing was marked verified. Compare the new "
                f"number (bastion verify {args.user}) and accept it first (bastion trust "
                f"{args.user} --accept-new-key ...)"
            )

    async def via_gateway(link: GatewayLink) -> int:
        qr_text = not (args.json or args.qr or confirming)
        shown = await link.call("verify.number", user=args.user, qr=bool(args.qr), qr_text=qr_text)
        png = base64.b64decode(shown.pop("qr_png", ""))
        text = shown.pop("qr_text", None)
        if shown["trust"] == "changed":
            refuse_changed()
            return await show_new_key(args, shown, text, png)
        if confirming:
            params = (
                {"number": args.confirm}
                if args.confirm is not None
                else {"qr_image": absolute(args.qr_image)}
            )
            shown = await link.call("verify.confirm", user=args.user, **params)
        return await show_number(args, shown, text, png)

    async def work(client: Client) -> int:
        waiting = client.contact(args.user)
        if waiting is not None and waiting.trust == "changed":
            refuse_changed()
            number, fingerprint = new_key(client, args.user)
            shown = safety_number_json(args.user, number, "changed", fingerprint)
            return await show_new_key(args, shown, *qr_of(args, number))
        number = await trust.safety_number_with(client, args.user)
        if args.confirm is not None:
            comparison.confirm_number(client, args.user, args.confirm)
        elif args.qr_image is not None:
            comparison.confirm_qr_image(client, args.user, Path(args.qr_image))
        contact = client.contact(args.user)
        state = contact.trust if contact is not None else "unverified"
        shown = safety_number_json(args.user, number, state)
        return await show_number(args, shown, *qr_of(args, number))

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work)
    )


def qr_of(args: argparse.Namespace, number: comparison.SafetyNumber) -> tuple[str | None, bytes]:
    """The QR code as text for the terminal (unless written to a file), and as a PNG if asked."""
    payload = number.qr_payload()
    png = comparison.qr_png(payload) if args.qr else b""
    return (None if args.qr else comparison.render_qr_text(payload)), png


def number_lines(shown: dict[str, Any]) -> str:
    """The safety number of a ``safety_number`` object laid out as the terminal shows it."""
    digits = str(shown["safety_number"]).replace(" ", "")
    return str(comparison.SafetyNumber(digits, "", b"", "", b""))


async def show_number(
    args: argparse.Namespace, shown: dict[str, Any], qr_text: str | None, png: bytes
) -> int:
    """``bastion verify USER``'s output from its ``--json`` object (and the QR code)."""
    user, state = args.user, shown["trust"]
    if args.qr:
        await asyncio.to_thread(Path(args.qr).write_bytes, png)
    if args.json:
        print(json.dumps(shown))
        return 0
    if args.confirm is not None or args.qr_image is not None:
        how = "safety number" if args.confirm is not None else "QR code"
        print(f"The {how} matches: {args.user} is verified.")
        return 0
    print(f"Safety number with {user} (compare it with theirs, in person or by call):")
    print(number_lines(shown))
    if qr_text is not None:
        print(qr_text)
    print(f"{user} is {state}.")
    if state != "verified":
        print(
            with_profile(
                "To mark them verified once you compared, use one of:\n"
                f"  bastion verify {args.user} --confirm NUMBER\n"
                f"  bastion verify {args.user} --qr-image PHOTO\n"
                f"  bastion verify {args.user} --sas\n"
                "NUMBER: the 60 digits they read out. PHOTO: a picture of their QR code."
            )
        )
    return 0


def safety_number_json(
    user: str, number: comparison.SafetyNumber, state: str, fingerprint: str | None = None
) -> dict[str, Any]:
    """``bastion verify USER --json``: the number to compare, and the new key's fingerprint
    while a key change waits."""
    out: dict[str, Any] = {
        "type": "safety_number",
        "user": user,
        "safety_number": " ".join(number.groups),
    }
    if fingerprint is not None:
        out["fingerprint"] = fingerprint
    out["trust"] = state
    return out


def new_key(client: Client, user: str) -> tuple[comparison.SafetyNumber, str]:
    """While a key change waits: the safety number with the new key, and its fingerprint."""
    number = trust.pending_safety_number(client, user)
    contact = client.contact(user)
    if contact is None or contact.pending_key is None:
        raise BastionError(f"no key change is waiting for {user}")
    return number, trust.key_fingerprint(contact.pending_key)


async def show_new_key(
    args: argparse.Namespace, shown: dict[str, Any], qr_text: str | None, png: bytes
) -> int:
    """While a key change waits: the safety number with the new key, and how to accept it."""
    user, fingerprint = args.user, shown["fingerprint"]
    if args.json:
        print(json.dumps(shown))
        return 0
    print(f"{user}'s account key has CHANGED. Their messages wait until you decide.")
    print(f"Safety number with {user}'s NEW key (compare it with theirs, in person or by call):")
    print(number_lines(shown))
    print(f"New key fingerprint: {fingerprint}")
    if args.qr:
        await asyncio.to_thread(Path(args.qr).write_bytes, png)
    elif qr_text is not None:
        print(qr_text)
    print(
        f"If it matches what {user} sees, accept exactly this key:\n"
        f"  bastion trust {user} --accept-new-key {fingerprint}"
    )
    return 0


async def cmd_trust(args: argparse.Namespace) -> int:
    if not args.accept_new_key:
        raise BastionError(
            "say what to do: --accept-new-key NUMBER_OR_FINGERPRINT "
            f"(bastion verify {args.user} shows them)"
        )
    key = " ".join(args.accept_new_key)

    def show(state: str) -> int:
        print(
            with_profile(
                f"accepted {args.user}'s new account key; they are {state} until you "
                f"compare safety numbers again (bastion verify {args.user})"
            )
        )
        return 0

    async def via_gateway(link: GatewayLink) -> int:
        return show((await link.call("trust.accept_new_key", user=args.user, key=key))["trust"])

    async def work(client: Client) -> int:
        return show(trust.accept_new_key(client, args.user, key).trust)

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work, connect=False)
    )


def device_json(device_id: str, created_at: int, *, this_device: bool) -> dict[str, Any]:
    """``bastion devices list --json``: one certified device of this account."""
    return {
        "type": "device",
        "device": device_id,
        "created_at": created_at,
        "this_device": this_device,
    }


async def cmd_devices_list(args: argparse.Namespace) -> int:
    def show(listing: list[dict[str, Any]]) -> int:
        for device in listing:
            if args.json:
                print(json.dumps(device))
            else:
                mine = "  (this device)" if device["this_device"] else ""
                print(f"{escape_text(device['device'])}{mine}")
        return 0

    async def via_gateway(link: GatewayLink) -> int:
        return show(await link.call("devices.list"))

    async def work(client: Client) -> int:
        mine = client.account.device_id
        listed = await devices.list_devices(client)
        return show(
            [
                device_json(d.device_id, d.created_at, this_device=d.device_id == mine)
                for d in listed
            ]
        )

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work)
    )


def linked_json(device: str, history: link_history.HistorySummary) -> dict[str, Any]:
    """``bastion devices link --json`` once linked (the gateway's ``linked`` event too)."""
    return {
        "type": "linked",
        "device": device,
        "history": {
            "messages": history.messages,
            "conversations": history.conversations,
            "verified": history.verified,
        },
    }


HISTORY_QUESTION = (
    "Send this device's history (1:1 conversations) and the contacts you verified to the "
    "new device, sealed under the code? Type all, a number of days, or none [none]: "
)


def history_choice(args: argparse.Namespace) -> link_history.HistoryChoice:
    """``--history`` as given; without it ask in a terminal, and send nothing otherwise."""
    if args.history is not None:
        try:
            return link_history.parse_choice(args.history)
        except ValueError as exc:
            raise BastionError(str(exc)) from None
    if args.json or not sys.stdin.isatty():
        return link_history.NO_HISTORY
    while True:
        answer = input(HISTORY_QUESTION).strip() or "none"
        try:
            return link_history.parse_choice(answer)
        except ValueError as exc:
            print(exc, flush=True)


async def cmd_devices_link(args: argparse.Namespace) -> int:
    choice = history_choice(args)

    def show_code(code: str, server_url: str) -> None:
        if args.json:
            print(json.dumps({"type": "link_code", "code": code}), flush=True)
        else:
            # The new device learns the certificate to pin from the sealed answer.
            command = f"bastion link {code} --server {server_url}"
            print("On the new machine, run (or scan the code below):", flush=True)
            print(f"  {command}", flush=True)
            print(comparison.render_qr_text(command.encode()), flush=True)
            print("The code works once, for 10 minutes. Waiting...", flush=True)

    def show_linked(shown: dict[str, Any]) -> int:
        if args.json:
            print(json.dumps(shown))
            return 0
        print(f"linked device {escape_text(str(shown['device']))}")
        sent = link_history.HistorySummary(**shown.get("history", {}))
        print(f"sent {sent.describe()}" if sent.messages or sent.verified else sent.describe())
        return 0

    async def via_gateway(link: GatewayLink) -> int:
        await link.call("subscribe")  # before the code is made, so its outcome is not missed
        offer = await link.call("devices.link", history=choice.describe())
        show_code(offer["code"], offer["server"])
        wait_s = float(offer["expires_in_s"]) + LINK_MARGIN_S
        outcome = await asyncio.wait_for(link_outcome(link), wait_s)
        if outcome.get("type") != "linked":
            raise BastionError(str(outcome.get("reason") or "the device was not linked"))
        return show_linked(outcome)

    async def work(client: Client) -> int:
        linked = await devices.offer_link(
            client, lambda code: show_code(code, client.account.server_url), history=choice
        )
        return show_linked(linked_json(linked.device_id, linked.history))

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work, receive=False)
    )


async def link_outcome(link: GatewayLink) -> dict[str, Any]:
    """The gateway's ``linked`` or ``link_failed`` event (the others are not this command's)."""
    async for event in link.events():
        if event.get("type") in ("linked", "link_failed"):
            return dict(event)
    raise BastionError("the gateway stopped before the device was linked")


async def cmd_devices_revoke(args: argparse.Namespace) -> int:
    async def via_gateway(link: GatewayLink) -> int:
        await link.call("devices.revoke", device=args.device)
        print(f"revoked {args.device}")
        return 0

    async def work(client: Client) -> int:
        await devices.revoke_device(client, args.device)
        print(f"revoked {args.device}")
        return 0

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work)
    )


async def cmd_link(args: argparse.Namespace) -> int:
    received: list[link_history.HistorySummary] = []
    client = await devices.join_with_code(
        profile_dir(args),
        passphrase(confirm=True),
        code=args.code,
        server_url=args.server,
        fingerprint=args.fingerprint,
        on_history=received.append,
    )
    try:
        print(f"linked as {client.account.username} (device {client.account.device_id})")
        kept = received[0] if received else link_history.HistorySummary()
        print(f"received {kept.describe()}" if kept.messages or kept.verified else kept.describe())
    finally:
        await client.close()
    return 0


def server_info_json(client: Client) -> dict[str, Any]:
    """``bastion server-info --json``: the server's pins and its signed policy."""
    document = policy.current(client)
    key = policy.pinned_key(client)
    if document is None or key is None:
        raise BastionError("the server sent no policy")
    account = client.account
    return {
        "type": "server_info",
        "server": account.server_url,
        "name": account.server_name,
        "fingerprint": account.fingerprint,
        "policy_key": policy.key_fingerprint(key),
        "policy": msgspec.to_builtins(document),
    }


async def cmd_server_info(args: argparse.Namespace) -> int:
    def show(info: dict[str, Any]) -> int:
        document = info["policy"]
        if args.json:
            print(json.dumps(info))
            return 0
        print(escape_text(f"server {info['server']} ({info['name']})"))
        print(f"certificate {info['fingerprint']}")
        print(f"policy key {info['policy_key']} (pinned; checked on every connection)")
        print(
            f"policy version {document['version']}: registration {document['registration']}, "
            f"file transfer {'on' if document['file_transfer'] else 'off'}, "
            f"files up to {document['max_file_mb']} MB"
        )
        return 0

    async def via_gateway(link: GatewayLink) -> int:
        return show(await link.call("server.info"))

    async def work(client: Client) -> int:
        return show(server_info_json(client))

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work)
    )


def export_passphrase(*, confirm: bool) -> str:
    """The export passphrase from BASTION_EXPORT_PASSPHRASE or a prompt."""
    env = os.environ.get("BASTION_EXPORT_PASSPHRASE")
    if env:
        return env
    if not sys.stdin.isatty():
        raise BastionError("no export passphrase: set BASTION_EXPORT_PASSPHRASE")
    first = getpass.getpass("Export passphrase: ")
    if confirm and getpass.getpass("Repeat: ") != first:
        raise BastionError("the passphrases do not match")
    return first


async def cmd_export(args: argparse.Namespace) -> int:
    def show() -> int:
        print(f"account exported to {args.file}; keep it as safe as the passphrase")
        return 0

    async def via_gateway(link: GatewayLink) -> int:
        # Asked here, as without the gateway; it travels only over the owner's socket.
        secret = export_passphrase(confirm=True)
        await link.call("account.export", file=absolute(args.file), passphrase=secret)
        return show()

    async def work(client: Client) -> int:
        devices.export_account(client, Path(args.file), export_passphrase(confirm=True))
        return show()

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work, connect=False)
    )


async def cmd_import(args: argparse.Namespace) -> int:
    client = await devices.import_account(
        Path(args.file),
        export_passphrase(confirm=False),
        profile_dir(args),
        passphrase(confirm=True),
    )
    try:
        print(f"imported {client.account.username} as new device {client.account.device_id}")
    finally:
        await client.close()
    return 0


def add_commands(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Register the identity commands on the main parser."""
    verify = sub.add_parser("verify", parents=[common], help="show the safety number with a user")
    verify.add_argument("user")
    verify.add_argument("--qr", metavar="FILE", help="write the QR code as a PNG file")
    how = verify.add_mutually_exclusive_group()
    how.add_argument(
        "--confirm",
        metavar="NUMBER",
        help="mark verified if NUMBER (the 60 digits they read out, spaces allowed) matches",
    )
    how.add_argument(
        "--qr-image",
        metavar="FILE",
        help="mark verified if FILE (a photo or screenshot of their QR code) matches",
    )
    how.add_argument(
        "--sas", action="store_true", help="compare emoji interactively with the other device"
    )
    verify.set_defaults(run=cmd_verify)

    trust_cmd = sub.add_parser("trust", parents=[common], help="decide about a changed key")
    trust_cmd.add_argument("user")
    trust_cmd.add_argument(
        "--accept-new-key",
        nargs="+",
        metavar="NUMBER_OR_FINGERPRINT",
        help="pin the new key whose safety number or fingerprint 'bastion verify USER' showed",
    )
    trust_cmd.set_defaults(run=cmd_trust)

    devices_cmd = sub.add_parser("devices", help="this account's devices")
    devices_sub = devices_cmd.add_subparsers(dest="devices_command", required=True)
    listing = devices_sub.add_parser("list", parents=[common], help="list devices")
    listing.set_defaults(run=cmd_devices_list)
    link = devices_sub.add_parser("link", parents=[common], help="link a new device")
    link.add_argument(
        "--history",
        metavar="all|DAYS|none",
        help="send this device's 1:1 history (all, or the last DAYS days) and verified "
        "contacts to the new device, sealed under the code; asked in a terminal, "
        "none otherwise",
    )
    link.set_defaults(run=cmd_devices_link)
    revoke = devices_sub.add_parser("revoke", parents=[common], help="revoke a device")
    revoke.add_argument("device")
    revoke.set_defaults(run=cmd_devices_revoke)

    join = sub.add_parser("link", parents=[common], help="join an account with a link code")
    join.add_argument("code")
    join.add_argument("--server", required=True)
    join.add_argument(
        "--fingerprint",
        help="not needed: the other device tells this one which certificate to pin",
    )
    join.set_defaults(run=cmd_link)

    info = sub.add_parser(
        "server-info", parents=[common], help="the server's pins and its signed policy"
    )
    info.set_defaults(run=cmd_server_info)

    account = sub.add_parser("account", help="export or import the account")
    account_sub = account.add_subparsers(dest="account_command", required=True)
    exp = account_sub.add_parser("export", parents=[common], help="write an encrypted export")
    exp.add_argument("file")
    exp.set_defaults(run=cmd_export)
    imp = account_sub.add_parser("import", parents=[common], help="restore on this machine")
    imp.add_argument("file")
    imp.set_defaults(run=cmd_import)
