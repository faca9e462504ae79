"""Commands about group chats: create, add, remove, leave, admin, rename, list, info, send,
and the invitations: invites, accept, decline.

With a gateway running for the profile each goes through its ``groups.*`` method,
whose answers are built by the functions here, so the output is the same. What
a change teaches about the group's chain (a change by someone else, a forged one
refused) is then the gateway's to show: ``bastion listen`` prints it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bastion.cli._common import Subcommands, iso, with_client
from bastion.cli._gateway import event_of, with_gateway_or_client
from bastion.client import Client, HistoryRecord, check_text, group_invites, groups
from bastion.display import escape_text
from bastion.errors import BastionError
from bastion.gateway.link import GatewayLink


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
    members = [m for m in (args.members or "").split(",") if m]

    def show(group: dict[str, Any]) -> int:
        print(json.dumps(group) if args.json else group["group"])
        return 0

    async def via_gateway(link: GatewayLink) -> int:
        return show(await link.call("groups.create", name=args.name, members=members))

    async def work(client: Client) -> int:
        return show(group_json(await groups.create(client, args.name, members)))

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work)
    )


async def cmd_change(args: argparse.Namespace) -> int:
    change = _args(args) if args.action != "add" else None  # a mistake reads the same either way

    async def via_gateway(link: GatewayLink) -> int:
        params: dict[str, Any] = {"group": args.group}
        if args.action == "rename":
            params["name"] = args.name
        elif args.action != "leave":
            params["user"] = args.user
        state = await link.call(f"groups.{_method(args, change)}", **params)
        if args.json:
            print(json.dumps(state))
        return 0

    async def work(client: Client) -> int:
        group = groups.resolve(client, args.group)
        if change is None:
            state = await groups.add_member(client, group, args.user)
        else:
            state = await groups.change(client, group, change)
        _print_notices(client, args.json)
        if args.json:
            print(json.dumps(group_json(state)))
        return 0

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work)
    )


def _method(args: argparse.Namespace, change: groups.MemberChange | None) -> str:
    """The gateway's name for a change (``groups.add``, ``groups.promote``, ...)."""
    if isinstance(change, groups.Promote):
        return "promote"
    if isinstance(change, groups.Demote):
        return "demote"
    return str(args.action)


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
    def show(listing: list[dict[str, Any]]) -> int:
        for group in listing:
            if args.json:
                print(json.dumps(group))
            else:
                count = len(group["members"])
                print(f"{group['group'][:16]}  {escape_text(group['name'])}  ({count} members)")
        return 0

    async def via_gateway(link: GatewayLink) -> int:
        return show(await link.call("groups.list"))

    async def work(client: Client) -> int:
        return show([group_json(state) for state in groups.groups(client)])

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work, connect=False)
    )


async def cmd_info(args: argparse.Namespace) -> int:
    def show(info: dict[str, Any]) -> int:
        devices: dict[str, list[str]] = info["devices"]
        if args.json:
            print(json.dumps(info))
        else:
            print(f"{escape_text(info['name'])} ({info['group']})")
            for user in info["members"]:
                role = "admin" if user in info["admins"] else "member"
                known = ", ".join(devices[user]) or "no known devices"
                print(escape_text(f"  {user} ({role}): {known}"))
        return 0

    async def via_gateway(link: GatewayLink) -> int:
        return show(await link.call("groups.show", group=args.group))

    async def work(client: Client) -> int:
        group = groups.resolve(client, args.group)
        for event in await groups.sync(client, group.group_id):
            client.notices.append(event)
        _print_notices(client, args.json)
        state = groups.state_of(client, group.group_id) or group
        return show(group_info_json(client, state))

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work)
    )


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
    def show(invites: list[dict[str, Any]]) -> int:
        for invite in invites:
            if args.json:
                print(json.dumps(invite))
                continue
            event = event_of(invite)
            if isinstance(event, group_invites.GroupInviteEvent):
                print(escape_text(event.describe()))
            else:  # a form this version cannot put in words: shown as it came, not dropped
                print(json.dumps(invite))
        return 0

    async def via_gateway(link: GatewayLink) -> int:
        return show(await link.call("groups.invites"))

    async def work(client: Client) -> int:
        return show([invite.to_json() for invite in await group_invites.pending(client)])

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work)
    )


async def cmd_accept(args: argparse.Namespace) -> int:
    def show(group: dict[str, Any]) -> int:
        print(json.dumps(group) if args.json else f"joined {escape_text(group['name'])}")
        return 0

    async def via_gateway(link: GatewayLink) -> int:
        return show(await link.call("groups.accept", group=args.group))

    async def work(client: Client) -> int:
        state = await group_invites.accept(client, args.group)
        _print_notices(client, args.json)
        return show(group_json(state))

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work)
    )


async def cmd_decline(args: argparse.Namespace) -> int:
    def show(declined: dict[str, Any]) -> int:
        print(json.dumps(declined) if args.json else f"declined {escape_text(declined['name'])}")
        return 0

    async def via_gateway(link: GatewayLink) -> int:
        return show(await link.call("groups.decline", group=args.group))

    async def work(client: Client) -> int:
        return show(declined_json(await group_invites.decline(client, args.group)))

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work)
    )


async def send_to_group(args: argparse.Namespace) -> int:
    """``bastion send --group GROUP TEXT``."""
    text = args.text if args.text is not None else args.user
    if text is None:
        raise BastionError("nothing to send")

    async def via_gateway(link: GatewayLink) -> int:
        check_text(text)  # checked here as the direct path does, so a mistake reads the same
        sent = await link.call("groups.send", group=args.group, text=text)
        if args.json:
            print(json.dumps(sent))
        return 0

    async def work(client: Client) -> int:
        group = groups.resolve(client, args.group)
        record = await groups.send_text(client, group, text)
        _print_notices(client, args.json)
        if args.json:
            print(json.dumps(group_sent_json(record)))
        return 0

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work)
    )


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
