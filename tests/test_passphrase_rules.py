"""New profiles: passphrases under 10 characters are refused, easy ones warned about."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.client import weakness
from bastion.client.passphrase import MIN_PASSPHRASE_CHARS
from bastion.client.profile import Profile
from bastion.crypto.atrest import KdfParams
from bastion.errors import ProfileError
from tests.conftest import PASSPHRASE, ServerProcess
from tests.test_cli import bastion

FAST = KdfParams(memory_kib=19 * 1024, iterations=2, lanes=1)  # the safe minimum


def test_a_new_profile_needs_ten_characters(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="at least 10 characters"):
        Profile.create(tmp_path / "short", "x" * (MIN_PASSPHRASE_CHARS - 1), params=FAST)
    assert not (tmp_path / "short" / "profile.json").exists()
    Profile.create(tmp_path / "ok", "x" * MIN_PASSPHRASE_CHARS, params=FAST).close()


def test_guessable_passphrases_are_named_and_good_ones_are_not() -> None:
    assert weakness(PASSPHRASE) is None
    assert weakness("a long passphrase") is None  # the README's example
    weak = weakness("password1234")
    assert weak is not None
    assert weak.startswith("this passphrase is easy to guess")
    assert weakness("alice-alice-alice", user_inputs=["alice"]) is not None


@pytest.mark.network
def test_register_refuses_a_short_passphrase_and_warns_on_a_weak_one(
    server: ServerProcess, tmp_path: Path
) -> None:
    def register(name: str, passphrase: str) -> tuple[int, str]:
        result = bastion(
            "register",
            name,
            "--server",
            server.url,
            "--fingerprint",
            server.fingerprint,
            "--profile",
            str(tmp_path / name),
            passphrase=passphrase,
            check=False,
        )
        return result.returncode, result.stderr

    code, err = register("alice", "hunter2")
    assert (code, err) == (
        1,
        "error: the passphrase must be at least 10 characters long; "
        "a few unrelated words are easy to remember and hard to guess\n",
    )
    assert not (tmp_path / "alice").exists() or not any((tmp_path / "alice").iterdir())

    code, err = register("bob", "password1234")
    assert code == 0
    assert err.startswith("warning: this passphrase is easy to guess")
