"""The relay benchmark runs end to end on a tiny load and reports what it measured.

Numbers are never asserted (they depend on the machine); what is checked is that
every message of the run arrives, the idle connections are held, and a cluster
whose database is absent is skipped with the reason rather than failing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.network

BENCH = Path(__file__).resolve().parents[1] / "bench" / "relay.py"


def test_the_benchmark_measures_one_node_and_skips_an_absent_cluster() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--deployments",
            "sqlite,cluster",
            "--postgres",
            "postgresql://postgres@127.0.0.1:1/none",
            "--pairs",
            "2",
            "--open-pairs",
            "3",
            "--rate",
            "50",
            "--window",
            "2",
            "--seconds",
            "1",
            "--warmup",
            "0.5",
            "--idle",
            "10",
            "--crypto-seconds",
            "0",
            "--json",
        ],
        capture_output=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b"cluster: skipped: PostgreSQL is not reachable" in done.stderr
    reports = json.loads(done.stdout)
    assert list(reports) == ["sqlite"]
    report = reports["sqlite"]
    assert [m["mode"] for m in report["modes"]] == ["closed", "open"]
    for mode in report["modes"]:
        assert mode["delivered"] > 0
        assert mode["missing"] == 0
        assert mode["errors"] == 0, mode["error_codes"]
        assert mode["server_cpu_us_per_msg"] > 0
    assert report["idle"]["connections"] == 10
    assert report["idle"]["errors"] == 0
    assert report["accounts"] == 2 * 3 + 10
