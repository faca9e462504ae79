"""The composition root of a relay node: Settings → Storage, Bus, Services, Router, RelayServer.

This is the one place that builds the server's objects and hands them to each
other; nothing registers itself at import. :func:`serve` runs a node until its
``stop`` event is set (the process's signals, in :mod:`bastion.server.main`).

A test harness changes the node through :class:`Overrides` (how each
connection is made), never by replacing names in modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import errno
import gc
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from bastion.errors import ConfigError
from bastion.ratelimit import BackoffRules, RateLimiter
from bastion.server.admin.watch import AdminChannel
from bastion.server.audit.log import AUDIT_DIR, AuditLog, ensure_audit_key
from bastion.server.cluster.local import Bus, LocalBus
from bastion.server.config import CONFIG_FILE, Limits, ServerConfig, Settings, load_settings
from bastion.server.handlers import (
    accounts,
    blobs,
    contacts,
    device_lists,
    devices,
    group_invites,
    groups,
    keys,
    messages,
    policy,
)
from bastion.server.handlers._context import (
    AuditTrail,
    LimitLog,
    Metrics,
    NullMetrics,
    Route,
    Router,
    Services,
    SystemClock,
    build_router,
)
from bastion.server.handlers._services import BlobService, ContactService, GroupService
from bastion.server.handlers.policy import ensure_policy_key
from bastion.server.logs import handle_loop_errors
from bastion.server.metrics import RelayMetrics
from bastion.server.net.connection import ClientConnection
from bastion.server.net.listener import ConnectionFactory, RelayServer
from bastion.server.net.tls import certificate_fingerprint, ensure_certificate
from bastion.server.storage import Storage, open_storage

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("bastion.server")

NAME_FILE = "server-name"
LOCK_FILE = "server.lock"

# Every module whose ROUTES the relay serves; a frame type has exactly one route.
HANDLER_MODULES = (
    accounts,
    keys,
    messages,
    devices,
    device_lists,
    contacts,
    groups,
    group_invites,
    blobs,
    policy,
)


def build_relay_router(replacing: tuple[Route, ...] = ()) -> Router:
    """The router over :data:`HANDLER_MODULES`, with ``replacing`` in place of their routes
    for the same frame types (a test harness's; raises ValueError for a type never routed)."""
    router = build_router(HANDLER_MODULES)
    if not replacing:
        return router
    routes = dict(router.routes)
    for route in replacing:
        if route.frame not in routes:
            raise ValueError(f"{route.frame.__name__} has no route to replace")
        routes[route.frame] = route
    return Router(routes.values())


@dataclass(frozen=True, slots=True)
class Overrides:
    """What a test harness may change in a node, and nothing else.

    ``connection`` makes each accepted connection (a subclass may wrap what the
    :class:`~bastion.server.handlers._context.Request` interface sends);
    ``routes`` replace the handlers of their frame types.
    """

    connection: ConnectionFactory = field(default=ClientConnection)
    routes: tuple[Route, ...] = ()


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


def build_services(
    *,
    limits: Limits,
    data_dir: Path,
    storage: Storage,
    bus: Bus,
    admin: AdminChannel,
    audit: AuditLog,
    metrics: Metrics,
) -> Services:
    """Every service handlers use, built once; the blob sweep starts here."""
    clock = SystemClock()
    trail = AuditTrail(audit)
    blob_service = BlobService(limits, storage.blobs, storage.blob_folder, storage.blob_content)
    services = Services(
        limits=limits,
        clock=clock,
        storage=storage,
        bus=bus,
        admin=admin,
        audit=trail,
        metrics=metrics,
        limit_log=LimitLog(trail, metrics, clock),
        policy_key=ensure_policy_key(data_dir),
        contacts=ContactService(storage.contacts),
        groups=GroupService(
            storage.groups,
            RateLimiter(limits.group_creations_per_hour / 3600.0, limits.group_creations_burst),
        ),
        blobs=blob_service,
        send_exceptions=(groups.room_key_may_pass,),
        signin_backoff=BackoffRules(
            base_delay=limits.signin_backoff_base_s,
            max_delay=limits.signin_backoff_max_s,
            free_failures=limits.signin_free_failures,
        ),
        message_rates=RateLimiter(limits.messages_per_second, limits.messages_burst),
        keys_low_notified=set(),
    )
    blob_service.start_sweeping()
    return services


async def serve(
    data_dir: Path,
    host: str,
    port: int,
    stop: asyncio.Event,
    *,
    limits: Limits | None = None,
    config: Path | None = None,
    db: str | None = None,
    bus: str | None = None,
    metrics_port: int | None = None,
    overrides: Overrides | None = None,
) -> None:
    """Run the relay until ``stop`` is set, then shut down gracefully.

    ``db`` (a ``postgresql://`` URL) and ``bus`` (a ``redis://`` URL) make this
    node one of a cluster; without them (here or in the config file's
    ``[cluster]`` table) it keeps SQLite and an in-process bus.

    Raises :class:`ConfigError` for an invalid config file and
    :class:`StorageError` if the database or audit log cannot be opened.
    """
    name = prepare_data_dir(data_dir, host, port)
    lock = lock_data_dir(data_dir)
    try:
        settings = server_settings(data_dir, config)
        settings = dataclasses.replace(
            settings,
            limits=limits if limits is not None else settings.limits,
            db=db if db is not None else settings.db,
            bus=bus if bus is not None else settings.bus,
        )
        await _serve_locked(
            data_dir,
            name,
            settings,
            host=host,
            port=port,
            stop=stop,
            metrics_port=metrics_port,
            overrides=overrides or Overrides(),
        )
    finally:
        os.close(lock)


async def _serve_locked(
    data_dir: Path,
    name: str,
    settings: Settings,
    *,
    host: str,
    port: int,
    stop: asyncio.Event,
    metrics_port: int | None,
    overrides: Overrides,
) -> None:
    limits = settings.limits
    bus_url = settings.bus
    server_config = ServerConfig(
        data_dir=data_dir,
        host=host,
        port=port,
        server_name=name,
        limits=limits,
        proxy_protocol_from=settings.proxy_protocol_from,
    )
    if bus_url is not None and not bus_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("the bus URL must start with redis://, rediss:// or unix://")
    storage = await open_storage(settings, data_dir)
    relay_bus: Bus = LocalBus()
    if bus_url is not None:
        from bastion.server.cluster.redis.bus import RedisBus  # noqa: PLC0415 - clustered nodes only

        redis_bus = RedisBus(bus_url, presence_ttl_s=limits.presence_ttl_s)
        relay_bus = redis_bus
    audit = AuditLog.open(
        data_dir / AUDIT_DIR, ensure_audit_key(data_dir), fsync_each_append=False, now=time.time()
    )
    admin = await AdminChannel.open(storage.admin, data_dir, poll_s=limits.admin_poll_s)
    metrics: Metrics = NullMetrics()
    relay_metrics: RelayMetrics | None = None
    if metrics_port is not None:
        admin.count_queue = True
        relay_metrics = RelayMetrics()
        metrics = relay_metrics
    services = build_services(
        limits=limits,
        data_dir=data_dir,
        storage=storage,
        bus=relay_bus,
        admin=admin,
        audit=audit,
        metrics=metrics,
    )
    server = RelayServer(
        server_config,
        services,
        build_relay_router(overrides.routes),
        connection=overrides.connection,
    )
    if bus_url is not None:
        redis_bus.add_reconnect_listener(server.resync)
        if not await redis_bus.start():
            log.warning("bus.unreachable")
    await admin.poll_once(audit, server.sign_out_user)
    if relay_metrics is not None:
        relay_metrics.watch(lambda: len(server.connections), lambda: admin.queue_depth)
        relay_metrics.serve(metrics_port or 0)
    handle_loop_errors(asyncio.get_running_loop(), metrics.count_tls_failure)
    audit.append("server.started", time.time())
    audit.flush()
    # The contact service hears of users whose node died (a cluster's bus tells one
    # node each), so it must listen before anyone has signed in here.
    contacts.listen(services)
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
    await stop.wait()
    log.info("server.stopping")
    poll.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await poll
    await server.stop()
    await services.blobs.close()
    await storage.close()
    if bus_url is not None:
        await redis_bus.close()
    audit.append("server.stopped", time.time())
    audit.close(time.time())
    await admin.close()
    print("stopped", flush=True)
