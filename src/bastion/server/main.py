"""Running the server: data directory, certificate, signals, graceful shutdown."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import signal
import sys
from pathlib import Path

from bastion.errors import ConfigError
from bastion.server.bus import LocalBus
from bastion.server.config import Limits, ServerConfig
from bastion.server.relay import RelayServer
from bastion.server.sqlite_store import SQLiteStore
from bastion.server.tls import certificate_fingerprint, ensure_certificate

NAME_FILE = "server-name"
DB_FILE = "bastion.db"


def prepare_data_dir(data_dir: Path, host: str, port: int) -> str:
    """Create the data directory, certificate and server name if missing; returns the name."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ensure_certificate(data_dir, [host], now=datetime.datetime.now(datetime.UTC))
    name_path = data_dir / NAME_FILE
    if not name_path.exists():
        name_path.write_text(f"{host}:{port}\n")
    name = name_path.read_text().strip()
    if not name or len(name) > 200:
        raise ConfigError(f"{name_path} must hold the server's name on one line")
    return name


async def serve(data_dir: Path, host: str, port: int, *, limits: Limits | None = None) -> None:
    """Run the relay until SIGTERM or SIGINT, then shut down gracefully."""
    name = prepare_data_dir(data_dir, host, port)
    config = ServerConfig(
        data_dir=data_dir, host=host, port=port, server_name=name, limits=limits or Limits()
    )
    store = SQLiteStore(data_dir / DB_FILE)
    server = RelayServer(config, store, LocalBus())
    bound = await server.start()
    print(f"listening on wss://{host}:{bound}", flush=True)
    print(f"certificate {certificate_fingerprint(data_dir)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger("bastion.server").info("server.stopping")
    await server.stop()
    print("stopped", flush=True)


def run(data_dir: Path, host: str, port: int) -> None:
    """Blocking entry point used by ``bastion server run``."""
    logging.basicConfig(
        level=os.environ.get("BASTION_LOG_LEVEL", "INFO"),
        stream=sys.stderr,
        format='{"time":"%(asctime)s","level":"%(levelname)s","event":"%(message)s"}',
    )
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up where available

        uvloop.run(serve(data_dir, host, port))
    except ImportError:
        asyncio.run(serve(data_dir, host, port))
