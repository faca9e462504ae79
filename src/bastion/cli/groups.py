"""Commands about group chats: create, add, remove, leave, admin, rename, list, info, send,
and the invitations: invites, accept, decline."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bastion.cli._common import Subcommands, iso, with_client
from bastion.client import Client, HistoryRecord, group_invites, groups
from bastion.display import escape_text
from bastion.errors import BastionError


def group_json(state: groups.GroupState) -> dict[str, Any]:
    """A group's ``--json`` form (``bastion group create|add|...|list``, and the gateway's)."""
    return {
        "type": "group",
        "group": state.group_id.hex(),
        "conversation": groups.conversation(state.group_id),
        "name": state.name,
        "members": sorted(state.members),
        "admins": sorted(state.admins),
        "version": state.seq,
    }


def _print_notices(client: Client, as_json: bool) -> None:
    kept = []
    for event in client.notices:
        if isinstance(event, groups.GroupWarningEvent | groups.GroupChangeEvent):
            print(json.dumps(event.to_json()) if as_json else escape_text(event.describe()))
        else:
            kept.append(event)  # device changes are printed by the command's wrapper
    client.notices[:] = kept


async def cmd_create(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        members = [m for m in (args.members or "").split(",") if m]
        state = await groups.create(client, args.name, members)
        print(json.dumps(group_json(state)) if args.json else state.group_id.hex())
        return 0

    return await with_client(args, work)


async def cmd_change(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        group = groups.resolve(client, args.group)
        if args.action == "add":
            state = await groups.add_member(client, group, args.user)
        else:
            state = await groups.change(client, group, _args(args))
        _print_notices(client, args.json)
        if args.json:
            print(json.dumps(group_json(state)))
        return 0

    return await with_client(args, work)


def _args(args: argparse.Namespace) -> groups.MemberChange:
    if args.action == "remove":
        return groups.RemoveMember(user=args.user)
    if args.action == "leave":
        return groups.Leave()
    if args.action == "rename":
        return groups.Rename(name=args.name)
    if args.grant == args.revoke:
        raise BastionError("say what to do: --grant or --revoke")
    return groups.Promote(user=args.user) if args.grant else groups.Demote(user=args.user)


async def cmd_list(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        for state in groups.groups(client):
            if args.json:
                print(json.dumps(group_json(state)))
            else:
                count = len(state.members)
                print(f"{state.group_id.hex()[:16]}  {escape_text(state.name)}  ({count} members)")
        return 0

    return await with_client(args, work, connect=False)


async def cmd_info(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        group = groups.resolve(client, args.group)
        for event in await groups.sync(client, group.group_id):
            client.notices.append(event)
        _print_notices(client, args.json)
        state = groups.state_of(client, group.group_id) or group
        info = group_info_json(client, state)
        devices: dict[str, list[str]] = info["devices"]
        if args.json:
            print(json.dumps(info))
        else:
            print(f"{escape_text(state.name)} ({state.group_id.hex()})")
            for user in sorted(state.members):
                role = "admin" if user in state.admins else "member"
                known = ", ".join(devices[user]) or "no known devices"
                print(escape_text(f"  {user} ({role}): {known}"))
        return 0

    return await with_client(args, work)


def group_info_json(client: Client, state: groups.GroupState) -> dict[str, Any]:
    """``bastion group info --json``: the group with each member's known devices."""
    devices = {}
    for user in sorted(state.members):
        contact = client.contact(user)
        devices[user] = [d.device_id for d in contact.devices] if contact else []
    return {**group_json(state), "devices": devices}


def declined_json(invite: group_invites.GroupInviteEvent) -> dict[str, Any]:
    """``bastion group decline --json``: the invitation that was declined."""
    return {**invite.to_json(), "type": "group_declined"}


def group_sent_json(record: HistoryRecord) -> dict[str, Any]:
    """``bastion send --group ... --json``: the message stored on the server for the group."""
    return {
        "type": "sent",
        "id": record.id.hex(),
        "conversation": record.conversation,
        "server_ts": iso(record.server_ts),
    }


async def cmd_invites(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        for invite in await group_invites.pending(client):
            print(json.dumps(invite.to_json()) if args.json else escape_text(invite.describe()))
        return 0

    return await with_client(args, work)


async def cmd_accept(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        state = await group_invites.accept(client, args.group)
        _print_notices(client, args.json)
        print(json.dumps(group_json(state)) if args.json else f"joined {escape_text(state.name)}")
        return 0

    return await with_client(args, work)


async def cmd_decline(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        invite = await group_invites.decline(client, args.group)
        if args.json:
            print(json.dumps(declined_json(invite)))
        else:
            print(f"declined {escape_text(invite.name)}")
        return 0

    return await with_client(args, work)


async def send_to_group(args: argparse.Namespace) -> int:
    """``bastion send --group GROUP TEXT``."""
    text = args.text if args.text is not None else args.user
    if text is None:
        raise BastionError("nothing to send")

    async def work(client: Client) -> int:
        group = groups.resolve(client, args.group)
        record = await groups.send_text(client, group, text)
        _print_notices(client, args.json)
        if args.json:
            print(json.dumps(group_sent_json(record)))
        return 0

    return await with_client(args, work)


def add_commands(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Add ``bastion group ...`` to the command line."""
    group = sub.add_parser("group", help="group chats")
    actions = group.add_subparsers(dest="group_command", required=True)
    create = actions.add_parser("create", parents=[common], help="create a group")
    create.add_argument("name")
    create.add_argument("--members", help="comma-separated usernames")
    create.set_defaults(run=cmd_create)
    for action, helptext, extra in (
        ("add", "add a member", ["user"]),
        ("remove", "remove a member", ["user"]),
        ("leave", "leave the group", []),
        ("admin", "grant or revoke admin", ["user"]),
        ("rename", "rename the group", ["name"]),
    ):
        parser = actions.add_parser(action, parents=[common], help=helptext)
        parser.add_argument("group", help="group id or unambiguous name")
        for name in extra:
            parser.add_argument(name)
        if action == "admin":
            parser.add_argument("--grant", action="store_true")
            parser.add_argument("--revoke", action="store_true")
        parser.set_defaults(run=cmd_change, action=action)
    listing = actions.add_parser("list", parents=[common], help="list your groups")
    listing.set_defaults(run=cmd_list)
    info = actions.add_parser("info", parents=[common], help="members, admins and devices")
    info.add_argument("group")
    info.set_defaults(run=cmd_info)
    invites = actions.add_parser(
        "invites", parents=[common], help="invitations to groups waiting for your answer"
    )
    invites.set_defaults(run=cmd_invites)
    for action, helptext, run in (
        ("accept", "join a group you were invited to", cmd_accept),
        ("decline", "decline an invitation (the inviter is not told)", cmd_decline),
    ):
        parser = actions.add_parser(action, parents=[common], help=helptext)
        parser.add_argument("group", help="group id (or 8+ digit prefix) or name of the invitation")
        parser.set_defaults(run=run)
