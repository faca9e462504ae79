"""File transfer benchmark: one large file through a real server on 127.0.0.1.

Starts ``python -m bastion server run`` with a fresh data folder (its blob size
cap and quota raised to fit), registers two accounts through the real protocol,
makes them contacts, then measures with the client library exactly what
``bastion file send`` and ``bastion file get`` do:

- **encrypt+upload**: :func:`bastion.client.files.send_file` (AES-256-GCM in
  64 KiB chunks to a temporary file, upload in 64 KiB frames over TLS with a
  window of requests in flight, the end-to-end offer);
- **download+decrypt+scan**: :func:`bastion.client.files.get_file` (resumable
  download, SHA-256 check, decryption into quarantine, the full scan, copy to
  the destination folder).

It also times the two local halves alone (encryption, scan) to show where the
time goes. Figures are MB/s of plaintext (1 MB = 10^6 bytes). Nothing here
asserts a number; record the output in docs/benchmarks.md.

    python bench/files.py                # 1 GiB
    python bench/files.py --mib 256      # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bastion.client import Client, contacts, files
from bastion.files.cipher import encrypt_file
from bastion.files.scan import scan_file

PASSPHRASE = "bench passphrase"
MB = 1_000_000
PIECE = 8 * 1024 * 1024
BASTION = [sys.executable, "-m", "bastion"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(data: Path, *, max_file_mb: int, quota_mb: int) -> Iterator[tuple[str, str]]:
    """A server process; yields its URL and certificate fingerprint."""
    data.mkdir(mode=0o700)
    (data / "bastion.toml").write_text(f"[limits]\nblob_quota_mb = {quota_mb}\n")
    subprocess.run(
        [*BASTION, "admin", "--data", str(data), "policy", "set", f"max_file_mb={max_file_mb}"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bastion",
            "server",
            "run",
            "--data",
            str(data),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        out = b""
        deadline = time.monotonic() + 30
        while b"certificate SHA256:" not in out:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the server did not start: {out!r}")
            if select.select([proc.stdout], [], [], 0.2)[0]:
                out += os.read(proc.stdout.fileno(), 4096)
        line = next(x for x in out.decode().splitlines() if x.startswith("certificate "))
        yield f"wss://127.0.0.1:{port}", line.split(" ", 1)[1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def make_file(path: Path, size: int) -> None:
    """``size`` bytes of random data (incompressible, like a video)."""
    with path.open("wb") as f:
        left = size
        while left > 0:
            n = min(PIECE, left)
            f.write(os.urandom(n))
            left -= n


def rate(size: int, seconds: float) -> str:
    return f"{size / MB / seconds:8.1f} MB/s  ({seconds:6.2f} s)"


async def run(root: Path, size: int) -> list[tuple[str, str]]:
    source = root / "video.bin"
    make_file(source, size)
    rows: list[tuple[str, str]] = []

    started = time.perf_counter()
    encrypt_file(source, root / "local.sealed")
    rows.append(("encrypt only (local)", rate(size, time.perf_counter() - started)))
    (root / "local.sealed").unlink()

    cap_mb = size // (1024 * 1024) + 16
    with server(root / "server", max_file_mb=cap_mb, quota_mb=4 * cap_mb) as (url, pin):
        alice = await Client.register(
            root / "alice", PASSPHRASE, username="alice", server_url=url, fingerprint=pin
        )
        bob = await Client.register(
            root / "bob", PASSPHRASE, username="bob", server_url=url, fingerprint=pin
        )
        try:
            await alice.connect(receive=False)
            await bob.connect(receive=False)
            await contacts.request(alice, "bob", notify=False)
            await contacts.act(bob, "alice", "accept")
            await bob.close()
            bob = Client.open(root / "bob", PASSPHRASE)

            started = time.perf_counter()
            await files.send_file(alice, "bob", source)
            rows.append(("encrypt+upload", rate(size, time.perf_counter() - started)))

            await bob.connect(receive=True)
            offers = [
                e async for e in bob.receive(until_synced=True) if isinstance(e, files.FileEvent)
            ]
            to = root / "saved"
            to.mkdir()
            started = time.perf_counter()
            result = await files.get_file(bob, offers[-1].id, to)
            rows.append(("download+decrypt+scan", rate(size, time.perf_counter() - started)))
            rows.append(("verdict", str(result.verdict.kind)))
            if result.saved_to is None:
                raise RuntimeError(f"the file was not saved: {result.verdict.reasons}")

            started = time.perf_counter()
            scan_file(result.saved_to, "video.bin")
            rows.append(("scan only (local)", rate(size, time.perf_counter() - started)))
        finally:
            await alice.close()
            await bob.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="file size in MiB (default 1024)")
    parser.add_argument("--dir", help="scratch folder (default: a new temporary folder)")
    args = parser.parse_args()
    size = args.mib * 1024 * 1024
    root = Path(tempfile.mkdtemp(prefix="bastion-bench-files-", dir=args.dir))
    try:
        rows = asyncio.run(run(root, size))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"file transfer, {args.mib} MiB, loopback, {platform.machine()} x{os.cpu_count()}")
    print(f"python {platform.python_version()}, {platform.system()} {platform.release()}")
    for name, value in rows:
        print(f"  {name:<24} {value}")


if __name__ == "__main__":
    main()
