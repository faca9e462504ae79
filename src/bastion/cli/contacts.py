"""The ``bastion contacts`` and ``bastion presence`` commands (a thin front end)."""

from __future__ import annotations

import argparse
import json

from bastion.cli._common import Subcommands, pick_up_waiting, with_client
from bastion.client import Client, Event, contacts, presence
from bastion.display import escape_text


def _print_state(args: argparse.Namespace, state: str) -> None:
    shown = contacts.shown_state(state)
    if args.json:
        print(json.dumps({"type": "contact", "user": args.user, "state": shown}))
    elif shown == "none":
        print(f"{escape_text(args.user)} is not in your contacts")
    else:
        print(f"{escape_text(args.user)}: {shown}")


async def cmd_contacts_add(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        state = await contacts.request(client, args.user, args.note or "")
        _print_state(args, state)
        return 0

    return await with_client(args, work)


async def cmd_contacts_action(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        _print_state(args, await contacts.act(client, args.user, args.action))
        return 0

    return await with_client(args, work)


async def cmd_contacts_list(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        def request_or_answer(event: Event) -> bool:
            return isinstance(event, (contacts.ContactRequestEvent, contacts.ContactChangedEvent))

        online = await pick_up_waiting(client, args, shown_by_list=request_or_answer)
        listing = await contacts.sync(client) if online else contacts.local_contacts(client)
        for contact in listing:
            if args.json:
                print(json.dumps(contact.to_json()))
            else:
                status = f" ({contact.status})" if contact.status else ""
                shown = contact.presence if contact.state == "accepted" else ""
                note = f' "{contact.note}"' if contact.note else ""
                line = f"{contact.user}  {contact.state}  {shown}{status}{note}".rstrip()
                print(escape_text(line))
        return 0

    return await with_client(args, work, connect=False)


async def cmd_presence_set(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        missed = await presence.set_presence(client, args.state, args.status)
        if args.json:
            print(json.dumps({"type": "presence_set", "state": args.state, "status": args.status}))
        else:
            status = f" ({escape_text(args.status)})" if args.status else ""
            print(f"you are {args.state}{status}")
        for user in missed:
            print(f"warning: {escape_text(user)} could not be told", flush=True)
        return 0

    return await with_client(args, work)


async def cmd_presence_show(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        mine = presence.own(client)
        events = await presence.watch(client)
        if args.json:
            print(json.dumps({"type": "presence_self", "state": mine.state, "status": mine.status}))
            for event in events:
                print(json.dumps(event.to_json()))
        else:
            status = f" ({escape_text(mine.status)})" if mine.status else ""
            print(f"you are {mine.state}{status}")
            for event in events:
                print(escape_text(event.describe()))
        return 0

    return await with_client(args, work)


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
