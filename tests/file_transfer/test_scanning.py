"""Received files are scanned in quarantine: dangerous ones never reach the chosen folder."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from bastion.client import files
from tests.file_transfer.conftest import Pair, hostile_offer, next_offer
from tests.files.test_file_clamd import MARKER, SIGNATURE
from tests.files.test_file_scan import eicar, elf, make_zip, ooxml, pdf, png, zeros_zip

pytestmark = pytest.mark.network

Sample = tuple[str, str | None, Callable[[], bytes], str]

BLOCKED: list[Sample] = [
    ("readme.txt", "text/plain", eicar, "EICAR"),
    ("tool", None, elf, "Linux program"),
    ("report.docx", None, lambda: ooxml(macros=True), "VBA macros"),
    (
        "photos.zip",
        "application/zip",
        lambda: make_zip({"photos/view.js": b"WScript.Echo(1)"}),
        ".js",
    ),
    ("bomb.zip", None, lambda: zeros_zip("big.txt", 40 * 1024 * 1024), "archive bomb"),
    ("invoice\u202etxt.exe", None, lambda: b"hello", "right-to-left"),
    ("invoice.pdf.exe", None, lambda: b"hello", "double extension"),
]

CLEAN: list[Sample] = [
    ("paper.pdf", "application/pdf", pdf, ""),
    ("picture.png", "image/png", png, ""),
    ("notes.txt", "text/plain", lambda: b"just some notes\n", ""),
]


async def test_each_dangerous_file_is_quarantined_with_its_reason(pair: Pair) -> None:
    to = pair.folder("downloads")
    for name, mime, build, reason in BLOCKED:
        await hostile_offer(pair.alice, "bob", build(), name, mime)
        offer = await next_offer(pair.bob)
        result = await files.get_file(pair.bob, offer.id, to)
        assert result.saved_to is None, name
        assert result.record.state == "blocked", name
        assert any(reason in line for line in result.verdict.reasons), (name, result.verdict)
        assert files.find_file(pair.bob, offer.id).reasons == list(result.verdict.reasons)
        assert list(to.iterdir()) == [], name
    # Each one waits in quarantine: private, never executable, under a name without extension,
    # and sealed: the ciphertext, never the plaintext.
    held = pair.quarantine()
    assert len(held) == len(BLOCKED)
    for path in held:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert "." not in path.name
        assert path.name.startswith("sealed-")
    assert_no_plaintext(pair, [build() for _, _, build, _ in BLOCKED])
    states = {r.name: (r.state, r.verdict) for r in files.list_files(pair.bob)}
    assert states["invoicetxt.exe"] == ("blocked", "blocked")


def assert_no_plaintext(pair: Pair, contents: list[bytes]) -> None:
    """Nothing in the quarantine holds any of ``contents`` (or their first bytes) in clear."""
    for path in pair.quarantine():
        held = path.read_bytes()
        for data in contents:
            assert data[:32] not in held, (path.name, data[:32])


async def test_a_blocked_file_is_kept_encrypted_and_can_still_be_saved_anyway(pair: Pair) -> None:
    to = pair.folder("downloads")
    program = elf() + b"unique payload 5f1c0a"
    await hostile_offer(pair.alice, "bob", program, "tool", None)
    offer = await next_offer(pair.bob)
    first = await files.get_file(pair.bob, offer.id, to)
    assert first.record.state == "blocked"
    [held] = pair.quarantine()
    assert b"unique payload 5f1c0a" not in held.read_bytes()
    assert_no_plaintext(pair, [program])
    # The blob is gone from the server (downloaded): the sealed copy is what is kept.
    assert pair.blobs() == []
    # Scanning again (say, after a rule update) decrypts it again, and removes the plaintext.
    again = await files.get_file(pair.bob, offer.id, to)
    assert again.record.state == "blocked"
    assert pair.quarantine() == [held]
    saved = await files.get_file(pair.bob, offer.id, to, allow_blocked=True)
    assert saved.saved_to is not None
    assert saved.saved_to.read_bytes() == program
    assert pair.quarantine() == []


async def test_a_file_that_could_not_be_scanned_is_not_kept_in_clear(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(files.CLAMD_SOCKET_ENV, str(pair.root / "no-such.sock"))
    to = pair.folder("downloads")
    notes = b"private notes 77e0b2, not scanned yet\n"
    await hostile_offer(pair.alice, "bob", notes, "notes.txt", None)
    offer = await next_offer(pair.bob)
    result = await files.get_file(pair.bob, offer.id, to)
    assert result.record.state == "error"
    assert len(pair.quarantine()) == 1
    assert_no_plaintext(pair, [notes])
    monkeypatch.delenv(files.CLAMD_SOCKET_ENV)
    retried = await files.get_file(pair.bob, offer.id, to)
    assert retried.saved_to is not None
    assert retried.saved_to.read_bytes() == notes
    assert pair.quarantine() == []


async def test_clean_documents_are_saved(pair: Pair) -> None:
    to = pair.folder("downloads")
    for name, mime, build, _ in CLEAN:
        await hostile_offer(pair.alice, "bob", build(), name, mime)
        offer = await next_offer(pair.bob)
        result = await files.get_file(pair.bob, offer.id, to)
        assert result.verdict.is_clean, (name, result.verdict)
        assert result.saved_to == to / name
        assert result.saved_to.read_bytes() == build()
    assert pair.quarantine() == []


async def test_hostile_names_cannot_leave_the_chosen_folder(pair: Pair) -> None:
    to = pair.folder("deep") / "downloads"
    to.mkdir()
    for raw in ("../../etc/passwd", "/etc/passwd", "..\\..\\boot.ini.txt", "NUL.txt", "a\x00b.txt"):
        await hostile_offer(pair.alice, "bob", b"plain text\n", raw, "text/plain")
        offer = await next_offer(pair.bob)
        for bad in ("/", "\\", "\x00"):
            assert bad not in offer.name, raw
        result = await files.get_file(pair.bob, offer.id, to)
        assert result.saved_to is not None, raw
        assert result.saved_to.parent == to, raw
    assert sorted(p.name for p in to.iterdir()) == [
        "_NUL.txt",
        "ab.txt",
        "boot.ini.txt",
        "passwd",
        "passwd (1)",
    ]
    assert sorted(p.name for p in to.parent.iterdir()) == ["downloads"]


async def test_saving_a_blocked_file_anyway_is_explicit_logged_and_not_executable(
    pair: Pair,
) -> None:
    to = pair.folder("downloads")
    await hostile_offer(pair.alice, "bob", elf(), "tool.sh", None)
    offer = await next_offer(pair.bob)
    first = await files.get_file(pair.bob, offer.id, to)
    assert first.saved_to is None
    assert files.overrides(pair.bob) == []

    second = await files.get_file(pair.bob, offer.id, to, allow_blocked=True)
    assert second.saved_to == to / "tool.sh"
    assert second.record.state == "saved_anyway"
    assert stat.S_IMODE(second.saved_to.stat().st_mode) == 0o600
    [entry] = files.overrides(pair.bob)
    assert (entry.id, entry.verdict) == (offer.id, "blocked")
    assert any("Linux program" in r for r in entry.reasons)
    assert pair.quarantine() == []


async def test_clamd_named_in_the_environment_scans_received_files(
    pair: Pair, clamd_socket: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(files.CLAMD_SOCKET_ENV, str(clamd_socket))
    to = pair.folder("downloads")
    await hostile_offer(pair.alice, "bob", b"notes " + MARKER + b" more\n", "notes.txt", None)
    offer = await next_offer(pair.bob)
    result = await files.get_file(pair.bob, offer.id, to)
    assert result.saved_to is None
    assert any(SIGNATURE in line for line in result.verdict.reasons), result.verdict
    await hostile_offer(pair.alice, "bob", b"harmless notes\n", "other.txt", None)
    offer = await next_offer(pair.bob)
    assert (await files.get_file(pair.bob, offer.id, to)).verdict.is_clean


async def test_an_unreachable_clamd_is_an_error_not_clean(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(files.CLAMD_SOCKET_ENV, str(pair.root / "no-such.sock"))
    to = pair.folder("downloads")
    await hostile_offer(pair.alice, "bob", b"harmless notes\n", "notes.txt", None)
    offer = await next_offer(pair.bob)
    result = await files.get_file(pair.bob, offer.id, to)
    assert result.record.state == "error"
    assert result.saved_to is None
    assert list(to.iterdir()) == []
