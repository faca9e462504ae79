"""The ``bastion contacts`` and ``bastion presence`` commands (a thin front end)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bastion.cli._common import Subcommands, pick_up_waiting, with_client
from bastion.cli._gateway import print_event_json, with_gateway_or_client
from bastion.client import Client, Event, check_username, contacts, presence
from bastion.display import escape_text
from bastion.gateway.link import GatewayLink


def print_contact(args: argparse.Namespace, contact: dict[str, Any]) -> None:
    """A contact's new state (``{"type": "contact", "user", "state"}``)."""
    if args.json:
        print(json.dumps(contact))
    elif contact["state"] == "none":
        print(f"{escape_text(contact['user'])} is not in your contacts")
    else:
        print(f"{escape_text(contact['user'])}: {contact['state']}")


def contact_json(user: str, state: str) -> dict[str, Any]:
    """A contact's new state as ``contacts add|accept|... --json`` prints it."""
    return {"type": "contact", "user": user, "state": contacts.shown_state(state)}


def contact_line(contact: dict[str, Any]) -> str:
    """One line of ``contacts list`` for a person."""
    status = f" ({contact['status']})" if contact.get("status") else ""
    shown = contact["presence"] if contact["state"] == "accepted" else ""
    note = f' "{contact["note"]}"' if contact.get("note") else ""
    return escape_text(f"{contact['user']}  {contact['state']}  {shown}{status}{note}".rstrip())


async def cmd_contacts_add(args: argparse.Namespace) -> int:
    async def via_gateway(link: GatewayLink) -> int:
        check_username(args.user)
        params = {"user": args.user, **({"note": args.note} if args.note else {})}
        print_contact(args, await link.call("contacts.add", **params))
        return 0

    async def work(client: Client) -> int:
        state = await contacts.request(client, args.user, args.note or "")
        print_contact(args, contact_json(args.user, state))
        return 0

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work)
    )


async def cmd_contacts_action(args: argparse.Namespace) -> int:
    async def via_gateway(link: GatewayLink) -> int:
        check_username(args.user)
        print_contact(args, await link.call(f"contacts.{args.action}", user=args.user))
        return 0

    async def work(client: Client) -> int:
        state = await contacts.act(client, args.user, args.action)
        print_contact(args, contact_json(args.user, state))
        return 0

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work)
    )


async def cmd_contacts_list(args: argparse.Namespace) -> int:
    def print_list(listing: list[dict[str, Any]]) -> None:
        for contact in listing:
            print(json.dumps(contact) if args.json else contact_line(contact))

    async def via_gateway(link: GatewayLink) -> int:
        # The gateway received the requests and answers already: nothing waits on the server.
        print_list(await link.call("contacts.list"))
        return 0

    async def work(client: Client) -> int:
        def request_or_answer(event: Event) -> bool:
            return isinstance(event, (contacts.ContactRequestEvent, contacts.ContactChangedEvent))

        online = await pick_up_waiting(client, args, shown_by_list=request_or_answer)
        listing = await contacts.sync(client) if online else contacts.local_contacts(client)
        print_list([contact.to_json() for contact in listing])
        return 0

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work, connect=False)
    )


def print_presence_set(args: argparse.Namespace, answer: dict[str, Any]) -> None:
    """``presence set``'s answer, then a warning for each contact who could not be told."""
    if args.json:
        print(json.dumps(answer))
    else:
        status = f" ({escape_text(answer['status'])})" if answer.get("status") else ""
        print(f"you are {answer['state']}{status}")
    for user in answer.get("not_told", []):
        print(f"warning: {escape_text(user)} could not be told", flush=True)


async def cmd_presence_set(args: argparse.Namespace) -> int:
    async def via_gateway(link: GatewayLink) -> int:
        params = {"state": args.state, **({"status": args.status} if args.status else {})}
        answer = await link.call("presence.set", **params)
        print_presence_set(args, answer)
        return 0

    async def work(client: Client) -> int:
        missed = await presence.set_presence(client, args.state, args.status)
        print_presence_set(
            args,
            {
                "type": "presence_set",
                "state": args.state,
                "status": args.status,
                "not_told": missed,
            },
        )
        return 0

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work)
    )


def print_presence(args: argparse.Namespace, lines: list[dict[str, Any]]) -> None:
    """``presence``: your own first (``presence_self``), then each contact's."""
    for line in lines:
        if args.json:
            print(json.dumps(line))
        elif line.get("type") == "presence_self":
            status = f" ({escape_text(line['status'])})" if line.get("status") else ""
            print(f"you are {line['state']}{status}")
        else:
            print_event_json(line, args.json)


async def cmd_presence_show(args: argparse.Namespace) -> int:
    async def via_gateway(link: GatewayLink) -> int:
        print_presence(args, await link.call("presence.show"))
        return 0

    async def work(client: Client) -> int:
        mine = presence.own(client)
        events = await presence.watch(client)
        own = {"type": "presence_self", "state": mine.state, "status": mine.status}
        print_presence(args, [own, *(event.to_json() for event in events)])
        return 0

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work)
    )


def add_commands(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Register the contacts and presence commands on the main parser."""
    contacts_cmd = sub.add_parser("contacts", help="your contacts: requests, blocking, the list")
    contacts_sub = contacts_cmd.add_subparsers(dest="contacts_command", required=True)
    add = contacts_sub.add_parser("add", parents=[common], help="ask a user to be your contact")
    add.add_argument("user")
    add.add_argument("--note", help=f"a note for them (at most {contacts.MAX_NOTE_CHARS} chars)")
    add.set_defaults(run=cmd_contacts_add)
    helps = {
        "accept": "accept a contact request",
        "decline": "decline a contact request (they are not told)",
        "remove": "remove a contact, or withdraw your request",
        "block": "block a user (they are not told)",
        "unblock": "unblock a user",
    }
    for action, text in helps.items():
        parser = contacts_sub.add_parser(action, parents=[common], help=text)
        parser.add_argument("user")
        parser.set_defaults(run=cmd_contacts_action, action=action)
    listing = contacts_sub.add_parser("list", parents=[common], help="list contacts and presence")
    listing.set_defaults(run=cmd_contacts_list)

    presence_cmd = sub.add_parser("presence", parents=[common], help="show or set presence")
    presence_cmd.set_defaults(run=cmd_presence_show)
    presence_sub = presence_cmd.add_subparsers(dest="presence_command")
    set_cmd = presence_sub.add_parser("set", parents=[common], help="set your presence")
    set_cmd.add_argument("state", choices=presence.STATES)
    set_cmd.add_argument("--status", help=f"a status line (at most {presence.MAX_STATUS_CHARS})")
    set_cmd.set_defaults(run=cmd_presence_set)
