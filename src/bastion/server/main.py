"""Running the server as a process: logging, the event loop, signals → :func:`app.serve`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from bastion.server.app import Overrides, serve
from bastion.server.logs import JsonFormatter


async def serve_until_signalled(
    data_dir: Path,
    host: str,
    port: int,
    *,
    config: Path | None = None,
    db: str | None = None,
    bus: str | None = None,
    metrics_port: int | None = None,
    overrides: Overrides | None = None,
) -> None:
    """Run the relay until SIGTERM or SIGINT, then shut down gracefully (see :func:`app.serve`)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(
        data_dir,
        host,
        port,
        stop,
        config=config,
        db=db,
        bus=bus,
        metrics_port=metrics_port,
        overrides=overrides,
    )


def run(
    data_dir: Path,
    host: str,
    port: int,
    *,
    config: Path | None = None,
    db: str | None = None,
    bus: str | None = None,
    metrics_port: int | None = None,
    overrides: Overrides | None = None,
) -> None:
    """Blocking entry point used by ``bastion server run``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    level = os.environ.get("BASTION_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, handlers=[handler])
    if level != "DEBUG":
        # picows logs peer addresses at INFO; identifiers belong in DEBUG logs only.
        logging.getLogger("picows").setLevel(logging.WARNING)
    main = serve_until_signalled(
        data_dir,
        host,
        port,
        config=config,
        db=db,
        bus=bus,
        metrics_port=metrics_port,
        overrides=overrides,
    )
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up where available
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
