"""Quarantine: private folder, decrypt-scan-release, no overwrite, no execute bit."""

from __future__ import annotations

import io
import os
import stat
import time
from pathlib import Path

import pytest

from bastion.errors import SecurityError, StorageError
from bastion.files.cipher import FileKey, encrypt_file, encrypt_stream
from bastion.files.errors import FileIntegrityError
from bastion.files.quarantine import PLAINTEXT_MAX_AGE_S, Quarantine
from bastion.files.scan import Verdict, VerdictKind, scan_file


def receive(quarantine: Quarantine, data: bytes) -> Path:
    blob = io.BytesIO()
    sealed = encrypt_stream(io.BytesIO(data), blob)
    blob.seek(0)
    return quarantine.receive(
        blob, sealed.key, expected_sha256=sealed.sha256, expected_size=sealed.size
    )


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_folder_is_private_even_if_it_existed_open(tmp_path: Path) -> None:
    folder = tmp_path / "q"
    folder.mkdir(mode=0o777)
    os.chmod(folder, 0o777)
    Quarantine(folder)
    assert mode_of(folder) == 0o700
    fresh = tmp_path / "deep" / "q2"
    Quarantine(fresh)
    assert mode_of(fresh) == 0o700


def test_received_file_is_private_not_executable_and_has_no_extension(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path / "q")
    path = receive(quarantine, b"#!/bin/sh\necho pwned\n")
    assert path.parent == tmp_path / "q"
    assert mode_of(path) == 0o600
    assert "." not in path.name


def test_clean_file_is_released_under_its_sanitised_name(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path / "q")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    path = receive(quarantine, b"meeting notes\n")
    verdict = scan_file(path, "../../notes.txt", "text/plain")
    assert verdict.is_clean, verdict.reasons
    released = quarantine.release(path, verdict, downloads, "../../notes.txt")
    assert released == downloads / "notes.txt"
    assert released.read_bytes() == b"meeting notes\n"
    assert mode_of(released) == 0o644
    assert not path.exists()
    assert os.listdir(tmp_path / "q") == []


def test_release_never_overwrites(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path / "q")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "report.txt").write_bytes(b"mine")
    (downloads / "report (1).txt").write_bytes(b"mine too")
    clean = Verdict(VerdictKind.CLEAN, ())
    first = quarantine.release(receive(quarantine, b"theirs"), clean, downloads, "report.txt")
    assert first.name == "report (2).txt"
    assert (downloads / "report.txt").read_bytes() == b"mine"
    assert (downloads / "report (1).txt").read_bytes() == b"mine too"
    assert first.read_bytes() == b"theirs"


def test_release_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path / "q")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (downloads / "a.txt").symlink_to(victim)
    released = quarantine.release(
        receive(quarantine, b"x"), Verdict(VerdictKind.CLEAN, ()), downloads, "a.txt"
    )
    assert released.name == "a (1).txt"
    assert victim.read_bytes() == b"precious"


@pytest.mark.parametrize("kind", [VerdictKind.BLOCKED, VerdictKind.ERROR])
def test_only_clean_files_are_released(tmp_path: Path, kind: VerdictKind) -> None:
    quarantine = Quarantine(tmp_path / "q")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    path = receive(quarantine, b"MZ" + b"\x00" * 100)
    with pytest.raises(SecurityError):
        quarantine.release(path, Verdict(kind, ("no",)), downloads, "a.exe")
    assert os.listdir(downloads) == []
    assert path.exists()


def test_blocked_file_is_discarded(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path / "q")
    path = receive(quarantine, b"MZ" + b"\x00" * 100)
    verdict = scan_file(path, "invoice.pdf.exe")
    assert verdict.kind is VerdictKind.BLOCKED
    quarantine.discard(path)
    assert os.listdir(tmp_path / "q") == []


def test_files_outside_the_quarantine_are_refused(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path / "q")
    outside = tmp_path / "elsewhere.txt"
    outside.write_bytes(b"x")
    with pytest.raises(StorageError):
        quarantine.discard(outside)
    with pytest.raises(StorageError):
        quarantine.release(outside, Verdict(VerdictKind.CLEAN, ()), tmp_path, "x.txt")
    assert outside.exists()


def test_tampered_download_leaves_quarantine_empty(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path / "q")
    blob = io.BytesIO()
    sealed = encrypt_stream(io.BytesIO(b"data" * 1000), blob)
    tampered = bytearray(blob.getvalue())
    tampered[-1] ^= 1
    with pytest.raises(FileIntegrityError):
        quarantine.receive(
            io.BytesIO(bytes(tampered)),
            sealed.key,
            expected_sha256=sealed.sha256,
            expected_size=sealed.size,
        )
    assert os.listdir(tmp_path / "q") == []


def seal(tmp_path: Path, data: bytes) -> tuple[Path, FileKey, bytes, int]:
    plain = tmp_path / "plain"
    plain.write_bytes(data)
    blob = tmp_path / "download.blob"
    encrypted = encrypt_file(plain, blob)
    plain.unlink()
    return blob, encrypted.key, encrypted.sha256, encrypted.size


def test_a_held_file_is_ciphertext_and_opens_only_for_a_scan(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path / "q")
    blob, key, sha256, size = seal(tmp_path, b"MZ secret program bytes")
    sealed = quarantine.hold(blob)
    assert not blob.exists()
    assert sealed.parent == tmp_path / "q"
    assert mode_of(sealed) == 0o600
    assert b"secret program" not in sealed.read_bytes()
    plaintext = quarantine.open_sealed(sealed, key, expected_sha256=sha256, expected_size=size)
    assert plaintext.read_bytes() == b"MZ secret program bytes"
    assert sealed.exists()  # still held, for a later scan or a save anyway
    with pytest.raises(FileIntegrityError):
        quarantine.open_sealed(sealed, key, expected_sha256=b"\x00" * 32, expected_size=size)


def test_plaintext_left_by_a_crash_is_swept(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path / "q")
    blob, key, sha256, size = seal(tmp_path, b"left behind")
    sealed = quarantine.hold(blob)
    old = quarantine.open_sealed(sealed, key, expected_sha256=sha256, expected_size=size)
    partial = quarantine.folder / ".bastion-partial-0123456789abcdef"
    partial.write_bytes(b"half a file")
    fresh = quarantine.open_sealed(sealed, key, expected_sha256=sha256, expected_size=size)
    hour_ago = time.time() - PLAINTEXT_MAX_AGE_S - 10
    for path in (old, partial):
        os.utime(path, (hour_ago, hour_ago))
    assert quarantine.sweep_plaintext() == 2
    assert sorted(p.name for p in quarantine.folder.iterdir()) == sorted([sealed.name, fresh.name])
