"""``bastion contacts``, ``bastion presence`` and ``listen --json`` as a user runs them."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PASSPHRASE, ServerProcess
from tests.test_cli import bastion, register

pytestmark = pytest.mark.network


class Listener:
    """``bastion listen --json`` in the background, read line by line."""

    def __init__(self, profile: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        env["BASTION_PASSPHRASE"] = PASSPHRASE
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bastion", "listen", "--json", "--profile", str(profile)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.buffer = b""

    def next(self, kind: str, *, wait_s: float = 15.0) -> dict[str, Any]:
        """The next printed event of ``kind`` (others are skipped)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + wait_s
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                event: dict[str, Any] = json.loads(line)
                if event["type"] == kind:
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} event within {wait_s} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise AssertionError("listen exited")
                self.buffer += chunk

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            assert self.proc.wait(timeout=10) == 0
        finally:
            self.proc.kill()
            self.proc.communicate()


def lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_contacts_and_presence_from_the_command_line(server: ServerProcess, tmp_path: Path) -> None:
    alice = register(server, "alice", tmp_path)
    bob = register(server, "bob", tmp_path)
    bob_listens = Listener(bob)
    alice_listens: Listener | None = None
    try:
        time.sleep(1.0)  # let it sign in and watch
        added = bastion(
            "contacts", "add", "bob", "--note", "hi, it's Alice", "--json", "--profile", str(alice)
        )
        assert lines(added) == [{"type": "contact", "user": "bob", "state": "pending-out"}]
        request = bob_listens.next("contact_request")
        assert (request["from"], request["note"]) == ("alice", "hi, it's Alice")
        assert request["at"].endswith("Z")

        refused = bastion("send", "bob", "let me in", "--profile", str(alice), check=False)
        assert refused.returncode == 1
        assert "has not accepted you" in refused.stderr

        listed = lines(bastion("contacts", "list", "--json", "--profile", str(bob)))
        assert [(c["user"], c["state"], c["note"]) for c in listed] == [
            ("alice", "pending-in", "hi, it's Alice")
        ]
        bastion("contacts", "accept", "alice", "--profile", str(bob))

        alice_listens = Listener(alice)
        online = bob_listens.next("presence")
        assert (online["user"], online["state"], online["status"]) == ("alice", "online", None)
        bastion("presence", "set", "away", "--status", "back at 3", "--profile", str(alice))
        away = bob_listens.next("presence")
        assert (away["user"], away["state"], away["status"]) == ("alice", "away", "back at 3")
        assert set(away) == {"type", "user", "state", "status", "at"}

        listed = lines(bastion("contacts", "list", "--json", "--profile", str(bob)))
        assert [(c["user"], c["state"], c["presence"]) for c in listed] == [
            ("alice", "accepted", "away")
        ]
        shown = lines(bastion("presence", "--json", "--profile", str(alice)))
        assert shown[0] == {"type": "presence_self", "state": "away", "status": "back at 3"}

        bastion("contacts", "block", "alice", "--profile", str(bob))
        blocked = lines(bastion("contacts", "list", "--json", "--profile", str(bob)))
        assert [(c["user"], c["state"]) for c in blocked] == [("alice", "blocked")]
        assert lines(bastion("contacts", "list", "--json", "--profile", str(alice))) == []
    finally:
        bob_listens.stop()
        if alice_listens is not None:
            alice_listens.stop()
