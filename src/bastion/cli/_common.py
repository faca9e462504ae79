"""What the command modules share: the profile, the passphrase, the client, and printing.

Every command module imports this one (never :mod:`bastion.cli.main`), so the
entry point depends on the commands and the commands only on this library.
Errors go to standard error as one sentence, with a non-zero exit status. With
``--json``, output is one JSON object per line. Exit statuses: 0 done, 1 error
(including a message the server refused), 2 usage, 75 (:data:`EXIT_KEPT`) a
message is kept and goes out on the next connection, 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import os
import re
import shlex
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeAlias

import platformdirs

from bastion.client import (
    Client,
    DevicesChangedEvent,
    Event,
    FeatureEvent,
    HistoryRecord,
    KeyChangedEvent,
    MessageEvent,
    WarningEvent,
    check_new_passphrase,
    receipts,
    weakness,
)
from bastion.display import escape_body, escape_text
from bastion.errors import BastionError, KeyChangedError, ServerRefusedError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_KEPT = 75  # sysexits' EX_TEMPFAIL: the message is kept and goes out on the next connection
EXIT_INTERRUPTED = 130
OFFLINE_CODES = frozenset({"disconnected", "timeout", "unreachable"})
REFUSED = "refused by the server"  # the reason of a failed message the server gave none for
# Commands a hint tells the user to run on this profile (not on another person's machine).
HINT_RE = re.compile(r"bastion (?:verify|trust|contacts|file|outbox|inbox|history|group)\b[^)'\n]*")
# The --profile of the running command, added to those hints (see set_hint_profile).
hint_profile: str | None = None

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""The top-level subparsers each command module adds its commands to."""


def set_hint_profile(profile: str | None) -> None:
    """Remember the running command's ``--profile`` for :func:`with_profile` (one per process)."""
    global hint_profile  # noqa: PLW0603 - one command per process
    hint_profile = profile


def with_profile(text: str) -> str:
    """``text`` with ``--profile DIR`` added to every command it suggests, if one was given."""
    if not hint_profile:
        return text
    suffix = " --profile " + shlex.quote(hint_profile)
    return HINT_RE.sub(lambda m: m.group(0).rstrip() + suffix, text)


# --- printing ------------------------------------------------------------------------------------


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
            out["reason"] = record.reason or REFUSED
    if record.reply_to is not None:
        out["reply_to"] = record.reply_to.hex()
    if record.reactions:
        out["reactions"] = dict(sorted(record.reactions.items()))
    if record.edited_at:
        out["edited"] = True
    if record.deleted_at:
        out["deleted"] = True
    return out


def found_json(client: Client, record: HistoryRecord) -> dict[str, Any]:
    """The ``--json`` form of a message a search found, in whichever conversation.

    ``verified`` is what that conversation's history says: in a direct one, whether
    the other person is verified; in a group, whether the sender is.
    """
    other = record.sender if record.direction == "in" else record.peer
    contact = None if ":" in other else client.contact(other)  # a group's peer holds ':'
    return message_json(record, contact is not None and contact.trust == "verified")


def sent_json(record: HistoryRecord) -> dict[str, Any]:
    """What ``send --json`` prints (and the gateway's ``send`` answers): stored, queued or kept."""
    if record.state == "queued":
        return {"type": "queued", "id": record.id.hex(), "to": record.peer, "state": "queued"}
    if record.state == "pending":
        return {"type": "kept", "id": record.id.hex(), "to": record.peer, "state": "pending"}
    return {
        "type": "sent",
        "id": record.id.hex(),
        "to": record.peer,
        "state": "stored",
        "server_ts": iso(record.server_ts),
    }


def refusal_json(record: HistoryRecord) -> dict[str, Any]:
    """What ``send --json`` prints for a message the server refused (it shows as not sent)."""
    reason = record.reason or REFUSED
    return {"type": "refused", "id": record.id.hex(), "to": record.peer, "reason": reason}


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
    """A message for a person (see :func:`render_message`, which reads its ``--json`` form)."""
    return render_message(message_json(record, verified=False))


