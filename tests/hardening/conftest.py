"""Fixtures of the hardening tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hardening.harness import ConfiguredServers


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ConfiguredServers]:
    """Configured servers, killed at the end of the test."""
    factory = ConfiguredServers(tmp_path)
    yield factory
    for server in factory.started:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()
