"""``bastion verify``: marking verified takes a real comparison (typed number or scanned code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ServerProcess
from tests.test_cli import bastion, befriend, register
from tests.test_devices import replace_account_on_server

pytestmark = pytest.mark.network


def trust_of(profile: Path, user: str) -> tuple[str, str]:
    """(trust state, safety number) as ``bastion verify USER --json`` reports them."""
    out = json.loads(bastion("verify", user, "--json", "--profile", str(profile)).stdout)
    return out["trust"], out["safety_number"]


def test_confirm_with_the_number_read_out_marks_verified_and_a_wrong_one_changes_nothing(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = register(server, "alice", tmp_path)
    bob = register(server, "bob", tmp_path)
    befriend(alice, "alice", bob, "bob")
    state, number = trust_of(alice, "bob")
    assert state == "unverified"
    # Bob reads out what his side shows; it is the same number.
    assert trust_of(bob, "alice")[1] == number

    last = number[-1]
    wrong = number[:-1] + str((int(last) + 1) % 10)
    refused = bastion("verify", "bob", "--confirm", wrong, "--profile", str(alice), check=False)
    assert refused.returncode != 0
    assert "not the safety number with bob" in refused.stderr
    assert "nothing was marked verified" in refused.stderr
    assert trust_of(alice, "bob")[0] == "unverified"

    short = bastion("verify", "bob", "--confirm", "12345", "--profile", str(alice), check=False)
    assert short.returncode != 0
    assert "60 digits" in short.stderr
    assert trust_of(alice, "bob")[0] == "unverified"

    gone = bastion("verify", "bob", "--mark-verified", "--profile", str(alice), check=False)
    assert gone.returncode != 0  # the one-click way no longer exists
    assert trust_of(alice, "bob")[0] == "unverified"

    ok = bastion("verify", "bob", "--confirm", number, "--profile", str(alice))  # with spaces
    assert "matches: bob is verified" in ok.stdout
    assert trust_of(alice, "bob")[0] == "verified"
    # Bob types it without spaces.
    bastion("verify", "alice", "--confirm", number.replace(" ", ""), "--profile", str(bob))
    assert trust_of(bob, "alice")[0] == "verified"


def test_qr_image_of_the_other_side_marks_verified_and_another_users_code_is_refused(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = register(server, "alice", tmp_path)
    bob = register(server, "bob", tmp_path)
    carol = register(server, "carol", tmp_path)
    befriend(alice, "alice", bob, "bob")
    befriend(carol, "carol", alice, "alice")

    carols_code = tmp_path / "carol.png"
    bastion("verify", "alice", "--qr", str(carols_code), "--profile", str(carol))
    refused = bastion(
        "verify", "bob", "--qr-image", str(carols_code), "--profile", str(alice), check=False
    )
    assert refused.returncode != 0
    assert "not the one bob would show for you" in refused.stderr
    assert trust_of(alice, "bob")[0] == "unverified"

    # Alice's own code for bob, shown back to her, is not bob's either (direction matters).
    own_code = tmp_path / "alice-own.png"
    bastion("verify", "bob", "--qr", str(own_code), "--profile", str(alice))
    mirrored = bastion(
        "verify", "bob", "--qr-image", str(own_code), "--profile", str(alice), check=False
    )
    assert mirrored.returncode != 0
    assert trust_of(alice, "bob")[0] == "unverified"

    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    unreadable = bastion(
        "verify", "bob", "--qr-image", str(not_an_image), "--profile", str(alice), check=False
    )
    assert unreadable.returncode != 0
    assert "not an image" in unreadable.stderr

    # Bob's code, as a phone photo would be: a JPEG, scaled and with a margin around it.
    bobs_code = tmp_path / "bob.png"
    bastion("verify", "alice", "--qr", str(bobs_code), "--profile", str(bob))
    photo = tmp_path / "photo-of-bobs-screen.jpg"
    with Image.open(bobs_code) as shown:
        code = shown.convert("L")
        canvas = Image.new("L", (code.width * 2, code.height * 2), color=235)
        canvas.paste(code.resize((code.width * 3 // 2, code.height * 3 // 2)), (40, 60))
        canvas.save(photo, quality=80)
    ok = bastion("verify", "bob", "--qr-image", str(photo), "--profile", str(alice))
    assert "QR code matches: bob is verified" in ok.stdout
    assert trust_of(alice, "bob")[0] == "verified"


def test_confirm_while_a_key_change_waits_is_refused_and_marks_nothing(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = register(server, "alice", tmp_path)
    bob = register(server, "bob", tmp_path)
    befriend(alice, "alice", bob, "bob")
    bastion("send", "bob", "before", "--profile", str(alice))
    bastion("inbox", "--profile", str(bob))
    server.stop()
    replace_account_on_server(server, "alice")
    server.start()
    register(server, "alice", tmp_path / "reinstalled")
    bastion("send", "alice", "who are you?", "--profile", str(bob), check=False)  # sees it
    state, new_number = trust_of(bob, "alice")
    assert state == "changed"
    refused = bastion(
        "verify", "alice", "--confirm", new_number, "--profile", str(bob), check=False
    )
    assert refused.returncode != 0
    assert "key changed: nothing was marked verified" in refused.stderr
    assert trust_of(bob, "alice")[0] == "changed"
