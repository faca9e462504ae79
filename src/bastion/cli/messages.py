"""The account and its messages: register, send, inbox, listen, outbox, history, whoami."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from typing import Any

from bastion.cli import groups as cli_groups
from bastion.cli._common import (
    EXIT_ERROR,
    EXIT_KEPT,
    OFFLINE_CODES,
    REFUSED,
    Subcommands,
    found_json,
    message_json,
    passphrase,
    pick_up_waiting,
    print_event,
    profile_dir,
    refusal_json,
    render_found,
    render_message,
    sent_json,
    with_client,
    with_profile,
)
from bastion.cli._gateway import gateway_holds, print_event_json, say, with_gateway_or_client
from bastion.client import (
    Client,
    ConnectionStateEvent,
    Event,
    HistoryRecord,
    MessageEvent,
    SendRefusedError,
    check_text,
    check_username,
    groups,
    outbox,
    presence,
    receipts,
    search,
)
from bastion.display import escape_text
from bastion.errors import BastionError, ServerRefusedError
from bastion.gateway.link import GatewayError, GatewayLink

RECONNECT_S = 5.0  # how long ``send`` tries to reconnect when the connection drops mid-send


async def cmd_register(args: argparse.Namespace) -> int:
    client = await Client.register(
        profile_dir(args),
        passphrase(confirm=True, user=args.username),
        username=args.username,
        server_url=args.server,
        fingerprint=args.fingerprint,
        invite=args.invite,
    )
    try:
        account = client.account
        if args.json:
            print(
                json.dumps(
                    {
                        "type": "registered",
                        "user": account.username,
                        "device": account.device_id,
                        "server": account.server_url,
                        "fingerprint": account.fingerprint,
                    }
                )
            )
        else:
            print(f"registered {account.username} (device {account.device_id})")
            print(f"server certificate pinned: {account.fingerprint}")
    finally:
        await client.close()
    return 0


async def cmd_send(args: argparse.Namespace) -> int:
    if args.group is not None:
        return await cli_groups.send_to_group(args)
    if args.user is None or args.text is None:
        raise BastionError("usage: bastion send USER TEXT (or --group GROUP TEXT)")

    async def via_gateway(link: GatewayLink) -> int:
        # Checked here as the direct path does, so a mistake reads the same either way.
        check_username(args.user)
        check_text(args.text)
        try:
            answer = await link.call("send", to=args.user, text=args.text)
        except GatewayError as exc:
            if exc.code != "refused":
                raise
            return report_refused(args, exc.data)
        return report_sent(args, answer)

    async def work(client: Client) -> int:
        # A kept copy of this very message went out as we connected: do not send it twice.
        record = outbox.take_flushed(client, args.user, args.text)
        if record is None:
            try:
                record = await client.send_text(args.user, args.text)
            except SendRefusedError as exc:
                return report_refused(args, refusal_json(exc.record))
            except ServerRefusedError as exc:
                if exc.code not in OFFLINE_CODES:
                    raise
                record = await confirm_after_drop(client, args.user, args.text)
        if record.state == "failed":
            return report_refused(args, refusal_json(record))
        return report_sent(args, sent_json(record))

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work)
    )


def report_sent(args: argparse.Namespace, sent: dict[str, Any]) -> int:
    """Say where the message is: stored on the server, queued by the gateway, or kept."""
    if sent["type"] == "kept":
        return report_kept(args, sent)
    if args.json:
        print(json.dumps(sent))
    elif sent["type"] == "queued":
        print(
            f"queued for {escape_text(sent['to'])}: the server cannot be reached right now; "
            "it goes out when the server can be reached"
        )
    else:
        print(
            f"stored on the server for {escape_text(sent['to'])}; "
            "their devices receive it as they connect"
        )
    return 0


async def confirm_after_drop(client: Client, to: str, text: str) -> HistoryRecord:
    """Reconnect for a few seconds so the kept message goes out, and return its record.

    The connection dropped before the server answered; the message is in the
    outbox, and connecting sends it again under the same id (stored once).
    The record is still ``pending`` if no connection could be made in time.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECONNECT_S
    kept = [r for r in outbox.kept_messages(client) if r.peer == to and r.text == text]
    if not kept:
        raise ServerRefusedError("disconnected", "the connection to the server was lost")
    record = kept[-1]
    while loop.time() < deadline:
        await client.disconnect()
        try:
            await asyncio.wait_for(client.connect(receive=False), max(0.5, deadline - loop.time()))
        except (ServerRefusedError, TimeoutError) as exc:
            if isinstance(exc, ServerRefusedError) and exc.code not in OFFLINE_CODES:
                raise
            await asyncio.sleep(min(0.5, max(0.0, deadline - loop.time())))
            continue
        break
    return client.message(record.id) or record


