"""The errors a newcomer meets first: one sentence each, saying what to do next.

Real server processes on real ports, the real ``bastion`` command in a child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.crypto import linking
from tests.conftest import PASSPHRASE, ServerProcess, free_port
from tests.test_cli import bastion, befriend, register

pytestmark = pytest.mark.network


def only_error_line(stderr: str) -> str:
    """The one ``error:`` line (servers also log JSON lines to standard error)."""
    assert "Traceback" not in stderr
    [line] = [x for x in stderr.splitlines() if x.startswith("error:")]
    return line


def test_no_server_at_the_address_asks_whether_it_is_running(tmp_path: Path) -> None:
    url = f"wss://127.0.0.1:{free_port()}"
    result = bastion(
        "register", "alice", "--server", url, "--profile", str(tmp_path / "a"), check=False
    )
    assert result.returncode == 1
    assert result.stderr == f"error: cannot reach {url}: is the server running?\n"


def test_a_port_in_use_is_named_in_one_sentence(server: ServerProcess, tmp_path: Path) -> None:
    result = bastion(
        "server", "run", "--data", str(tmp_path / "second"), "--port", str(server.port), check=False
    )
    assert result.returncode == 1
    assert only_error_line(result.stderr) == (
        f"error: port {server.port} on 127.0.0.1 is already in use (another server?); "
        "stop what listens there or choose another port with --port"
    )


def test_a_second_server_on_the_same_data_folder_is_refused(server: ServerProcess) -> None:
    result = bastion(
        "server", "run", "--data", str(server.data_dir), "--port", str(free_port()), check=False
    )
    assert result.returncode == 1
    assert only_error_line(result.stderr) == (
        f"error: another server is already using {server.data_dir}; stop it first, "
        "or give this one its own folder with --data"
    )
    assert server.proc is not None
    assert server.proc.poll() is None  # the first one runs on


@pytest.mark.parametrize("given", ["SHA256:" + "ab" * 32, "not-a-fingerprint"])
def test_a_wrong_or_malformed_fingerprint_names_the_real_one(
    server: ServerProcess, tmp_path: Path, given: str
) -> None:
    expected = f"the server's certificate is {server.fingerprint}, not the fingerprint you gave"
    commands = [
        ["register", "alice"],
        ["link", linking.new_code()],
    ]
    for command in commands:
        result = bastion(
            *command,
            "--server",
            server.url,
            "--fingerprint",
            given,
            "--profile",
            str(tmp_path / "p"),
            check=False,
        )
        assert result.returncode == 1
        assert expected in only_error_line(result.stderr)
        assert "intercepting" not in result.stderr
        assert not (tmp_path / "p" / "profile.json").exists()


def test_a_link_code_whose_device_stopped_waiting_says_to_link_again(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = register(server, "alice", tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_PASSPHRASE"] = PASSPHRASE
    showing = subprocess.Popen(
        [sys.executable, "-m", "bastion", "devices", "link", "--json", "--profile", str(alice)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert showing.stdout is not None
        code = json.loads(showing.stdout.readline())["code"]
    finally:
        showing.kill()
        showing.communicate()
    result = bastion(
        "link",
        code,
        "--server",
        server.url,
        "--fingerprint",
        server.fingerprint,
        "--profile",
        str(tmp_path / "laptop"),
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == (
        "error: the device that showed this code is no longer waiting; "
        "run 'bastion devices link' again on it and use the new code\n"
    )


@pytest.mark.parametrize(
    ("command", "hint"),
    [
        (["file", "get", "nosuch"], "(see: bastion file list --profile {dir})"),
        (["inbox"], "(bastion contacts accept alice --profile {dir})"),
        (["verify", "alice"], "bastion verify alice --confirm NUMBER --profile {dir}"),
    ],
)
def test_hints_carry_the_profile_they_were_given(
    server: ServerProcess,
    tmp_path: Path,
    command: list[str],
    hint: str,
) -> None:
    alice = register(server, "alice", tmp_path)
    bob = register(server, "bob", tmp_path)
    bastion("contacts", "add", "bob", "--profile", str(alice))
    result = bastion(*command, "--profile", str(bob), check=False)
    assert hint.format(dir=bob) in result.stdout + result.stderr


def test_history_fetches_first_and_says_when_it_may_be_stale(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = register(server, "alice", tmp_path)
    bob = register(server, "bob", tmp_path)
    befriend(alice, "alice", bob, "bob")
    bastion("send", "bob", "waiting for you", "--profile", str(alice))
    shown = bastion("history", "alice", "--profile", str(bob)).stdout
    assert shown.count("alice: waiting for you") == 1
    assert bastion("inbox", "--profile", str(bob)).stdout == ""  # not printed twice later
    listed = bastion("contacts", "list", "--profile", str(bob)).stdout
    assert listed.startswith("alice  accepted")
    (tmp_path / "report.txt").write_text("quarterly numbers\n")
    bastion("file", "send", "bob", str(tmp_path / "report.txt"), "--profile", str(alice))
    files = bastion("file", "list", "--profile", str(bob)).stdout
    assert files.count("'report.txt'") == 1  # the offer was picked up and listed once
    assert bastion("inbox", "--profile", str(bob)).stdout == ""
    server.stop()
    stale = bastion("history", "alice", "--profile", str(bob))
    assert "alice: waiting for you" in stale.stdout
    assert stale.stderr == (
        f"warning: cannot reach {server.url}: is the server running? "
        "(showing what this device knows; it may be stale)\n"
    )
