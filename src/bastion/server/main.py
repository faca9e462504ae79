"""Running the server: data directory, certificate, signals, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import gc
import logging
import os
import signal
import sys
import time
from pathlib import Path

from bastion.errors import ConfigError
from bastion.server.admin.policy import AdminBackend, SQLiteAdmin
from bastion.server.admin.watch import AdminChannel
from bastion.server.audit.log import AUDIT_DIR, AuditLog, ensure_audit_key
from bastion.server.cluster.local import Bus, LocalBus
from bastion.server.config import CONFIG_FILE, Limits, ServerConfig, Settings, load_settings
from bastion.server.handlers.policy import ensure_policy_key
from bastion.server.logs import JsonFormatter, handle_loop_errors
from bastion.server.metrics import RelayMetrics
from bastion.server.net.connection import RelayServer
from bastion.server.net.tls import certificate_fingerprint, ensure_certificate
from bastion.server.storage.interfaces import Store
from bastion.server.storage.sqlite.relay import SQLiteStore

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

NAME_FILE = "server-name"
DB_FILE = "bastion.db"
LOCK_FILE = "server.lock"


def lock_data_dir(data_dir: Path) -> int:
    """Hold the data folder for this process; raises ConfigError if a server already does.

    The lock is released when the process exits (or the returned descriptor is closed).
    """
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(
                f"another server is already using {data_dir}; stop it first, "
                "or give this one its own folder with --data"
            ) from None
    return fd


def prepare_data_dir(data_dir: Path, host: str, port: int) -> str:
    """Create the data directory, certificate and server name if missing; returns the name."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ensure_certificate(data_dir, [host], now=datetime.datetime.now(datetime.UTC))
    ensure_policy_key(data_dir)
    name_path = data_dir / NAME_FILE
    if not name_path.exists():
        name_path.write_text(f"{host}:{port}\n")
    name = name_path.read_text().strip()
    if not name or len(name) > 200:
        raise ConfigError(f"{name_path} must hold the server's name on one line")
    return name


def server_settings(data_dir: Path, config: Path | None) -> Settings:
    """Settings from ``config``, else from ``bastion.toml`` in the data folder, else defaults.

    Raises :class:`ConfigError` if the file is unreadable or invalid.
    """
    if config is not None:
        return load_settings(config)
    default = data_dir / CONFIG_FILE
    return load_settings(default) if default.exists() else Settings()


def server_limits(data_dir: Path, config: Path | None) -> Limits:
    """The limits part of :func:`server_settings`."""
    return server_settings(data_dir, config).limits


async def serve(
    data_dir: Path,
    host: str,
    port: int,
    *,
    limits: Limits | None = None,
    config: Path | None = None,
    db: str | None = None,
    bus: str | None = None,
    metrics_port: int | None = None,
) -> None:
    """Run the relay until SIGTERM or SIGINT, then shut down gracefully.

    ``db`` (a ``postgresql://`` URL) and ``bus`` (a ``redis://`` URL) make this
    node one of a cluster; without them (here or in the config file's
    ``[cluster]`` table) it keeps SQLite and an in-process bus.

    Raises :class:`ConfigError` for an invalid config file and
    :class:`StorageError` if the database or audit log cannot be opened.
    """
    name = prepare_data_dir(data_dir, host, port)
    lock = lock_data_dir(data_dir)
    try:
        await _serve_locked(
            data_dir,
            name,
            host=host,
            port=port,
            limits=limits,
            config=config,
            db=db,
            bus=bus,
            metrics_port=metrics_port,
        )
    finally:
        os.close(lock)