def report_refused(args: argparse.Namespace, refusal: dict[str, Any]) -> int:
    """Say that the server refused the message, and why; it shows as not sent in history."""
    if args.json:
        print(json.dumps(refusal))
    reason = str(refusal.get("reason") or REFUSED)
    print(f"error: not sent: the server refused it: {escape_text(reason)}", file=sys.stderr)
    return EXIT_ERROR


def report_kept(args: argparse.Namespace, kept: dict[str, Any]) -> int:
    """Say that the message is kept for the next connection (exit status EXIT_KEPT)."""
    if args.json:
        print(json.dumps(kept))
    print(
        with_profile(
            "warning: the connection to the server was lost before it confirmed the message; "
            "it is kept and goes out on the next connection, so do not send it again "
            "(run 'bastion outbox' to see it)"
        ),
        file=sys.stderr,
    )
    return EXIT_KEPT


def print_messages(args: argparse.Namespace, messages: list[dict[str, Any]]) -> None:
    """Print messages in their ``--json`` form, or for a person."""
    for message in messages:
        print(json.dumps(message) if args.json else render_message(message))


async def cmd_outbox(args: argparse.Namespace) -> int:
    async def via_gateway(link: GatewayLink) -> int:
        print_messages(args, await link.call("outbox"))
        return 0

    async def work(client: Client) -> int:
        records = [*outbox.kept_messages(client), *outbox.queued_messages(client)]
        print_messages(args, [message_json(r, verified=False) for r in records])
        return 0

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work, connect=False)
    )


INBOX_VIA_GATEWAY = (
    "the gateway receives for this profile, so nothing waits here: new messages are in "
    "'bastion history USER', and 'bastion listen' prints them as they arrive"
)


async def cmd_inbox(args: argparse.Namespace) -> int:
    async def via_gateway(link: GatewayLink | None) -> int:
        say(with_profile(INBOX_VIA_GATEWAY))
        return 0

    async def work(client: Client) -> int:
        receipts.enable(client)
        async for event in client.receive(until_synced=True):
            print_event(event, args.json, server_url=client.account.server_url)
        return 0

    async def direct() -> int:
        if gateway_holds(args):  # starting, or not answering: it receives all the same
            return await via_gateway(None)
        return await with_client(args, work, receive=True)

    return await with_gateway_or_client(args, via_gateway=via_gateway, direct=direct)


