"""``bastion server ...``: run the relay, or print its certificate's fingerprint.

The server loads only when one of these commands runs: client commands never import it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bastion.cli._common import Subcommands


def cmd_server_run(args: argparse.Namespace) -> int:
    """Run the relay in this process until it is stopped."""
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
    """Print the fingerprint of the certificate in the data folder (clients pin it)."""
    from bastion.server.net.tls import (  # noqa: PLC0415 - clients need not load the server
        certificate_fingerprint,
    )

    print(certificate_fingerprint(Path(args.data)))
    return 0


def add_commands(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Register ``bastion server ...`` on the main parser (no profile: ``common`` is unused)."""
    del common
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
