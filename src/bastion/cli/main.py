"""The ``bastion`` command line: a thin front end over the client library and the server.

Errors go to standard error as one sentence, with a non-zero exit status. With
``--json``, output is one JSON object per line. Exit statuses: 0 done, 1 error
(including a message the server refused), 2 usage, 75 (:data:`EXIT_KEPT`) a
message is kept and goes out on the next connection, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import getpass
import json
import os
import re
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import platformdirs

from bastion import __version__
from bastion.client import (
    Client,
    DevicesChangedEvent,
    Event,
    FeatureEvent,
    HistoryRecord,
    KeyChangedEvent,
    MessageEvent,
    SendRefusedError,
    WarningEvent,
    check_new_passphrase,
    outbox,
    receipts,
    receiving,
    weakness,
)
from bastion.display import escape_body, escape_text
from bastion.errors import BastionError, KeyChangedError, ServerRefusedError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_KEPT = 75  # sysexits' EX_TEMPFAIL: the message is kept and goes out on the next connection
RECONNECT_S = 5.0  # how long ``send`` tries to reconnect when the connection drops mid-send
OFFLINE_CODES = frozenset({"disconnected", "timeout", "unreachable"})
# Commands a hint tells the user to run on this profile (not on another person's machine).
HINT_RE = re.compile(r"bastion (?:verify|trust|contacts|file|outbox|inbox|history|group)\b[^)'\n]*")
hint_profile: str | None = None  # --profile of the running command, added to hints


def with_profile(text: str) -> str:
    """``text`` with ``--profile DIR`` added to every command it suggests, if one was given."""
    if not hint_profile:
        return text
    suffix = " --profile " + shlex.quote(hint_profile)
    return HINT_RE.sub(lambda m: m.group(0).rstrip() + suffix, text)


def iso(ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC."""
    return (
        datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def message_json(record: HistoryRecord, verified: bool) -> dict[str, Any]:
    """The ``--json`` form of a message; our own carry their state (and why one failed)."""
    out: dict[str, Any] = {
        "type": "message",
        "id": record.id.hex(),
        "from": record.sender,
        "device": record.device,
        "conversation": record.conversation,
        "text": record.text,
        "sent_at": iso(record.sent_at),
        "verified": verified,
    }
    if record.direction == "out":
        out["state"] = record.state
        if record.state == "failed":
            out["reason"] = record.reason or "refused by the server"
    return out


def event_json(event: Event) -> dict[str, Any]:
    """The ``--json`` form of any event."""
    if isinstance(event, MessageEvent):
        return message_json(event.record, event.verified)
    if isinstance(event, FeatureEvent):
        return event.to_json()
    if isinstance(event, KeyChangedEvent):
        return {"type": "key_changed", "user": event.user, "at": iso(event.at)}
    if isinstance(event, DevicesChangedEvent):
        return {
            "type": "devices_changed",
            "user": event.user,
            "added": list(event.added),
            "certified_at": [iso(ms) for ms in event.certified_at],
            "removed": list(event.removed),
            "own_account": event.own_account,
            "at": iso(event.at),
        }
    return {
        "type": "warning",
        "reason": event.reason,
        "from": event.sender,
        "device": event.device,
        "at": iso(event.at),
    }


def print_event(event: Event, as_json: bool, *, server_url: str | None = None) -> None:
    """Print an event for a person or, with ``as_json``, for a program."""
    if as_json:
        print(json.dumps(event_json(event)), flush=True)
    elif isinstance(event, MessageEvent):
        print(format_message(event.record), flush=True)
    elif isinstance(event, FeatureEvent):
        print(escape_text(with_profile(event.describe())), flush=True)
    else:
        text = describe_notice(event, server_url=server_url)
        print(f"warning: {escape_text(with_profile(text))}", file=sys.stderr, flush=True)


def print_device_changes(client: Client, as_json: bool) -> None:
    """Print the device changes a command learned on standard error, and take them off.

    Commands that are not listening would otherwise drop them: a device added to
    a contact's account, or to this account with a stolen account key, is always shown.
    """
    kept: list[Event] = []
    for event in client.notices:
        if not isinstance(event, DevicesChangedEvent):
            kept.append(event)
        elif as_json:
            print(json.dumps(event_json(event)), file=sys.stderr, flush=True)
        else:
            text = describe_notice(event, server_url=client.account.server_url)
            print(f"warning: {escape_text(with_profile(text))}", file=sys.stderr, flush=True)
    client.notices[:] = kept


def describe_device_change(event: DevicesChangedEvent, *, server_url: str | None = None) -> str:
    """Who, which device, when it was certified; loud for a new device on this account."""
    when = dict(zip(event.added, event.certified_at, strict=False))
    added = [f"{d} (certified {iso(when[d])})" if d in when else d for d in event.added]
    if event.own_account and event.added:
        server = server_url or "YOUR_SERVER"
        revoke = "; ".join(f"bastion devices revoke {d}" for d in event.added)
        return (
            f"a new device was added to YOUR account ({event.user}): {', '.join(added)}. "
            f"If this was not you, someone holds your account key: revoke it now ({revoke}) "
            f"and move your account, because whoever has the key can add devices again: "
            f"bastion register NEW_NAME --server {server} --profile NEW_FOLDER, then tell "
            f"your contacts and verify each of them again (bastion verify USER)."
        )
    parts = []
    if event.added:
        parts.append("new device " + ", ".join(added))
    if event.removed:
        parts.append("removed " + ", ".join(event.removed))
    whose = f"your account's ({event.user})" if event.own_account else f"{event.user}'s"
    return f"{whose} devices changed: " + "; ".join(parts)


def describe_notice(
    event: WarningEvent | KeyChangedEvent | DevicesChangedEvent | FeatureEvent,
    *,
    server_url: str | None = None,
) -> str:
    """A sentence about a warning or notice."""
    if isinstance(event, FeatureEvent):
        return event.describe()
    if isinstance(event, KeyChangedEvent):
        return (
            f"{event.user}'s account key has changed; their messages wait until you decide. "
            f"See the new safety number (bastion verify {event.user}), compare it with "
            f"{event.user}, and only if it matches run "
            f"'bastion trust {event.user} --accept-new-key NUMBER_OR_FINGERPRINT'."
        )
    if isinstance(event, DevicesChangedEvent):
        return describe_device_change(event, server_url=server_url)
    return f"a message claiming to be from {event.sender} was rejected: {event.reason}"


def format_message(record: HistoryRecord) -> str:
    """A message for a person: one line, and a marked line for each further line of its text.

    Controls and bidi characters in the names and the text are shown escaped
    (:mod:`bastion.display`), so a message cannot fake another message's line.
    """
    when = datetime.datetime.fromtimestamp(record.sent_at / 1000, datetime.UTC)
    who = "you" if record.direction == "out" else escape_text(record.sender)
    to = f" -> {escape_text(record.peer)}" if record.direction == "out" else ""
    line = f"[{when:%Y-%m-%d %H:%M:%S}Z] {who}{to}: {escape_body(record.text)}"
    if record.direction == "out" and record.state == "failed":
        line += f"  [NOT SENT: {escape_text(record.reason or 'refused by the server')}]"
    elif record.direction == "out" and record.state == "pending":
        line += "  [kept: goes out on the next connection]"
    return line


# --- profile and passphrase ------------------------------------------------------------------


def profile_dir(args: argparse.Namespace) -> Path:
    """The profile folder from --profile, BASTION_PROFILE, or the user's data folder."""
    if args.profile:
        return Path(args.profile)
    env = os.environ.get("BASTION_PROFILE")
    if env:
        return Path(env)
    return Path(platformdirs.user_data_dir("bastion")) / "profile"


def passphrase(*, confirm: bool = False, user: str = "") -> str:
    """The passphrase from BASTION_PASSPHRASE or an interactive prompt.

    With ``confirm`` it is for a new profile: too short is refused, easy to guess
    is warned about on standard error.
    """
    env = os.environ.get("BASTION_PASSPHRASE")
    if env is not None:
        if not env:
            raise BastionError("BASTION_PASSPHRASE is set but empty")
        return _checked_new(env, user) if confirm else env
    if not sys.stdin.isatty():
        raise BastionError("no passphrase: set BASTION_PASSPHRASE or run in a terminal")
    first = getpass.getpass("Profile passphrase: ")
    if not first:
        raise BastionError("the passphrase must not be empty")
    if confirm:
        _checked_new(first, user)
        if getpass.getpass("Repeat passphrase: ") != first:
            raise BastionError("the passphrases do not match")
    return first


def _checked_new(value: str, user: str) -> str:
    check_new_passphrase(value)
    weak = weakness(value, user_inputs=[user] if user else [])
    if weak is not None:
        print(f"warning: {weak}", file=sys.stderr, flush=True)
    return value


async def with_client(
    args: argparse.Namespace,
    work: Callable[[Client], Awaitable[int]],
    *,
    connect: bool = True,
    receive: bool = False,
) -> int:
    """Unlock the profile, optionally connect, run ``work``, and always clean up."""
    client = Client.open(profile_dir(args), passphrase())
    try:
        if connect:
            await client.connect(receive=receive)
        return await work(client)
    finally:
        print_device_changes(client, bool(getattr(args, "json", False)))
        await client.close()


# --- commands ------------------------------------------------------------------------------------


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
        from bastion.cli import groups as cli_groups  # noqa: PLC0415 - group commands live apart

        return await cli_groups.send_to_group(args)
    if args.user is None or args.text is None:
        raise BastionError("usage: bastion send USER TEXT (or --group GROUP TEXT)")

    async def work(client: Client) -> int:
        # A kept copy of this very message went out as we connected: do not send it twice.
        record = outbox.take_flushed(client, args.user, args.text)
        if record is None:
            try:
                record = await client.send_text(args.user, args.text)
            except SendRefusedError as exc:
                return report_refused(args, exc.record)
            except ServerRefusedError as exc:
                if exc.code not in OFFLINE_CODES:
                    raise
                record = await confirm_after_drop(client, args.user, args.text)
        if record.state == "failed":
            return report_refused(args, record)
        if record.state == "pending":
            return report_kept(args, record)
        if args.json:
            print(
                json.dumps(
                    {
                        "type": "sent",
                        "id": record.id.hex(),
                        "to": args.user,
                        "state": "stored",
                        "server_ts": iso(record.server_ts),
                    }
                )
            )
        else:
            print(f"stored on the server for {args.user}; their devices receive it as they connect")
        return 0

    return await with_client(args, work)


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
        if client.conn is not None:
            await client.conn.aclose()
            client.conn = None
        try:
            await asyncio.wait_for(client.connect(receive=False), max(0.5, deadline - loop.time()))
        except (ServerRefusedError, TimeoutError) as exc:
            if isinstance(exc, ServerRefusedError) and exc.code not in OFFLINE_CODES:
                raise
            await asyncio.sleep(min(0.5, max(0.0, deadline - loop.time())))
            continue
        break
    return client.profile.message(record.id, HistoryRecord) or record


def report_refused(args: argparse.Namespace, record: HistoryRecord) -> int:
    """Say that the server refused the message, and why; it shows as not sent in history."""
    reason = record.reason or "refused by the server"
    if args.json:
        print(
            json.dumps(
                {"type": "refused", "id": record.id.hex(), "to": record.peer, "reason": reason}
            )
        )
    print(f"error: not sent: the server refused it: {escape_text(reason)}", file=sys.stderr)
    return EXIT_ERROR


def report_kept(args: argparse.Namespace, record: HistoryRecord) -> int:
    """Say that the message is kept for the next connection (exit status EXIT_KEPT)."""
    if args.json:
        print(json.dumps({"type": "kept", "id": record.id.hex(), "to": record.peer}))
    print(
        with_profile(
            "warning: the connection to the server was lost before it confirmed the message; "
            "it is kept and goes out on the next connection, so do not send it again "
            "(run 'bastion outbox' to see it)"
        ),
        file=sys.stderr,
    )
    return EXIT_KEPT


async def cmd_outbox(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        for record in outbox.kept_messages(client):
            if args.json:
                print(json.dumps(message_json(record, verified=False)))
            else:
                print(format_message(record))
        return 0

    return await with_client(args, work, connect=False)


async def pick_up_waiting(
    client: Client, args: argparse.Namespace, *, shown_by_list: Callable[[Event], bool]
) -> bool:
    """Receive what waits on the server before a list is printed; False when offline.

    What arrives is printed as ``inbox`` prints it (and acknowledged, so ``inbox``
    does not print it again), except what the list itself is about to show.
    While another process receives for this profile, nothing is taken over.
    Offline, a warning says the list may be stale.
    """
    try:
        if receiving.held_elsewhere(client.profile.path):
            # Another process (listen, chat) receives and stores into this profile:
            # the local lists are current, and taking over would cut it off.
            await client.connect(receive=False)
            return True
        await client.connect(receive=True)
        receipts.enable(client)
        async for event in client.receive(until_synced=True):
            if not shown_by_list(event):
                print_event(event, args.json)
    except ServerRefusedError as exc:
        if exc.code not in OFFLINE_CODES:
            raise
        print(
            f"warning: {exc} (showing what this device knows; it may be stale)",
            file=sys.stderr,
        )
        return False
    return True


async def cmd_inbox(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        receipts.enable(client)
        async for event in client.receive(until_synced=True):
            print_event(event, args.json, server_url=client.account.server_url)
        return 0

    return await with_client(args, work, receive=True)


async def cmd_listen(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def work(client: Client) -> int:
        receipts.enable(client)

        async def pump() -> None:
            async for event in client.receive():
                print_event(event, args.json, server_url=client.account.server_url)

        from bastion.client import presence  # noqa: PLC0415 - a feature of the client

        for snapshot in await presence.watch(client):
            print_event(snapshot, args.json)
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
                raise exc
            reason = client.conn.close_reason if client.conn is not None else None
            raise ServerRefusedError("disconnected", reason or "the server closed the connection")
        return 0

    return await with_client(args, work, receive=True)


async def cmd_history(args: argparse.Namespace) -> int:
    async def work(client: Client) -> int:
        contact = client.contact(args.user)
        verified = contact is not None and contact.trust == "verified"

        def in_this_conversation(event: Event) -> bool:
            return isinstance(event, MessageEvent) and event.record.peer == args.user

        await pick_up_waiting(client, args, shown_by_list=in_this_conversation)
        for record in client.history(args.user):
            if args.json:
                print(json.dumps(message_json(record, verified)))
            else:
                print(format_message(record))
        return 0

    return await with_client(args, work, connect=False)


async def cmd_whoami(args: argparse.Namespace) -> int:
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
        if args.json:
            print(json.dumps(info))
        else:
            print(f"{a.username} on {a.server_url} (device {a.device_id})")
            print(f"server certificate: {a.fingerprint}")
        return 0

    return await with_client(args, work, connect=False)


def cmd_server_run(args: argparse.Namespace) -> int:
    from bastion.server.main import run  # noqa: PLC0415 - clients need not load the server

    run(
        Path(args.data),
        args.host,
        args.port,
        config=Path(args.config) if args.config else None,
        db=args.db,
        bus=args.bus,
        metrics_port=args.metrics_port,
    )
    return 0


def cmd_server_fingerprint(args: argparse.Namespace) -> int:
    from bastion.server.net.tls import certificate_fingerprint  # noqa: PLC0415

    print(certificate_fingerprint(Path(args.data)))
    return 0


# --- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--profile", help="profile folder (default: BASTION_PROFILE or the user data folder)"
    )
    common.add_argument("--json", action="store_true", help="one JSON object per line")

    parser = argparse.ArgumentParser(prog="bastion", description="End-to-end encrypted messaging.")
    parser.add_argument("--version", action="version", version=f"bastion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    server = sub.add_parser("server", help="run or inspect a server")
    server_sub = server.add_subparsers(dest="server_command", required=True)
    run = server_sub.add_parser("run", help="start the relay server")
    run.add_argument("--data", required=True, help="data folder (created if missing)")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8443)
    run.add_argument("--config", help="config file (default: bastion.toml in the data folder)")
    run.add_argument("--metrics-port", type=int, help="serve /metrics on 127.0.0.1:PORT")
    run.add_argument(
        "--db",
        help="postgresql://USER@HOST/DB[?schema=NAME] shared by every node"
        " (default: SQLite in the data folder)",
    )
    run.add_argument(
        "--bus",
        help="redis://HOST:PORT/N linking the nodes of a cluster (default: this process only)",
    )
    run.set_defaults(sync=cmd_server_run)
    fp = server_sub.add_parser("fingerprint", help="print the server certificate's fingerprint")
    fp.add_argument("--data", required=True)
    fp.set_defaults(sync=cmd_server_fingerprint)

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

    inbox = sub.add_parser("inbox", parents=[common], help="receive what is waiting, then exit")
    inbox.set_defaults(run=cmd_inbox)
    listen = sub.add_parser("listen", parents=[common], help="stay connected and print messages")
    listen.set_defaults(run=cmd_listen)
    kept = sub.add_parser(
        "outbox", parents=[common], help="list messages kept until the server confirms them"
    )
    kept.set_defaults(run=cmd_outbox)
    history = sub.add_parser("history", parents=[common], help="show a conversation")
    history.add_argument("user")
    history.set_defaults(run=cmd_history)
    whoami = sub.add_parser("whoami", parents=[common], help="show this profile's account")
    whoami.set_defaults(run=cmd_whoami)

    from bastion.cli import identity as cli_identity  # noqa: PLC0415 - keeps the two command sets apart

    cli_identity.add_commands(sub, common)
    from bastion.cli import contacts as cli_contacts  # noqa: PLC0415 - contact commands live apart

    cli_contacts.add_commands(sub, common)
    from bastion.cli import files as cli_files  # noqa: PLC0415 - file commands live apart

    cli_files.add_commands(sub, common)
    from bastion.cli import groups as cli_groups  # noqa: PLC0415 - group commands live apart

    cli_groups.add_commands(sub, common)
    from bastion.cli import chat as chat_command  # noqa: PLC0415 - Textual loads on use

    chat_command.add_commands(sub, common)
    from bastion.cli import admin as admin_cli  # noqa: PLC0415 - operator commands live apart

    admin_cli.add_commands(sub)
    return parser


async def quietly(command: Awaitable[int]) -> int:
    """Run ``command`` with the event loop's own reports of failed TLS handshakes silenced.

    A connection that fails is already reported as one sentence by the client
    library; the loop would add a traceback about the same handshake.
    """
    loop = asyncio.get_running_loop()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith("SSL handshake failed"):
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return await command


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bastion`` command."""
    global hint_profile  # noqa: PLW0603 - one command per process
    os.umask(0o077)
    args = build_parser().parse_args(argv)
    hint_profile = getattr(args, "profile", None)
    try:
        if hasattr(args, "sync"):
            return int(args.sync(args))
        return int(asyncio.run(quietly(args.run(args))))
    except KeyChangedError as exc:
        print(f"error: {escape_text(with_profile(str(exc)))}", file=sys.stderr)
        print(
            with_profile(f"'bastion verify {exc.user}' shows the safety number with the new key."),
            file=sys.stderr,
        )
        return EXIT_ERROR
    except (BastionError, ValueError) as exc:
        print(f"error: {escape_text(with_profile(str(exc)))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
