"""The ``bastion`` command line: a thin front end over the client library and the server.

Errors go to standard error as one sentence, with a non-zero exit status. With
``--json``, output is one JSON object per line. Exit statuses: 0 done, 1 error
(including a message the server refused), 2 usage, 75 (:data:`~bastion.cli._common.EXIT_KEPT`) a
message is kept and goes out on the next connection, 130 interrupted.

This module only wires: each module of :data:`COMMANDS` adds its commands to
the parser, and :func:`main` runs the one chosen. The commands share
:mod:`bastion.cli._common` and never import this module.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from bastion import __version__
from bastion.cli import admin, chat, contacts, files, gateway, groups, identity, messages, server
from bastion.cli._common import EXIT_INTERRUPTED, Subcommands, print_error, set_hint_profile
from bastion.errors import BastionError


class CommandModule(Protocol):
    """A module of commands: it adds them to the top-level subparsers.

    Each command sets ``run`` (a coroutine function) or ``sync`` (a plain
    function) as its parser default; either takes the parsed arguments and
    returns the exit status.
    """

    def add_commands(self, sub: Subcommands, common: argparse.ArgumentParser) -> None: ...


# In the order ``bastion --help`` lists them.
COMMANDS: tuple[CommandModule, ...] = (
    server,
    messages,
    identity,
    contacts,
    files,
    groups,
    chat,
    gateway,
    admin,
)


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
    for module in COMMANDS:
        module.add_commands(sub, common)
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
    os.umask(0o077)
    args = build_parser().parse_args(argv)
    set_hint_profile(getattr(args, "profile", None))
    try:
        if hasattr(args, "sync"):
            return int(args.sync(args))
        return int(asyncio.run(quietly(args.run(args))))
    except (BastionError, ValueError) as exc:
        return print_error(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
