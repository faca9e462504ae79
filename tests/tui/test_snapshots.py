"""SVG snapshots of the app's main screens at 80x24, compared with the checked-in ones.

The profile is real (registered on a real server, contacts accepted there) and
its history is seeded with fixed times, so the pictures do not change from run to
run. Update them after a deliberate change with ``--snapshot-update``.
"""

from __future__ import annotations

import asyncio
import datetime
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Button, Static

from bastion.client import Client
from bastion.crypto.safety import safety_number
from bastion.tui.app import ChatApp
from bastion.tui.verify_screens import VerifyScreen
from tests.conftest import PASSPHRASE, Profiles, ServerProcess, free_port
from tests.tui.support import FIXED_NOW, chat_screen, online, pin, seed_history, wait_until

pytestmark = pytest.mark.network

SnapCompare = Callable[..., bool]


async def _seed(root: Path, server: ServerProcess) -> Path:
    profiles = Profiles(root, server)
    try:
        alice = await profiles.register("alice")
        keys = {}
        for name in ("bob", "carol", "dave"):
            other = await profiles.register(name)
            keys[name] = other.identity().public_bytes
            await profiles.befriend(name, "alice")
    finally:
        await profiles.close()
    alice = Client.open(profiles.path("alice"), PASSPHRASE)
    try:
        pin(alice, "bob", "verified", key=keys["bob"])
        pin(alice, "carol", "unverified", key=keys["carol"])
        pin(alice, "dave", "changed", key=keys["dave"])
        hour = 3_600_000
        seed_history(
            alice,
            "dave",
            [("in", "see you at the station"), ("out", "ok")],
            start_ms=FIXED_NOW - 50 * hour,
        )
        seed_history(
            alice,
            "carol",
            [("in", "did the slides arrive?"), ("out", "yes, thanks!")],
            start_ms=FIXED_NOW - 26 * hour,
        )
        seed_history(
            alice,
            "bob",
            [
                ("in", "are we still on for lunch?"),
                ("out", "yes! 12:30 at the usual place"),
                ("in", "great. I'll bring the notes from Tuesday"),
                ("out", "perfect, see you there"),
            ],
            start_ms=FIXED_NOW - 2 * hour,
            step_ms=7 * 60_000,
        )
    finally:
        await alice.close()
    return profiles.path("alice")


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One server for the module, and alice's profile on it, seeded once."""
    root = tmp_path_factory.mktemp("snapshots")
    server = ServerProcess(root / "server", free_port())
    server.start()
    try:
        yield asyncio.run(_seed(root, server))
    finally:
        server.kill()


@pytest.fixture
def alice_profile(seeded: Path, tmp_path: Path) -> Path:
    """A copy of alice's profile: three accepted contacts (verified, unverified, changed)."""
    copy = tmp_path / "alice"
    shutil.copytree(seeded, copy)
    return copy


def chat_app(path: Path, *, passphrase: str | None = PASSPHRASE) -> ChatApp:
    return ChatApp(path, passphrase=passphrase, clock=lambda: FIXED_NOW, tz=datetime.UTC)


async def signed_in(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, ChatApp)
    await wait_until(pilot, lambda: online(app), what="sign-in")
    await pilot.pause(0.2)


def test_main_screen(snap_compare: SnapCompare, alice_profile: Path) -> None:
    """The conversation with a verified contact, the list with the others."""
    assert snap_compare(chat_app(alice_profile), run_before=signed_in)


def test_key_changed_conversation(snap_compare: SnapCompare, alice_profile: Path) -> None:
    """A contact whose key changed: red bar that says what to do, input blocked."""

    async def open_dave(pilot: Pilot[Any]) -> None:
        await signed_in(pilot)
        assert isinstance(pilot.app, ChatApp)
        chat_screen(pilot.app).open_conversation("dave")
        await pilot.pause(0.2)

    assert snap_compare(chat_app(alice_profile), run_before=open_dave)


def test_key_change_screen(snap_compare: SnapCompare, alice_profile: Path) -> None:
    """The screen that explains a key change and offers to accept it."""

    async def review(pilot: Pilot[Any]) -> None:
        await signed_in(pilot)
        assert isinstance(pilot.app, ChatApp)
        chat_screen(pilot.app).open_conversation("dave")
        await pilot.press("ctrl+t")
        await pilot.pause(0.2)
        # The number depends on alice's random key: a fixed stand-in keeps the picture
        # stable (tests/tui/test_app.py checks the real number is shown).
        pilot.app.screen.query_one("#new-safety-number", Static).update(
            "Safety number with dave's NEW key:\n"
            "12345 67890 12345 67890\n12345 67890 12345 67890\n12345 67890 12345 67890\n"
            "Fingerprint: 0123-4567-89ab-cdef-0123\n"
        )
        await pilot.pause(0.2)

    assert snap_compare(chat_app(alice_profile), run_before=review)


async def verify_carol(pilot: Pilot[Any]) -> None:
    """Open the verify dialog on a fixed safety number (real keys differ from run to run)."""
    await signed_in(pilot)
    number = safety_number("alice", bytes(range(32)), "carol", bytes(range(32, 64)))
    pilot.app.push_screen(VerifyScreen("carol", number, verified=False, confirm=lambda _: None))
    await pilot.pause(0.2)


def test_verify_dialog(snap_compare: SnapCompare, alice_profile: Path) -> None:
    """Verifying at 80x24: the number, the five-digit field, and every button on screen."""

    async def verify(pilot: Pilot[Any]) -> None:
        await verify_carol(pilot)
        width, height = pilot.app.size
        buttons = list(pilot.app.screen.query(Button))
        assert len(buttons) == 4
        for button in buttons:
            assert button.region.right <= width
            assert 0 < button.region.bottom <= height

    assert snap_compare(chat_app(alice_profile), run_before=verify)


def test_qr_screen(snap_compare: SnapCompare, alice_profile: Path) -> None:
    """The QR code for the other side to photograph, whole at 80x24."""

    async def show_qr(pilot: Pilot[Any]) -> None:
        await verify_carol(pilot)
        await pilot.click("#qr")
        await pilot.pause(0.2)

    assert snap_compare(chat_app(alice_profile), run_before=show_qr)


def test_help_screen(snap_compare: SnapCompare, alice_profile: Path) -> None:
    """Every key, after pressing ``?``."""

    async def ask(pilot: Pilot[Any]) -> None:
        await signed_in(pilot)
        await pilot.press("question_mark")
        await pilot.pause(0.2)

    assert snap_compare(chat_app(alice_profile), run_before=ask)


def test_unlock_screen(snap_compare: SnapCompare, alice_profile: Path) -> None:
    """Starting without BASTION_PASSPHRASE asks for it."""
    assert snap_compare(chat_app(alice_profile, passphrase=None))


def test_first_run_screen(snap_compare: SnapCompare, tmp_path: Path) -> None:
    """No profile yet: register or link in two fields (plus the passphrase, if not given)."""
    assert snap_compare(chat_app(tmp_path / "new", passphrase=None))
