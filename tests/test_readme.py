"""The README's quickstart, run as written: its ``sh`` blocks, in order, against a real server.

Only what ties the README to one machine is rewritten: the server address (the
test server's port), and ``var`` (a link to the test server's data folder). The
``--profile ./alice`` folders are made in a temporary working folder. ``listen``
stays connected until Ctrl+C, so it runs for a few seconds and gets SIGINT.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, ServerProcess

pytestmark = pytest.mark.network

README_URL = "wss://127.0.0.1:8443"
LISTEN_S = 6


def quickstart_blocks(readme: str) -> list[str]:
    """The ``sh`` code blocks of the Quickstart section, in order."""
    section = readme.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)


def script_for(blocks: list[str], server: ServerProcess) -> tuple[str, list[str]]:
    """One bash script that stops at the first failing step, and the steps it runs."""
    steps = []
    for block in blocks:
        for raw in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", raw).strip()  # drop the README's comments
            if line:
                steps.append(line)
    body = ["set -euo pipefail"]
    for number, step in enumerate(steps):
        command = step.replace(README_URL, server.url)
        if command.startswith("bastion listen"):
            command = f"timeout --preserve-status -s INT {LISTEN_S} {command} > listen.out"
        body += [f"echo {number} > step", command]
    body.append("echo done > step")
    return "\n".join(body) + "\n", steps


def test_the_readme_quickstart_runs_as_written(server: ServerProcess, tmp_path: Path) -> None:
    blocks = quickstart_blocks((REPO / "README.md").read_text())
    script, steps = script_for(blocks, server)
    assert any(s.startswith("bastion send bob") for s in steps)
    first_send = next(i for i, s in enumerate(steps) if s.startswith("bastion send"))
    accept = next(i for i, s in enumerate(steps) if s.startswith("bastion contacts accept"))
    assert accept < first_send, "the README must make contacts before the first message"

    work = tmp_path / "work"
    (work / "bin").mkdir(parents=True)
    wrapper = work / "bin" / "bastion"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m bastion "$@"\n')
    wrapper.chmod(0o755)
    (work / "var").symlink_to(server.data_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["PATH"] = f"{work / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONPATH"] = str(REPO / "src")
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    reached = (work / "step").read_text().strip() if (work / "step").exists() else "none"
    failed_step = steps[int(reached)] if reached.isdigit() else reached
    assert result.returncode == 0, f"README step failed: {failed_step}\n{result.stderr}"
    assert reached == "done"

    out = result.stdout
    assert "registered alice" in out
    assert "it's alice from work" in out  # bob's contact list shows the request's note
    assert "stored on the server for bob" in out
    assert "alice: hello bob" in out  # bob's inbox
    assert out.count("alice: hello bob") == 2  # once from inbox, once from history
    assert "NOT SENT" not in out
    assert "error" not in result.stderr
    listened = [json.loads(line) for line in (work / "listen.out").read_text().splitlines()]
    assert {"type": "presence", "user": "alice"}.items() <= listened[0].items()
