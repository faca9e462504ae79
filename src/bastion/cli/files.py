"""``bastion file send|list|get``: sending files, and fetching offered ones through quarantine.

Received files are never downloaded, opened or run on their own: ``file get``
downloads one, checks it, scans it in quarantine and saves it only if clean.

With a gateway running for the profile, ``send``, ``list`` and ``get`` go through
its ``files.*`` methods (paths made absolute here, as the gateway needs). Saving a
blocked file anyway (``get --allow-blocked``) always runs here, at the terminal
of the person who types ``yes``: the gateway lets no front end skip that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bastion.cli._common import Subcommands, iso, pick_up_waiting, with_client
from bastion.cli._gateway import absolute, with_gateway_or_client
from bastion.client import Client, Event, files, groups
from bastion.display import escape_text
from bastion.errors import BastionError
from bastion.gateway.link import GatewayLink


@contextlib.contextmanager
def _progress_bar(name: str, enabled: bool) -> Iterator[files.Progress | None]:
    """A rich progress bar on a terminal; nothing otherwise."""
    if not enabled:
        yield None
        return
    from rich.progress import (  # noqa: PLC0415 - only terminals need it
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(f"sending {name}", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


async def cmd_file_send(args: argparse.Namespace) -> int:
    # `file send USER PATH`, or `file send --group GROUP PATH` (then the one
    # positional argument is the path).
    if args.group is not None:
        if args.path is not None:
            raise BastionError("give either a user or --group, not both")
        args.path, args.user = args.user, None
    elif args.path is None:
        raise BastionError("say who gets the file: bastion file send USER PATH")
    path = Path(args.path)

    def show(sent: dict[str, Any]) -> int:
        if args.json:
            print(json.dumps(sent))
        else:
            size = files.human_size(sent["size"])
            print(escape_text(f"sent {sent['name']} ({size}) to {sent['to']}"))
        return 0

    async def via_gateway(link: GatewayLink) -> int:
        params = {"group": args.group} if args.group is not None else {"to": args.user}
        return show(await link.call("files.send", path=absolute(path), **params))

    async def work(client: Client) -> int:
        show_bar = sys.stderr.isatty() and not args.json
        to: str | groups.GroupState = args.user
        if args.group is not None:
            to = groups.resolve(client, args.group)
            await groups.sync(client, to.group_id)
            to = groups.resolve(client, to.group_id.hex())
        with _progress_bar(path.name, show_bar) as progress:
            sent = await files.send_file(client, to, path, progress=progress)
        if args.group is not None:
            args.user = (
                groups.conversation(to.group_id) if isinstance(to, groups.GroupState) else to
            )
        return show(file_sent_json(sent, args.user))

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work)
    )


def file_sent_json(sent: files.SentFile, to: str) -> dict[str, Any]:
    """``bastion file send --json``: the offer sent to a user or a group's conversation."""
    return {
        "type": "file_sent",
        "id": sent.offer_id,
        "to": to,
        "name": sent.name,
        "size": sent.size,
    }


def file_json(record: files.FileRecord) -> dict[str, Any]:
    """A received file's ``--json`` form (``bastion file list|get``, and the gateway's)."""
    return {
        "type": "file",
        "id": record.id,
        "from": record.sender,
        "name": record.name,
        "size": record.plaintext_size,
        "content_type": record.content_type,
        "received_at": iso(record.received_at),
        "state": record.state,
        "verdict": record.verdict,
        "reasons": record.reasons,
        "saved_to": record.saved_to,
    }


async def cmd_file_list(args: argparse.Namespace) -> int:
    def show(listing: list[dict[str, Any]]) -> int:
        for record in listing:
            if args.json:
                print(json.dumps(record))
            else:
                verdict = f" ({record['verdict']})" if record["verdict"] else ""
                line = (
                    f"{record['id']}  {record['from']}  '{record['name']}'  "
                    f"{files.human_size(record['size'])}  {record['state']}{verdict}"
                )
                print(escape_text(line))
        return 0

    async def via_gateway(link: GatewayLink) -> int:
        # The gateway received the offers already: nothing waits on the server.
        return show(await link.call("files.list"))

    async def work(client: Client) -> int:
        def offer(event: Event) -> bool:
            return isinstance(event, files.FileEvent)

        await pick_up_waiting(client, args, shown_by_list=offer)
        return show([file_json(record) for record in files.list_files(client)])

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work, connect=False)
    )