def render_message(message: dict[str, Any]) -> str:
    """A message's ``--json`` form for a person: one line, and a marked line per further line.

    The one formatter of a message, whether it comes from this process's client
    or from the gateway. Controls and bidi characters in the names and the text
    are shown escaped (:mod:`bastion.display`), so a message cannot fake another
    message's line. Only messages this account sent carry a ``state``.
    """
    when = datetime.datetime.fromisoformat(str(message["sent_at"]))
    sender = str(message["from"])
    state = message.get("state")
    outgoing = state is not None
    who = "you" if outgoing else escape_text(sender)
    to = f" -> {escape_text(recipient(str(message['conversation']), sender))}" if outgoing else ""
    quote = f"(reply to {str(message['reply_to'])[:8]}) " if message.get("reply_to") else ""
    text = "[deleted]" if message.get("deleted") else escape_body(str(message["text"]))
    line = f"[{when:%Y-%m-%d %H:%M:%S}Z] {who}{to}: {quote}{text}"
    if message.get("edited"):
        line += "  [edited]"
    reactions = message.get("reactions") or {}
    if reactions:
        shown = ", ".join(f"{escape_text(e)} {escape_text(u)}" for u, e in reactions.items())
        line += f"  [{shown}]"
    if state == "failed":
        line += f"  [NOT SENT: {escape_text(str(message.get('reason') or REFUSED))}]"
    elif state == "pending":
        line += "  [kept: goes out on the next connection]"
    elif state == "queued":
        line += "  [queued: goes out when the server can be reached]"
    return line


def render_found(message: dict[str, Any], group_names: dict[str, str]) -> str:
    """A message a search found, for a person: its conversation, then the line history prints.

    A direct conversation is shown as ``[with USER]``, a group as ``[#NAME]``
    (its conversation id when this device knows no name for it).
    """
    conversation = str(message["conversation"])
    sender = str(message["from"])
    if conversation.startswith("dm:"):
        other = recipient(conversation, sender) if "state" in message else sender
        label = f"with {escape_text(other)}"
    else:
        label = "#" + escape_text(group_names.get(conversation, conversation))
    return f"[{label}] {render_message(message)}"


def recipient(conversation: str, sender: str) -> str:
    """Who a message of ``sender`` in ``conversation`` went to: the other user, or the group."""
    kind, _, users = conversation.partition(":")
    if kind != "dm":
        return conversation
    first, _, second = users.partition(",")
    return second if first == sender else first


# --- profile and passphrase ----------------------------------------------------------------------


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
    """Unlock the profile, optionally connect, run ``work``, and always clean up.

    A command that receives (``receive``) checks first that no gateway holds the
    profile (:func:`bastion.cli._gateway.gateway_holds`): taking this device's
    deliveries would cut the gateway off.
    """
    client = Client.open(profile_dir(args), passphrase())
    try:
        if connect:
            await client.connect(receive=receive)
        return await work(client)
    finally:
        print_device_changes(client, bool(getattr(args, "json", False)))
        await client.close()


# --- receiving before a list ---------------------------------------------------------------------


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
        if client.receiving_elsewhere():
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


# --- errors --------------------------------------------------------------------------------------


def print_error(exc: BastionError | ValueError) -> int:
    """Print ``exc`` as one sentence on standard error (with a hint for a changed key).

    Returns :data:`EXIT_ERROR`, the exit status of a command that failed this way.
    """
    print(f"error: {escape_text(with_profile(str(exc)))}", file=sys.stderr)
    if isinstance(exc, KeyChangedError):
        print(
            with_profile(f"'bastion verify {exc.user}' shows the safety number with the new key."),
            file=sys.stderr,
        )
    return EXIT_ERROR
