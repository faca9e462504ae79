"""``bastion chat`` is wired into the command line without loading Textual for other commands."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bastion.cli.chat import cmd_chat
from bastion.cli.main import build_parser, main


def test_chat_is_a_command_with_a_profile_option() -> None:
    args = build_parser().parse_args(["chat", "--profile", "somewhere"])
    assert args.sync is cmd_chat
    assert args.profile == "somewhere"


def test_an_empty_passphrase_variable_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BASTION_PASSPHRASE", "")
    assert main(["chat", "--profile", "nowhere"]) == 1
    assert "BASTION_PASSPHRASE is set but empty" in capsys.readouterr().err


def test_other_commands_do_not_load_textual() -> None:
    code = (
        "import sys; from bastion.cli.main import build_parser; build_parser(); "
        "print('textual' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
