"""``bastion chat``: the command that opens the terminal app (Textual loads only then)."""

from __future__ import annotations

import argparse
import os

from bastion.cli._common import Subcommands, profile_dir
from bastion.errors import BastionError


def cmd_chat(args: argparse.Namespace) -> int:
    """Open the app on the profile; the passphrase comes from BASTION_PASSPHRASE or the app."""
    passphrase = os.environ.get("BASTION_PASSPHRASE")
    if passphrase == "":
        raise BastionError("BASTION_PASSPHRASE is set but empty")
    from bastion.tui.app import run  # noqa: PLC0415 - only this command needs Textual

    return run(profile_dir(args), passphrase=passphrase, bell=not args.no_bell)


def add_commands(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Register ``bastion chat`` on the main parser."""
    chat = sub.add_parser("chat", parents=[common], help="open the terminal chat app")
    chat.add_argument(
        "--no-bell",
        action="store_true",
        help="do not ring the terminal bell for a message in a chat that is not on screen",
    )
    chat.set_defaults(sync=cmd_chat)