async def cmd_listen(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def via_gateway(link: GatewayLink) -> int:
        return await listen_via_gateway(link, args, stop)

    async def work(client: Client) -> int:
        receipts.enable(client)

        async def pump() -> None:
            lost = False  # the connection was lost since listen started
            async for event in client.stay_connected():
                if not isinstance(event, ConnectionStateEvent):
                    print_event(event, args.json, server_url=client.account.server_url)
                    continue
                if event.state == "reconnecting" or lost:
                    report_connection(args, event)
                lost = event.state == "reconnecting" or lost
                if event.state == "connected":
                    await print_presence(client, args)

        pump_task = asyncio.create_task(pump())
        stop_task = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({pump_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        for task in (pump_task, stop_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if pump_task in done and not stop.is_set():
            exc = pump_task.exception() if not pump_task.cancelled() else None
            if exc is not None:
                raise exc  # one that reconnecting cannot heal (a certificate that changed...)
        return 0

    async def direct() -> int:
        if gateway_holds(args):
            # Receiving here would cut the gateway off, and it would cut this off in turn.
            raise BastionError(
                "a gateway runs for this profile but does not answer on its socket yet; "
                "try again in a moment, or stop the gateway to listen without it"
            )
        return await with_client(args, work, connect=False)

    return await with_gateway_or_client(args, via_gateway=via_gateway, direct=direct)


async def listen_via_gateway(
    link: GatewayLink, args: argparse.Namespace, stop: asyncio.Event
) -> int:
    """Print the gateway's events as ``listen`` prints its own, until stopped or the gateway ends.

    Like a fresh connection, it starts with who is online. Connection lines are
    the gateway's: with ``--json`` each one, otherwise a warning when it is lost
    and a line when it is back.
    """
    status = await link.call("status")
    server_url = str(status.get("server", ""))
    subscribed = await link.call("subscribe")
    if subscribed.get("connection") == "connected":
        for line in await link.call("presence.show"):
            if line.get("type") != "presence_self":
                print_event_json(line, args.json)

    async def pump() -> None:
        async for event in link.events():
            if event.get("type") == "connection":
                report_gateway_connection(args, event)
            else:
                print_event_json(event, args.json, server_url=server_url)

    pump_task = asyncio.create_task(pump())
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({pump_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    for task in (pump_task, stop_task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if stop.is_set():
        return 0
    raise BastionError("the gateway stopped; run 'bastion listen' again to listen without it")


def report_gateway_connection(args: argparse.Namespace, event: dict[str, Any]) -> None:
    """The gateway's ``connection`` event, as :func:`report_connection` shows this process's."""
    if args.json:
        print(json.dumps(event), flush=True)
    elif event.get("state") == "reconnecting":
        retry = float(event.get("retry_in_s", 0.0))
        reason = escape_text(str(event.get("reason", "")))
        say(f"warning: {reason}; reconnecting in {retry:.1f} s")
    elif event.get("state") == "connected":
        say("connected again")
    elif event.get("state") == "stopped":
        say(f"warning: the gateway stopped: {escape_text(str(event.get('reason', '')))}")


async def print_presence(client: Client, args: argparse.Namespace) -> None:
    """Ask for presence pushes on the new connection and print who is online now."""
    try:
        snapshots = await presence.watch(client)
    except ServerRefusedError as exc:
        if exc.code not in OFFLINE_CODES:
            raise
        return  # lost again at once: the kept connection says so and tries again
    for snapshot in snapshots:
        print_event(snapshot, args.json)


def report_connection(args: argparse.Namespace, event: ConnectionStateEvent) -> None:
    """Say that the connection was lost and when it is tried again, or that it is back.

    With ``--json`` as an event line like the others (``{"type": "connection", ...}``),
    otherwise as a warning on standard error.
    """
    if args.json:
        line: dict[str, object] = {"type": "connection", "state": event.state}
        if event.state == "reconnecting":
            line["reason"] = event.reason
            line["retry_in_s"] = round(event.retry_in_s, 3)
        print(json.dumps(line), flush=True)
    elif event.state == "reconnecting":
        print(
            f"warning: {escape_text(event.reason)}; reconnecting in {event.retry_in_s:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    else:
        print("connected again", file=sys.stderr, flush=True)


async def cmd_history(args: argparse.Namespace) -> int:
    if args.search is not None:
        return await search_history(args)
    if args.user is None:
        raise BastionError("usage: bastion history USER (or bastion history --search TEXT)")
    if args.limit is not None:
        raise BastionError("--limit goes with --search")

    async def via_gateway(link: GatewayLink) -> int:
        # The gateway received and stored everything already: nothing waits on the server.
        check_username(args.user)
        print_messages(args, await link.call("history", user=args.user))
        return 0

    async def work(client: Client) -> int:
        contact = client.contact(args.user)
        verified = contact is not None and contact.trust == "verified"

        def in_this_conversation(event: Event) -> bool:
            return isinstance(event, MessageEvent) and event.record.peer == args.user

        await pick_up_waiting(client, args, shown_by_list=in_this_conversation)
        print_messages(args, [message_json(r, verified) for r in client.history(args.user)])
        return 0

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work, connect=False)
    )


async def search_history(args: argparse.Namespace) -> int:
    """``history --search``: messages of every conversation holding a text, newest first."""
    if args.user is not None:
        raise BastionError("history --search looks in every conversation: leave out the user")
    text: str = args.search
    limit = search.DEFAULT_LIMIT if args.limit is None else args.limit
    search.check_query(text, limit)  # here too, so a mistake reads the same either way

    async def via_gateway(link: GatewayLink) -> int:
        found = await link.call("search", text=text, limit=limit)
        names = {str(g["conversation"]): str(g["name"]) for g in await link.call("groups.list")}
        return print_found(args, found, names)

    async def work(client: Client) -> int:
        def in_the_list(event: Event) -> bool:
            return isinstance(event, MessageEvent) and search.matches(event.record, text)

        await pick_up_waiting(client, args, shown_by_list=in_the_list)
        found = [found_json(client, r) for r in search.messages(client, text, limit=limit)]
        names = {groups.conversation(g.group_id): g.name for g in groups.groups(client)}
        return print_found(args, found, names)

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work, connect=False)
    )


def print_found(
    args: argparse.Namespace, found: list[dict[str, Any]], group_names: dict[str, str]
) -> int:
    """Print what a search found, newest first (one JSON object a line with ``--json``)."""
    for message in found:
        print(json.dumps(message) if args.json else render_found(message, group_names))
    if not found and not args.json:
        say("no message on this device holds that text")
    return 0


async def cmd_whoami(args: argparse.Namespace) -> int:
    async def via_gateway(link: GatewayLink) -> int:
        print_whoami(args, await link.call("whoami"))
        return 0

    async def work(client: Client) -> int:
        a = client.account
        info = {
            "type": "whoami",
            "user": a.username,
            "device": a.device_id,
            "server": a.server_url,
            "fingerprint": a.fingerprint,
            "rejected_messages": client.stats().rejected,
        }
        print_whoami(args, info)
        return 0

    return await with_gateway_or_client(
        args, via_gateway=via_gateway, direct=lambda: with_client(args, work, connect=False)
    )


def print_whoami(args: argparse.Namespace, info: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(info))
    else:
        print(f"{info['user']} on {info['server']} (device {info['device']})")
        print(f"server certificate: {info['fingerprint']}")


def add_commands(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Register the account and message commands on the main parser."""
    reg = sub.add_parser("register", parents=[common], help="create an account on a server")
    reg.add_argument("username")
    reg.add_argument("--server", required=True, help="wss://HOST:PORT")
    reg.add_argument("--fingerprint", help="the server certificate's SHA256:... fingerprint")
    reg.add_argument("--invite", help="an invite code, for servers that require one")
    reg.set_defaults(run=cmd_register)

    send = sub.add_parser("send", parents=[common], help="send a message")
    send.add_argument("user", nargs="?")
    send.add_argument("text", nargs="?")
    send.add_argument("--group", help="send TEXT to this group (id or name) instead")
    send.set_defaults(run=cmd_send)

    inbox = sub.add_parser(
        "inbox",
        parents=[common],
        help="receive what is waiting, then exit",
        description=(
            "Receive what waits on the server, print it, then exit. While a gateway runs for "
            "the profile it receives everything as it comes, so nothing waits: inbox says so "
            "and prints nothing; see history and listen."
        ),
    )
    inbox.set_defaults(run=cmd_inbox)
    listen = sub.add_parser(
        "listen",
        parents=[common],
        help="stay connected and print messages",
        description=(
            "Stay connected and print what arrives. While a gateway runs for the profile, "
            "listen prints the gateway's events instead of connecting, and ends (exit 1) "
            "when the gateway stops."
        ),
    )
    listen.set_defaults(run=cmd_listen)
    kept = sub.add_parser(
        "outbox", parents=[common], help="list messages kept until the server confirms them"
    )
    kept.set_defaults(run=cmd_outbox)
    history = sub.add_parser(
        "history",
        parents=[common],
        help="show a conversation, or search every conversation",
        description=(
            "Show the conversation with USER from this device's encrypted history, or with "
            "--search TEXT the messages of every conversation (direct and group) whose text "
            "holds TEXT, ignoring case, newest first. The search runs on this device only "
            "(nothing of it goes to the server) and keeps no index; what waits on the server "
            "is received first, as for USER."
        ),
    )
    history.add_argument("user", nargs="?")
    history.add_argument(
        "--search",
        metavar="TEXT",
        help=f"search every conversation for TEXT (1 to {search.MAX_TEXT_CHARS} characters)",
    )
    history.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help=f"with --search: at most N messages (default {search.DEFAULT_LIMIT}, "
        f"at most {search.MAX_LIMIT})",
    )
    history.set_defaults(run=cmd_history)
    whoami = sub.add_parser("whoami", parents=[common], help="show this profile's account")
    whoami.set_defaults(run=cmd_whoami)