async def _serve_locked(
    data_dir: Path,
    name: str,
    *,
    host: str,
    port: int,
    limits: Limits | None,
    config: Path | None,
    db: str | None,
    bus: str | None,
    metrics_port: int | None,
) -> None:
    settings = server_settings(data_dir, config)
    if limits is None:
        limits = settings.limits
    db = db if db is not None else settings.db
    bus = bus if bus is not None else settings.bus
    server_config = ServerConfig(
        data_dir=data_dir,
        host=host,
        port=port,
        server_name=name,
        limits=limits,
        proxy_protocol_from=settings.proxy_protocol_from,
    )
    if bus is not None and not bus.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("the bus URL must start with redis://, rediss:// or unix://")
    store: Store
    admin_backend: AdminBackend
    if db is None:
        store = SQLiteStore(data_dir / DB_FILE)
        admin_backend = await SQLiteAdmin.open(data_dir)
    else:
        from bastion.server.storage.postgres.admin import PgAdmin  # noqa: PLC0415 - clustered nodes only
        from bastion.server.storage.postgres.relay import PgStore  # noqa: PLC0415

        pg_store = await PgStore.connect(db)
        store = pg_store
        admin_backend = PgAdmin(pg_store.connection)
    relay_bus: Bus = LocalBus()
    if bus is not None:
        from bastion.server.cluster.redis.bus import RedisBus  # noqa: PLC0415 - clustered nodes only

        redis_bus = RedisBus(bus, presence_ttl_s=limits.presence_ttl_s)
        relay_bus = redis_bus
    server = RelayServer(server_config, store, relay_bus)
    if bus is not None:
        redis_bus.add_reconnect_listener(server.resync)
        if not await redis_bus.start():
            logging.getLogger("bastion.server").warning("bus.unreachable")
    audit = AuditLog.open(
        data_dir / AUDIT_DIR, ensure_audit_key(data_dir), fsync_each_append=False, now=time.time()
    )
    server.audit = audit
    admin = await AdminChannel.open(admin_backend, data_dir, poll_s=limits.admin_poll_s)
    server.admin = admin
    await admin.poll_once(audit, server.sign_out_user)
    if metrics_port is not None:
        admin.count_queue = True
        server.metrics = RelayMetrics()
        server.metrics.watch(lambda: len(server.connections), lambda: admin.queue_depth)
        server.metrics.serve(metrics_port)

    def count_tls_failure() -> None:
        if server.metrics is not None:
            server.metrics.tls_handshake_failures.inc()

    handle_loop_errors(asyncio.get_running_loop(), count_tls_failure)
    audit.append("server.started", time.time())
    audit.flush()
    try:
        bound = await server.start()
    except OSError as exc:
        audit.close(time.time())
        await admin.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is already in use (another server?); stop what "
                "listens there or choose another port with --port"
            ) from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    # Long-lived startup objects leave the collector's view, and young-generation
    # collections run less often: collection was a quarter of the CPU per message.
    gc.freeze()
    gc.set_threshold(50_000, 50, 1_000)
    poll = asyncio.create_task(admin.run(audit, server.sign_out_user))
    print(f"listening on wss://{host}:{bound}", flush=True)
    print(f"certificate {certificate_fingerprint(data_dir)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger("bastion.server").info("server.stopping")
    poll.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await poll
    await server.stop()
    if bus is not None:
        await redis_bus.close()
    audit.append("server.stopped", time.time())
    audit.close(time.time())
    await admin.close()
    print("stopped", flush=True)


def run(
    data_dir: Path,
    host: str,
    port: int,
    *,
    config: Path | None = None,
    db: str | None = None,
    bus: str | None = None,
    metrics_port: int | None = None,
) -> None:
    """Blocking entry point used by ``bastion server run``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    level = os.environ.get("BASTION_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, handlers=[handler])
    if level != "DEBUG":
        # picows logs peer addresses at INFO; identifiers belong in DEBUG logs only.
        logging.getLogger("picows").setLevel(logging.WARNING)
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up where available

        uvloop.run(
            serve(data_dir, host, port, config=config, db=db, bus=bus, metrics_port=metrics_port)
        )
    except ImportError:
        asyncio.run(
            serve(data_dir, host, port, config=config, db=db, bus=bus, metrics_port=metrics_port)
        )
