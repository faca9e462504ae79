"""Commands about identity: verification, trust, devices, linking, export and import."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

import msgspec

from bastion.cli._common import Subcommands, passphrase, profile_dir, with_client, with_profile
from bastion.cli._gateway import gateway_holds
from bastion.client import Client, comparison, devices, policy, trust, verification
from bastion.display import escape_text
from bastion.errors import BastionError


async def cmd_verify_sas(args: argparse.Namespace) -> int:
    if not sys.stdin.isatty():
        raise BastionError("interactive verification needs a terminal to confirm the codes")

    async def work(client: Client) -> int:
        async def pump() -> None:
            async for _ in client.receive():
                pass  # verification steps are handled as they arrive

        async def compare(codes: verification.SasCodes) -> bool:
            print(f"Compare with what {args.user} sees:\n{codes}", flush=True)
            answer = await asyncio.to_thread(input, "Do they match exactly? [y/N] ")
            return answer.strip().lower() in ("y", "yes")

        print(f"Waiting for {args.user} (they run: bastion verify {client.account.username} --sas)")
        pumping = asyncio.create_task(pump())
        try:
            await verification.verify_interactively(client, args.user, compare)
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumping
        print(f"{args.user} is verified.")
        return 0

    if gateway_holds(args):
        # Verifying needs this device's deliveries; taking them over would cut the gateway off.
        raise BastionError(
            "a gateway runs for this profile and receives its messages: stop it to verify "
            f"interactively, or compare safety numbers (bastion verify {args.user})"
        )
    return await with_client(args, work, receive=True)


async def cmd_verify(args: argparse.Namespace) -> int:
    if args.sas:
        return await cmd_verify_sas(args)

    async def work(client: Client) -> int:
        waiting = client.contact(args.user)
        if waiting is not None and waiting.trust == "changed":
            if args.confirm is not None or args.qr_image is not None:
                raise BastionError(
                    f"{args.user}'s key changed: nothing was marked verified. Compare the new "
                    f"number (bastion verify {args.user}) and accept it first (bastion trust "
                    f"{args.user} --accept-new-key ...)"
                )
            return show_new_key(client, args)
        number = await trust.safety_number_with(client, args.user)
        if args.confirm is not None:
            comparison.confirm_number(client, args.user, args.confirm)
        elif args.qr_image is not None:
            comparison.confirm_qr_image(client, args.user, Path(args.qr_image))
        contact = client.contact(args.user)
        state = contact.trust if contact is not None else "unverified"
        if args.qr:
            await asyncio.to_thread(
                Path(args.qr).write_bytes, comparison.qr_png(number.qr_payload())
            )
        if args.json:
            print(json.dumps(safety_number_json(args.user, number, state)))
            return 0
        if args.confirm is not None or args.qr_image is not None:
            how = "safety number" if args.confirm is not None else "QR code"
            print(f"The {how} matches: {args.user} is verified.")
            return 0
        print(f"Safety number with {args.user} (compare it with theirs, in person or by call):")
        print(str(number))
        if not args.qr:
            print(comparison.render_qr_text(number.qr_payload()))
        print(f"{args.user} is {state}.")
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

    return await with_client(args, work)


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


def show_new_key(client: Client, args: argparse.Namespace) -> int:
    """While a key change waits: the safety number with the new key, and how to accept it."""
    user = args.user
    number, fingerprint = new_key(client, user)
    if args.json:
        print(json.dumps(safety_number_json(user, number, "changed", fingerprint)))
        return 0
    print(f"{user}'s account key has CHANGED. Their messages wait until you decide.")
    print(f"Safety number with {user}'s NEW key (compare it with theirs, in person or by call):")
    print(str(number))
    print(f"New key fingerprint: {fingerprint}")
    if args.qr:
        Path(args.qr).write_bytes(comparison.qr_png(number.qr_payload()))
    else:
        print(comparison.render_qr_text(number.qr_payload()))
    print(
        f"If it matches what {user} sees, accept exactly this key:\n"
        f"  bastion trust {user} --accept-new-key {fingerprint}"
    )
    return 0


async def cmd_trust(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        if not args.accept_new_key:
            raise BastionError(
                "say what to do: --accept-new-key NUMBER_OR_FINGERPRINT "
                f"(bastion verify {args.user} shows them)"
            )
        contact = trust.accept_new_key(client, args.user, " ".join(args.accept_new_key))
        print(
            with_profile(
                f"accepted {args.user}'s new account key; they are {contact.trust} until you "
                f"compare safety numbers again (bastion verify {args.user})"
            )
        )
        return 0

    return await with_client(args, work, connect=False)


def device_json(device_id: str, created_at: int, *, this_device: bool) -> dict[str, Any]:
    """``bastion devices list --json``: one certified device of this account."""
    return {
        "type": "device",
        "device": device_id,
        "created_at": created_at,
        "this_device": this_device,
    }


async def cmd_devices_list(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        listed = await devices.list_devices(client)
        for d in listed:
            mine = d.device_id == client.account.device_id
            if args.json:
                print(json.dumps(device_json(d.device_id, d.created_at, this_device=mine)))
            else:
                print(f"{escape_text(d.device_id)}{'  (this device)' if mine else ''}")
        return 0

    return await with_client(args, work)


async def cmd_devices_link(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        def show(code: str) -> None:
            if args.json:
                print(json.dumps({"type": "link_code", "code": code}), flush=True)
            else:
                # The new device learns the certificate to pin from the sealed answer.
                command = f"bastion link {code} --server {client.account.server_url}"
                print("On the new machine, run (or scan the code below):", flush=True)
                print(f"  {command}", flush=True)
                print(comparison.render_qr_text(command.encode()), flush=True)
                print("The code works once, for 10 minutes. Waiting...", flush=True)

        linked = await devices.offer_link(client, show)
        if args.json:
            print(json.dumps({"type": "linked", "device": linked.device_id}))
        else:
            print(f"linked device {escape_text(linked.device_id)}")
        return 0

    return await with_client(args, work, receive=False)


async def cmd_devices_revoke(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        await devices.revoke_device(client, args.device)
        print(f"revoked {args.device}")
        return 0

    return await with_client(args, work)


async def cmd_link(args: argparse.Namespace) -> int:
    client = await devices.join_with_code(
        profile_dir(args),
        passphrase(confirm=True),
        code=args.code,
        server_url=args.server,
        fingerprint=args.fingerprint,
    )
    try:
        print(f"linked as {client.account.username} (device {client.account.device_id})")
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
    async def work(client: Client) -> int:
        info = server_info_json(client)
        document = info["policy"]
        account = client.account
        if args.json:
            print(json.dumps(info))
            return 0
        print(escape_text(f"server {account.server_url} ({account.server_name})"))
        print(f"certificate {account.fingerprint}")
        print(f"policy key {info['policy_key']} (pinned; checked on every connection)")
        print(
            f"policy version {document['version']}: registration {document['registration']}, "
            f"file transfer {'on' if document['file_transfer'] else 'off'}, "
            f"files up to {document['max_file_mb']} MB"
        )
        return 0

    return await with_client(args, work)


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
    async def work(client: Client) -> int:
        devices.export_account(client, Path(args.file), export_passphrase(confirm=True))
        print(f"account exported to {args.file}; keep it as safe as the passphrase")
        return 0

    return await with_client(args, work, connect=False)


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
