"""Server settings and limits, with safe defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
    one_time_keys_low: int = 20
    one_time_keys_max: int = 200


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """Where the server keeps its data, where it listens, and its limits."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8443
    server_name: str = ""
    limits: Limits = field(default_factory=Limits)
