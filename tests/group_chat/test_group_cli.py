"""``bastion group ...`` and ``bastion send --group`` as a user runs them: real processes."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerProcess
from tests.contacts.test_cli_contacts import Listener
from tests.test_cli import bastion, register

pytestmark = pytest.mark.network


def run_json(*args: str) -> list[dict[str, Any]]:
    """Run a command with ``--json``; every line of its output, parsed."""
    out = bastion(*args, "--json").stdout
    return [json.loads(line) for line in out.splitlines()]


def test_group_commands_from_create_to_leave(server: ServerProcess, tmp_path: Path) -> None:
    alice, bob, carol, dave = (
        register(server, name, tmp_path) for name in ("alice", "bob", "carol", "dave")
    )

    created = bastion("group", "create", "ops", "--members", "bob,carol", "--profile", str(alice))
    group_id = created.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", group_id)
    conversation = "group:" + group_id

    # Bob and Carol are not Alice's contacts: each has an invitation and joins.
    [invite] = run_json("group", "invites", "--profile", str(bob))
    assert (invite["type"], invite["group"], invite["name"], invite["by"]) == (
        "group_invite",
        group_id,
        "ops",
        "alice",
    )
    assert invite["members"] == 3
    joined = run_json("group", "accept", "ops", "--profile", str(bob))
    assert {"type": "group_change", "change": "create", "by": "alice"}.items() <= next(
        e for e in joined if e["type"] == "group_change"
    ).items()
    assert joined[-1]["members"] == ["alice", "bob", "carol"]
    assert "joined ops" in bastion("group", "accept", group_id[:10], "--profile", str(carol)).stdout
    assert run_json("group", "invites", "--profile", str(bob)) == []

    [sent] = run_json("send", "--group", "ops", "hello ops", "--profile", str(alice))
    assert (sent["type"], sent["conversation"]) == ("sent", conversation)

    inbox = run_json("inbox", "--profile", str(bob))
    [message] = [e for e in inbox if e["type"] == "message"]
    assert (message["from"], message["text"], message["conversation"]) == (
        "alice",
        "hello ops",
        conversation,
    )

    # Dave joins and is made an admin; Carol is removed. GROUP may be a unique id prefix.
    bastion("group", "add", "ops", "dave", "--profile", str(alice))
    bastion("group", "admin", group_id[:12], "dave", "--grant", "--profile", str(alice))
    [after] = run_json("group", "remove", "ops", "carol", "--profile", str(alice))
    assert (after["members"], after["admins"]) == (["alice", "bob", "dave"], ["alice", "dave"])

    carol_inbox = run_json("inbox", "--profile", str(carol))
    assert [e["type"] for e in carol_inbox if e["type"] == "message"] == ["message"]
    removed = [e for e in carol_inbox if e.get("change") == "remove_member"]
    assert [(e["by"], e["user"], e["conversation"]) for e in removed] == [
        ("alice", "carol", conversation)
    ]

    # Dave finds the invitation in his inbox, joins, renames it, writes under the new name.
    [dave_invite] = run_json("inbox", "--profile", str(dave))
    assert (dave_invite["type"], dave_invite["by"]) == ("group_invite", "alice")
    bastion("group", "accept", "ops", "--profile", str(dave))
    bastion("group", "rename", "ops", "ops-2", "--profile", str(dave))
    bastion("send", "--group", "ops-2", "renamed", "--profile", str(dave))

    # Alice still knows it as "ops"; info catches up with the chain (and reports the rename).
    info_lines = run_json("group", "info", "ops", "--profile", str(alice))
    assert [e["change"] for e in info_lines if e["type"] == "group_change"] == ["rename"]
    [info] = [e for e in info_lines if e["type"] == "group"]
    assert (info["group"], info["name"], info["conversation"]) == (group_id, "ops-2", conversation)
    assert (info["members"], info["admins"]) == (["alice", "bob", "dave"], ["alice", "dave"])
    assert sorted(info["devices"]) == ["alice", "bob", "dave"]
    assert all(len(ids) == 1 for ids in info["devices"].values())
    text_info = bastion("group", "info", "ops-2", "--profile", str(alice)).stdout
    assert "dave (admin)" in text_info
    assert "bob (member)" in text_info

    # Bob leaves; his list still shows the group as he last saw it, without him.
    run_json("inbox", "--profile", str(bob))
    bastion("group", "leave", "ops-2", "--profile", str(bob))
    [bobs] = run_json("group", "list", "--profile", str(bob))
    assert (bobs["group"], bobs["members"]) == (group_id, ["alice", "dave"])
    alice_inbox = run_json("inbox", "--profile", str(alice))
    assert [(e["from"], e["text"]) for e in alice_inbox if e["type"] == "message"] == [
        ("dave", "renamed")
    ]
    leaves = [(e["by"], e["name"]) for e in alice_inbox if e.get("change") == "leave"]
    assert leaves == [("bob", "ops-2")]
    plain = bastion("group", "list", "--profile", str(alice)).stdout
    assert re.fullmatch(rf"{group_id[:16]}  ops-2  \(2 members\)\n", plain)


def test_group_command_errors_are_plain(server: ServerProcess, tmp_path: Path) -> None:
    alice = register(server, "alice", tmp_path)
    register(server, "bob", tmp_path)
    [first] = run_json("group", "create", "team", "--profile", str(alice))
    second = bastion("group", "create", "team", "--members", "bob", "--profile", str(alice))
    # Bob has not joined: Alice's message goes out all the same (he gets no key).
    assert first["name"] == "team"
    assert first["members"] == ["alice"]

    ambiguous = bastion("send", "--group", "team", "hi", "--profile", str(alice), check=False)
    assert ambiguous.returncode == 1
    assert "several groups" in ambiguous.stderr
    by_id = run_json("send", "--group", second.stdout.strip(), "hi", "--profile", str(alice))
    assert by_id[0]["conversation"] == "group:" + second.stdout.strip()

    unknown = bastion("group", "info", "nope", "--profile", str(alice), check=False)
    assert unknown.returncode == 1
    assert "no group called 'nope'" in unknown.stderr
    undecided = bastion(
        "group", "admin", first["group"], "bob", "--profile", str(alice), check=False
    )
    assert undecided.returncode == 1
    assert "--grant or --revoke" in undecided.stderr
    not_admin = bastion(
        "group", "remove", first["group"], "alice", "--profile", str(alice), check=False
    )
    assert not_admin.returncode == 1
    assert "leave" in not_admin.stderr
    no_invite = bastion("group", "accept", "team", "--profile", str(alice), check=False)
    assert no_invite.returncode == 1
    assert "no invitation to a group called 'team'" in no_invite.stderr


def test_an_invitation_shows_in_listen_and_can_be_declined(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice, bob = (register(server, name, tmp_path) for name in ("alice", "bob"))
    bob_listens = Listener(bob)
    try:
        time.sleep(1.0)  # let it sign in
        group_id = bastion(
            "group", "create", "ops", "--members", "bob", "--profile", str(alice)
        ).stdout.strip()
        invite = bob_listens.next("group_invite")
        assert (invite["group"], invite["name"], invite["by"], invite["members"]) == (
            group_id,
            "ops",
            "alice",
            2,
        )
    finally:
        bob_listens.stop()
    plain = bastion("group", "invites", "--profile", str(bob)).stdout
    assert plain.startswith("alice invites you to the group 'ops' (2 members)")
    [declined] = run_json("group", "decline", group_id[:8], "--profile", str(bob))
    assert (declined["type"], declined["group"]) == ("group_declined", group_id)
    assert run_json("group", "invites", "--profile", str(bob)) == []
    bastion("send", "--group", "ops", "still there?", "--profile", str(alice))
    assert run_json("inbox", "--profile", str(bob)) == []
    again = bastion("group", "accept", "ops", "--profile", str(bob), check=False)
    assert again.returncode == 1
    assert "no invitation" in again.stderr
