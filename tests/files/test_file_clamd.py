"""ClamAV's clamd, for real: a daemon on a unix socket with a tiny test-only database.

Skipped when the ``clamd`` binary (Debian package clamav-daemon) is not installed, except
in CI (``CI=true``), where .ci/run installs it and a missing one fails the run.
Nothing is downloaded: the database is one signature written here, and freshclam
never runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.files.clamd import clamd_ping, clamd_scan_file
from bastion.files.errors import ScannerUnavailableError
from bastion.files.scan import VerdictKind, scan_file

MARKER = b"bastion-clamd-test-marker-7c1e"
SIGNATURE = "Bastion.Test.Marker"
CLAMD = shutil.which("clamd") or shutil.which("clamd", path="/usr/sbin:/usr/local/sbin")
START_TIMEOUT_SECONDS = 30.0


@pytest.fixture(scope="module")
def clamd_socket() -> Iterator[Path]:
    if CLAMD is None:
        if os.environ.get("CI") == "true":
            pytest.fail("clamd is missing in CI: .ci/run installs Debian's clamav-daemon")
        pytest.skip("clamd is not installed (Debian package clamav-daemon)")
    # A short folder name: unix socket paths are limited to about 100 bytes.
    folder = Path(tempfile.mkdtemp(prefix="clamd-"))
    database = folder / "db"
    database.mkdir()
    (database / "bastion-test.ndb").write_text(f"{SIGNATURE}:0:*:{MARKER.hex()}\n")
    socket_path = folder / "clamd.sock"
    config = folder / "clamd.conf"
    config.write_text(
        f"LocalSocket {socket_path}\n"
        f"DatabaseDirectory {database}\n"
        f"TemporaryDirectory {folder}\n"
        "Foreground yes\n"
        "LogSyslog no\n"
        "StreamMaxLength 10M\n"
    )
    with open(folder / "clamd.out", "wb") as log:
        process = subprocess.Popen(
            [CLAMD, "--config-file", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not clamd_ping(socket_path, timeout=1.0):
            if process.poll() is not None or time.monotonic() > deadline:
                output = (folder / "clamd.out").read_text(errors="replace")[-2000:]
                pytest.fail(f"clamd did not start:\n{output}")
            time.sleep(0.02)
        yield socket_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)


def test_found_is_reported_by_the_client(clamd_socket: Path, tmp_path: Path) -> None:
    sample = tmp_path / "sample"
    sample.write_bytes(b"some harmless words " + MARKER + b" and more words\n")
    result = clamd_scan_file(clamd_socket, sample)
    assert result.found
    assert result.signature is not None
    assert SIGNATURE in result.signature


def test_found_blocks_the_file(clamd_socket: Path, tmp_path: Path) -> None:
    sample = tmp_path / "sample"
    sample.write_bytes(b"notes\n" + MARKER + b"\n")
    verdict = scan_file(sample, "notes.txt", "text/plain", clamd_socket=clamd_socket)
    assert verdict.kind is VerdictKind.BLOCKED
    assert any(SIGNATURE in reason for reason in verdict.reasons)


def test_clean_file_is_clean(clamd_socket: Path, tmp_path: Path) -> None:
    sample = tmp_path / "sample"
    sample.write_bytes(b"meeting at noon\n" * 10_000)  # several INSTREAM chunks
    assert not clamd_scan_file(clamd_socket, sample).found
    verdict = scan_file(sample, "notes.txt", "text/plain", clamd_socket=clamd_socket)
    assert verdict.kind is VerdictKind.CLEAN, verdict.reasons


def test_stream_over_the_limit_is_an_error_not_clean(clamd_socket: Path, tmp_path: Path) -> None:
    sample = tmp_path / "sample"
    sample.write_bytes(b"x" * 200_000)
    with pytest.raises(ScannerUnavailableError):
        clamd_scan_file(clamd_socket, sample, max_stream_bytes=100_000)
    verdict = scan_file(sample, "x.txt", clamd_socket=clamd_socket, clamd_max_stream_bytes=100_000)
    assert verdict.kind is VerdictKind.ERROR


def test_nothing_listening_is_an_error(tmp_path: Path) -> None:
    sample = tmp_path / "sample"
    sample.write_bytes(b"hello\n")
    with pytest.raises(ScannerUnavailableError):
        clamd_scan_file(tmp_path / "absent.sock", sample, timeout=2.0)
    assert not clamd_ping(tmp_path / "absent.sock", timeout=1.0)