def _confirm_override(name: str) -> bool:
    """Ask the user to type ``yes`` before a blocked file is saved."""
    print(
        f"'{escape_text(name)}' was blocked by the checks above. "
        "Saving it may let it run on this machine.\n"
        "Type 'yes' to save it anyway: ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    return sys.stdin.readline().strip().lower() == "yes"


async def cmd_file_get(args: argparse.Namespace) -> int:
    to_dir = Path(args.to) if args.to else Path.cwd()

    async def via_gateway(link: GatewayLink) -> int:
        record = await link.call("files.get", id=args.id, to=absolute(to_dir))
        if args.json:
            print(json.dumps(record))
        elif record["saved_to"] is not None:
            print(escape_text(f"clean: saved '{record['name']}' as {record['saved_to']}"))
        else:
            name = escape_text(record["name"])
            print(f"{record['verdict']}: '{name}' stays in quarantine, not saved")
            for reason in record["reasons"]:
                print(f"  {escape_text(reason)}")
        return 0 if record["saved_to"] is not None else 3

    async def work(client: Client) -> int:
        result = await files.get_file(client, args.id, to_dir)
        if not result.verdict.is_clean and args.allow_blocked:
            for reason in result.verdict.reasons:
                print(f"  {escape_text(reason)}", file=sys.stderr)
            if not _confirm_override(result.record.name):
                raise BastionError("not confirmed; the file stays in quarantine")
            result = await files.get_file(client, args.id, to_dir, allow_blocked=True)
        record = result.record
        if args.json:
            print(json.dumps(file_json(record)))
        elif result.saved_to is not None and record.state == "saved":
            print(escape_text(f"clean: saved '{record.name}' as {result.saved_to}"))
        elif result.saved_to is not None:
            saved = escape_text(str(result.saved_to))
            print(f"{result.verdict.kind}: saved anyway as {saved} (not executable)")
        else:
            name = escape_text(record.name)
            print(f"{result.verdict.kind}: '{name}' stays in quarantine, not saved")
            for reason in result.verdict.reasons:
                print(f"  {escape_text(reason)}")
        return 0 if result.saved_to is not None else 3

    # A blocked file is saved anyway only after this person typed "yes", so it is fetched
    # here; the gateway never saves one for a front end.
    via = None if args.allow_blocked else via_gateway
    return await with_gateway_or_client(
        args, via_gateway=via, direct=lambda: with_client(args, work)
    )


def add_commands(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Register ``bastion file ...`` on the main parser."""
    file_cmd = sub.add_parser("file", help="send files, and fetch files offered to you")
    file_sub = file_cmd.add_subparsers(dest="file_command", required=True)
    send = file_sub.add_parser("send", parents=[common], help="encrypt and send a file")
    send.add_argument("user", help="who gets it (or the path, with --group)")
    send.add_argument("path", nargs="?")
    send.add_argument("--group", metavar="GROUP", help="offer it to every member of a group")
    send.set_defaults(run=cmd_file_send)
    listing = file_sub.add_parser("list", parents=[common], help="files offered to you")
    listing.set_defaults(run=cmd_file_list)
    get = file_sub.add_parser(
        "get", parents=[common], help="download, check and scan a file; save it if clean"
    )
    get.add_argument("id", help="the offer id (or its unambiguous start)")
    get.add_argument("--to", help="folder to save into (default: the current folder)")
    get.add_argument(
        "--allow-blocked",
        action="store_true",
        help=(
            "save a blocked file anyway, after typing 'yes' (logged in the profile); this "
            "always unlocks the profile here, even with a gateway running, which never "
            "saves a blocked file for a front end"
        ),
    )
    get.set_defaults(run=cmd_file_get)
