"""The server config file: strict parsing, clear errors, and a server that refuses a bad one."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.errors import ConfigError
from bastion.server.config import Limits, parse_config, parse_settings
from tests.conftest import REPO, free_port


def test_absent_keys_keep_their_safe_defaults() -> None:
    limits = parse_config(b"[limits]\nmessages_burst = 7\ntls_handshake_timeout_s = 2\n")
    assert limits.messages_burst == 7
    assert limits.tls_handshake_timeout_s == 2.0
    assert limits.max_frame_bytes == Limits().max_frame_bytes
    assert parse_config(b"") == Limits()


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[limits]\nmesages_burst = 3\n", "limits.mesages_burst"),
        ("[limitz]\nmessages_burst = 3\n", "limitz"),
        ("messages_burst = 3\n", "messages_burst"),
        ('[limits]\nmessages_burst = "lots"\n', "limits.messages_burst"),
        ("[limits]\nmessages_burst = 2.5\n", "limits.messages_burst"),
        ("[limits]\nmessages_burst = true\n", "limits.messages_burst"),
        ("[limits]\nsignin_timeout_s = 0\n", "limits.signin_timeout_s"),
        ("[limits]\nsignin_timeout_s = -1.0\n", "limits.signin_timeout_s"),
        ("[limits]\nsignin_timeout_s = nan\n", "limits.signin_timeout_s"),
        ("[limits]\nmax_frame_bytes = [1]\n", "limits.max_frame_bytes"),
        ("limits = 3\n", "limits"),
        ("[limits\n", "TOML"),
    ],
)
def test_bad_config_is_a_clear_error_naming_the_key(text: str, names: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text.encode(), source="bastion.toml")
    assert names in str(caught.value)
    assert str(caught.value).startswith("bastion.toml:")


def test_a_cluster_node_reads_its_database_and_bus_from_the_config_file() -> None:
    settings = parse_settings(
        b'[cluster]\ndb = "postgresql://bastion@db.internal/bastion?schema=chat"\n'
        b'bus = "rediss://redis.internal:6380/0"\n[limits]\nmessages_burst = 7\n'
    )
    assert settings.db == "postgresql://bastion@db.internal/bastion?schema=chat"
    assert settings.bus == "rediss://redis.internal:6380/0"
    assert settings.limits.messages_burst == 7
    alone = parse_settings(b"[limits]\nmessages_burst = 7\n")
    assert (alone.db, alone.bus) == (None, None)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('[cluster]\ndb = "mysql://root:hunter2@db/chat"\n', "cluster.db"),
        ('[cluster]\nbus = "http://user:hunter2@redis:6379"\n', "cluster.bus"),
        ("[cluster]\ndb = 5432\n", "cluster.db"),
        ('[cluster]\ndatabase = "postgresql://db/chat"\n', "cluster.database"),
        ('cluster = "postgresql://db/chat"\n', "cluster"),
    ],
)
def test_a_bad_cluster_setting_is_named_and_its_secret_is_not_echoed(text: str, names: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(text.encode(), source="bastion.toml")
    assert names in str(caught.value)
    assert "hunter2" not in str(caught.value)


def _run_server(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "bastion", "server", "run", "--data", str(data_dir)),
            *("--port", str(free_port()), *extra),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )


def test_server_refuses_to_start_with_a_bad_config_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "bastion.toml").write_text("[limits]\nmessages_per_secnod = 5\n")
    result = _run_server(data)
    assert result.returncode != 0
    assert "limits.messages_per_secnod" in result.stderr
    assert "listening" not in result.stdout


def test_server_reads_the_config_given_with_dash_dash_config(tmp_path: Path) -> None:
    config = tmp_path / "strict.toml"
    config.write_text("[limits]\nheartbeat_idle_s = 'soon'\n")
    result = _run_server(tmp_path / "data", "--config", str(config))
    assert result.returncode != 0
    assert "strict.toml" in result.stderr
    assert "limits.heartbeat_idle_s" in result.stderr


@given(st.binary(max_size=512) | st.text(max_size=512))
@settings(max_examples=300, deadline=None)
def test_only_config_errors_escape_the_parser(data: bytes | str) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(data)


@given(
    st.dictionaries(
        st.sampled_from([f.name for f in dataclasses.fields(Limits)]),
        st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.booleans() | st.text(max_size=5),
        max_size=6,
    )
)
@settings(max_examples=200, deadline=None)
def test_known_keys_with_any_value_parse_or_fail_cleanly(values: dict[str, object]) -> None:
    text = "[limits]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())
    try:
        limits = parse_config(text)
    except ConfigError:
        return
    for key, value in values.items():
        assert getattr(limits, key) == value


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)
