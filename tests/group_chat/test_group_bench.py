"""The group benchmark runs end to end on a small group and reports every delivery.

Numbers are never asserted (they depend on the machine); what is checked is that
the run completes and every member's connection got every message.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.network

BENCH = Path(__file__).resolve().parents[2] / "bench" / "groups.py"


def test_the_group_benchmark_delivers_to_every_member() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--members", "6", "--messages", "2", "--json"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    result = json.loads(done.stdout)
    assert (result["members"], result["receivers"], result["messages"]) == (6, 5, 2)
    assert len(result["all_delivered_ms"]) == 2
    assert all(ms > 0 for ms in result["all_delivered_ms"])


def test_the_group_benchmark_refuses_unbounded_runs() -> None:
    for args in (["--members", "1001"], ["--messages", "0"], ["--timeout", "0"]):
        done = subprocess.run(
            [sys.executable, str(BENCH), *args], capture_output=True, timeout=60, check=False
        )
        assert done.returncode == 2, args
