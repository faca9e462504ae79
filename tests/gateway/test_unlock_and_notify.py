"""Unlocking through the OS keyring (opt-in), and desktop notifications that show no content."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from bastion.gateway.notify import Notifier, notification_for
from tests.conftest import PASSPHRASE, ServerProcess
from tests.gateway.support import GatewayProcess, gateways
from tests.test_cli import bastion

KEYRING_ENV = {"PYTHON_KEYRING_BACKEND": "tests.gateway.file_keyring.FileKeyring"}


@pytest.mark.network
async def test_the_keyring_unlocks_the_gateway_only_when_asked_to(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = tmp_path / "alice"
    bastion(
        "register",
        "alice",
        "--server",
        server.url,
        "--fingerprint",
        server.fingerprint,
        "--profile",
        str(alice),
    )
    kept = tmp_path / "keyring.json"
    env = {**KEYRING_ENV, "TEST_KEYRING_FILE": str(kept)}

    with gateways(GatewayProcess(alice, "--keyring")) as (gw,):
        gw.start(env=env)  # first time: the passphrase from the environment, then kept
        assert gw.stop() == 0
    assert list(json.loads(kept.read_text()).values()) == [PASSPHRASE]

    with gateways(GatewayProcess(alice, "--keyring")) as (gw,):
        ready = gw.start(env=env, passphrase=None)  # no prompt, no variable: the keyring
        assert ready["type"] == "gateway_ready"
        assert gw.stop() == 0

    without = GatewayProcess(alice)  # not opted in: the keyring is never read
    with pytest.raises(RuntimeError, match="no passphrase"):
        without.start(env=env, passphrase=None, wait_s=20)

    broken = GatewayProcess(alice, "--keyring")
    no_keyring = {"PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
    with pytest.raises(RuntimeError, match="OS keyring cannot be read"):
        broken.start(env=no_keyring, passphrase=None, wait_s=20)


class Desktop:
    """Stands where the desktop's notification service stands: records what it was shown."""

    def __init__(self, *, fail: bool = False) -> None:
        self.shown: list[dict[str, Any]] = []
        self.fail = fail

    async def send(self, **fields: Any) -> str:
        if self.fail:
            raise ConnectionError("no notification service on this bus")
        self.shown.append(fields)
        return "id"


MESSAGE = {
    "type": "message",
    "id": "00" * 16,
    "from": "bob",
    "device": "dev",
    "conversation": "dm:alice,bob",
    "text": "the launch code is 0000",
    "sent_at": "2026-12-05T10:00:00.000Z",
    "verified": True,
}


async def test_notifications_name_who_and_never_show_the_text() -> None:
    desktop = Desktop()
    notifier = Notifier("alice", backend=desktop)  # type: ignore[arg-type]
    notifier.show(MESSAGE)
    notifier.show({**MESSAGE, "state": "sent", "from": "alice"})  # our own: no notification
    notifier.show({"type": "key_changed", "user": "bob", "at": "2026-12-05T10:00:00.000Z"})
    notifier.show({"type": "contact_request", "from": "carol", "note": "hi", "at": "x"})
    notifier.show({"type": "presence", "user": "bob", "state": "away", "status": None, "at": "x"})
    await asyncio.sleep(0.05)
    titles = [n["title"] for n in desktop.shown]
    assert titles == [
        "Bastion: bob",
        "Bastion: bob's key changed",
        "Bastion: contact request",
    ]
    assert all("launch code" not in json.dumps(n, default=str) for n in desktop.shown)
    assert desktop.shown[1]["urgency"].name == "Critical"
    await notifier.close()


async def test_a_desktop_without_notifications_turns_them_off_once() -> None:
    desktop = Desktop(fail=True)
    notifier = Notifier("alice", backend=desktop)  # type: ignore[arg-type]
    notifier.show(MESSAGE)
    await asyncio.sleep(0.05)
    assert notifier.enabled is False
    notifier.show(MESSAGE)
    await asyncio.sleep(0.05)
    assert desktop.shown == []
    await notifier.close()


def test_a_peer_name_cannot_forge_a_notification_line() -> None:
    found = notification_for({**MESSAGE, "from": "bob\n\u202eevil"})
    assert found is not None
    assert "\n" in found[0]  # the raw value; Notifier.show escapes it before the desktop sees it
