"""Server settings and limits, with safe defaults, and the optional ``bastion.toml``.

The config file holds a ``[limits]`` table whose keys are the field names of
:class:`Limits` (docs/limits.md lists them); for a node of a cluster, a
``[cluster]`` table with the ``db`` and ``bus`` URLs; and for a node behind a
load balancer, a ``[network]`` table whose ``proxy_protocol_from`` lists the
balancers' addresses (docs/deploy.md). Unknown
keys and wrong types are refused with a :class:`~bastion.errors.ConfigError`
that names the key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from bastion.errors import ConfigError

CONFIG_FILE = "bastion.toml"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Every limit the relay enforces; docs/limits.md lists them in one table."""

    max_frame_bytes: int = 256 * 1024
    challenge_ttl_s: float = 60.0
    signin_attempts_per_connection: int = 3
    signin_timeout_s: float = 15.0
    bad_frames_before_close: int = 20
    requests_in_flight: int = 256
    delivery_window: int = 512
    max_write_buffer_bytes: int = 4 * 1024 * 1024
    slow_reader_grace_s: float = 10.0
    heartbeat_idle_s: float = 30.0
    heartbeat_reply_s: float = 15.0
    key_claims_per_minute: float = 30.0
    key_claims_burst: int = 30
    key_claims_per_target_per_hour: float = 20.0
    key_claims_per_target_burst: int = 5
    signin_backoff_base_s: float = 1.0
    signin_backoff_max_s: float = 300.0
    signin_free_failures: int = 5
    one_time_keys_low: int = 15
    one_time_keys_max: int = 200
    messages_per_second: float = 100.0
    messages_burst: int = 1000
    registrations_per_address_per_hour: float = 60.0
    registrations_per_address_burst: int = 200
    connections_per_address: int = 512
    max_devices_per_account: int = 10
    offline_queue_max: int = 10_000
    tls_handshake_timeout_s: float = 10.0
    websocket_open_timeout_s: float = 10.0
    admin_poll_s: float = 1.0
    presence_ttl_s: float = 30.0
    shutdown_grace_s: float = 2.0
    contact_requests_per_sender_per_day: float = 50.0
    contact_requests_per_sender_burst: int = 20
    contact_requests_per_recipient_per_hour: float = 20.0
    contact_requests_per_recipient_burst: int = 10
    contact_requests_pending_max: int = 50
    contacts_max: int = 1000
    group_max_members: int = 1000
    group_creations_per_hour: float = 30.0
    group_creations_burst: int = 10
    group_changes_per_account_per_hour: float = 600.0
    group_changes_per_account_burst: int = 120
    group_changes_per_group_per_hour: float = 600.0
    group_changes_per_group_burst: int = 120
    group_max_chain_changes: int = 50_000
    group_max_change_bytes: int = 128 * 1024
    blob_quota_mb: int = 2048
    blob_expiry_days: float = 7.0
    blob_upload_ttl_s: float = 86_400.0
    blob_upload_idle_s: float = 300.0
    blob_uploads_max: int = 256
    blob_sweep_s: float = 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """Where the server keeps its data, where it listens, and its limits."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8443
    server_name: str = ""
    limits: Limits = field(default_factory=Limits)
    # Balancers whose connections start with a PROXY header naming the client.
    proxy_protocol_from: tuple[Network, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything a config file sets: the limits and, for a cluster node, where state lives."""

    limits: Limits = field(default_factory=Limits)
    db: str | None = None  # postgresql://... shared by every node; None: SQLite in the data folder
    bus: str | None = None  # redis://... linking the nodes; None: this process only
    proxy_protocol_from: tuple[Network, ...] = ()  # [network]: balancers sending PROXY headers


_SECTIONS = frozenset({"limits", "cluster", "network"})
_CLUSTER_KEYS = {
    "db": ("postgresql://", "postgres://"),
    "bus": ("redis://", "rediss://", "unix://"),
}
_MAY_BE_ZERO = frozenset({"signin_free_failures"})


def parse_config(data: bytes | str, *, source: str = CONFIG_FILE) -> Limits:
    """Parse the text of a config file into :class:`Limits` (defaults for absent keys).

    Raises :class:`ConfigError` naming the file and key for invalid TOML, an
    unknown table or key, a wrong type, or a limit that is not a positive number.
    """
    return parse_settings(data, source=source).limits


def parse_settings(data: bytes | str, *, source: str = CONFIG_FILE) -> Settings:
    """Parse the text of a config file into :class:`Settings` (defaults for absent keys).

    Raises :class:`ConfigError` as :func:`parse_config` does, and for a cluster
    URL that is not text or has the wrong scheme.
    """
    try:
        raw = msgspec.toml.decode(data)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not valid TOML: the file is not UTF-8 text") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a table at the top level")
    for name in raw:
        if name not in _SECTIONS:
            raise ConfigError(
                f"{source}: unknown setting {name!r} (expected [limits], [cluster], [network])"
            )
    cluster = _parse_cluster(raw.get("cluster", {}), source)
    proxies = _parse_network(raw.get("network", {}), source)
    table: Any = raw.get("limits", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: 'limits' must be a table")
    known = {f.name: f for f in dataclasses.fields(Limits)}
    for name in table:
        if name not in known:
            raise ConfigError(f"{source}: unknown limit 'limits.{name}'")
    for name, value in table.items():
        expected = known[name].type
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: 'limits.{name}' must be a number")
        if expected in ("int", int) and not isinstance(value, int):
            raise ConfigError(f"{source}: 'limits.{name}' must be a whole number")
        if name in _MAY_BE_ZERO and value == 0:
            continue
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{source}: 'limits.{name}' must be a positive number")
    try:
        limits = msgspec.convert(table, Limits)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return Settings(
        limits=limits, db=cluster.get("db"), bus=cluster.get("bus"), proxy_protocol_from=proxies
    )


def parse_networks(values: Any, *, source: str) -> tuple[Network, ...]:
    """Parse a list of ``10.0.0.0/24``-style networks or single addresses.

    Raises :class:`ConfigError` naming ``source`` for anything else.
    """
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{source} must be a list of IP addresses or networks")
    networks: list[Network] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=True))
        except ValueError:
            raise ConfigError(f"{source}: {value!r} is not an IP address or network") from None
    return tuple(networks)


def _parse_network(table: Any, source: str) -> tuple[Network, ...]:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: 'network' must be a table")
    for name in table:
        if name != "proxy_protocol_from":
            raise ConfigError(f"{source}: unknown setting 'network.{name}' (proxy_protocol_from)")
    return parse_networks(
        table.get("proxy_protocol_from", []), source=f"{source}: 'network.proxy_protocol_from'"
    )


def _parse_cluster(table: Any, source: str) -> dict[str, str]:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: 'cluster' must be a table")
    for name, value in table.items():
        schemes = _CLUSTER_KEYS.get(name)
        if schemes is None:
            raise ConfigError(f"{source}: unknown setting 'cluster.{name}' (db, bus)")
        if not isinstance(value, str) or not value.startswith(schemes):
            raise ConfigError(
                f"{source}: 'cluster.{name}' must be a URL starting with {' or '.join(schemes)}"
            )
    return dict(table)


def load_config(path: Path) -> Limits:
    """Read and parse a config file; raises :class:`ConfigError` if unreadable or invalid."""
    return load_settings(path).limits


def load_settings(path: Path) -> Settings:
    """Read and parse a config file; raises :class:`ConfigError` if unreadable or invalid."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path.name}: {exc.strerror}") from None
    return parse_settings(data, source=path.name)
