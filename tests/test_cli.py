"""The ``bastion`` command as a user runs it: real processes, real server, real profiles."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PASSPHRASE, ServerProcess

pytestmark = pytest.mark.network


def bastion(
    *args: str, passphrase: str | None = PASSPHRASE, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    if passphrase is not None:
        env["BASTION_PASSPHRASE"] = passphrase
    result = subprocess.run(
        [sys.executable, "-m", "bastion", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"bastion {args} failed: {result.stderr}")
    return result


def register(server: ServerProcess, name: str, root: Path) -> Path:
    profile = root / name
    bastion(
        "register",
        name,
        "--server",
        server.url,
        "--fingerprint",
        server.fingerprint,
        "--profile",
        str(profile),
    )
    return profile


def befriend(a: Path, a_name: str, b: Path, b_name: str) -> None:
    """``a`` asks ``b`` with a note; ``b`` sees the request in the inbox and accepts."""
    bastion("contacts", "add", b_name, "--note", "it's me", "--profile", str(a))
    inbox = bastion("inbox", "--json", "--profile", str(b)).stdout.splitlines()
    [request] = [json.loads(line) for line in inbox]
    assert (request["type"], request["from"], request["note"]) == (
        "contact_request",
        a_name,
        "it's me",
    )
    bastion("contacts", "accept", a_name, "--profile", str(b))


def test_fingerprint_command_prints_only_the_fingerprint(server: ServerProcess) -> None:
    out = bastion("server", "fingerprint", "--data", str(server.data_dir)).stdout
    assert re.fullmatch(r"SHA256:[0-9a-f]{64}\n", out)
    assert out.strip() == server.fingerprint
    assert re.search(rb"listening on wss://127\.0\.0\.1:\d+\n", server.stdout)


def test_register_send_inbox_history_json(server: ServerProcess, tmp_path: Path) -> None:
    alice = register(server, "alice", tmp_path)
    bob = register(server, "bob", tmp_path)
    befriend(alice, "alice", bob, "bob")

    sent = bastion("send", "bob", "hello from the cli", "--profile", str(alice), "--json")
    assert json.loads(sent.stdout)["type"] == "sent"

    inbox = bastion("inbox", "--json", "--profile", str(bob)).stdout.splitlines()
    [message] = [json.loads(line) for line in inbox]
    assert message["type"] == "message"
    assert message["from"] == "alice"
    assert message["text"] == "hello from the cli"
    assert message["conversation"] == "dm:alice,bob"
    assert message["verified"] is False
    assert re.fullmatch(r"[0-9a-f]{32}", message["id"])
    assert re.fullmatch(r"[a-z2-7]{16}", message["device"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", message["sent_at"])

    # Received and acknowledged: the next inbox is empty, history keeps it.
    assert bastion("inbox", "--json", "--profile", str(bob)).stdout == ""
    history = bastion("history", "alice", "--json", "--profile", str(bob)).stdout.splitlines()
    assert [json.loads(line)["text"] for line in history] == ["hello from the cli"]
    human = bastion("history", "bob", "--profile", str(alice)).stdout
    assert "you -> bob: hello from the cli" in human

    who = json.loads(bastion("whoami", "--json", "--profile", str(bob)).stdout)
    assert who["user"] == "bob"
    assert who["fingerprint"] == server.fingerprint


def test_listen_prints_live_messages_and_exits_cleanly_on_sigint(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = register(server, "alice", tmp_path)
    bob = register(server, "bob", tmp_path)
    befriend(alice, "alice", bob, "bob")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_PASSPHRASE"] = PASSPHRASE
    listener = subprocess.Popen(
        [sys.executable, "-m", "bastion", "listen", "--json", "--profile", str(bob)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        time.sleep(1.5)  # let it sign in; messages sent earlier would be delivered anyway
        bastion("send", "bob", "live one", "--profile", str(alice))
        assert listener.stdout is not None
        lines = iter(listener.stdout.readline, "")
        event = next(e for e in map(json.loads, lines) if e["type"] != "presence")
        assert event["text"] == "live one"
        listener.send_signal(signal.SIGINT)
        assert listener.wait(timeout=10) == 0
    finally:
        listener.kill()
        listener.communicate()


def test_errors_are_sentences_with_nonzero_exit(server: ServerProcess, tmp_path: Path) -> None:
    alice = register(server, "alice", tmp_path)

    wrong = bastion("whoami", "--profile", str(alice), passphrase="not it", check=False)
    assert wrong.returncode == 1
    assert wrong.stderr == "error: wrong passphrase for this profile\n"

    unknown = bastion("send", "nobody", "hi", "--profile", str(alice), check=False)
    assert unknown.returncode == 1
    assert "there is no user named nobody" in unknown.stderr

    missing = bastion("inbox", "--profile", str(tmp_path / "none"), check=False)
    assert missing.returncode == 1
    assert "register or link a device first" in missing.stderr

    bad_name = bastion(
        "register",
        "Bad Name",
        "--server",
        server.url,
        "--profile",
        str(tmp_path / "x"),
        check=False,
    )
    assert bad_name.returncode == 1
    assert "is not a valid username" in bad_name.stderr
    assert "Traceback" not in wrong.stderr + unknown.stderr + missing.stderr + bad_name.stderr


def test_a_wrong_fingerprint_at_register_names_the_real_one(
    server: ServerProcess, tmp_path: Path
) -> None:
    wrong_pin = "SHA256:" + "0" * 64
    result = bastion(
        "register",
        "alice",
        "--server",
        server.url,
        "--fingerprint",
        wrong_pin,
        "--profile",
        str(tmp_path / "alice"),
        check=False,
    )
    assert result.returncode == 1
    assert f"the server's certificate is {server.fingerprint}, not the fingerprint you gave" in (
        result.stderr
    )
    assert "intercepting" not in result.stderr  # that warning is for a pin that changed
    assert not (tmp_path / "alice" / "profile.json").exists()
