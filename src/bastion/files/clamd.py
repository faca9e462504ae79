"""A small client for ClamAV's ``clamd`` over its unix socket (INSTREAM command).

The file is streamed to clamd in chunks (``zINSTREAM``, then length-prefixed
chunks, then a zero length), so clamd never needs to read our files itself.
Every socket operation has a timeout and the reply is bounded. Any failure to
get a clear answer raises :class:`ScannerUnavailableError`: the caller must not
treat the file as clean.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from bastion.files.errors import ScannerUnavailableError

DEFAULT_TIMEOUT_SECONDS = 30.0
DEFAULT_CHUNK_BYTES = 64 * 1024
# clamd's own StreamMaxLength defaults to 25 MiB; configure both together.
DEFAULT_MAX_STREAM_BYTES = 25 * 1024 * 1024
MAX_REPLY_BYTES = 4096
_MAX_SIGNATURE_CHARS = 200


@dataclass(frozen=True, slots=True)
class ClamdResult:
    """clamd's answer: ``signature`` is the name of what it found, or None if clean."""

    signature: str | None

    @property
    def found(self) -> bool:
        """Whether clamd found something."""
        return self.signature is not None


def clamd_ping(socket_path: Path, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> bool:
    """Return whether clamd answers PING with PONG on ``socket_path``. Never raises."""
    try:
        with _connect(socket_path, timeout) as sock:
            sock.sendall(b"zPING\0")
            return _read_reply(sock) == "PONG"
    except (OSError, ScannerUnavailableError):
        return False


def clamd_scan_stream(
    socket_path: Path,
    stream: BinaryIO,
    *,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_stream_bytes: int = DEFAULT_MAX_STREAM_BYTES,
) -> ClamdResult:
    """Send ``stream`` to clamd with INSTREAM and return its verdict.

    Raises :class:`ScannerUnavailableError` if clamd cannot be reached, times
    out, gives an error or an unknown answer, or the stream is longer than
    ``max_stream_bytes``.
    """
    try:
        with _connect(socket_path, timeout) as sock:
            sock.sendall(b"zINSTREAM\0")
            sent = 0
            while chunk := stream.read(chunk_bytes):
                sent += len(chunk)
                if sent > max_stream_bytes:
                    raise ScannerUnavailableError("the file is too large for the virus scanner")
                sock.sendall(struct.pack(">I", len(chunk)) + chunk)
            sock.sendall(struct.pack(">I", 0))
            reply = _read_reply(sock)
    except TimeoutError:
        raise ScannerUnavailableError("the virus scanner did not answer in time") from None
    except OSError as exc:
        raise ScannerUnavailableError(
            f"the virus scanner is unreachable ({exc.strerror or type(exc).__name__})"
        ) from None
    return _parse_reply(reply)


def clamd_scan_file(
    socket_path: Path,
    path: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    max_stream_bytes: int = DEFAULT_MAX_STREAM_BYTES,
) -> ClamdResult:
    """Scan the file at ``path`` with clamd; see :func:`clamd_scan_stream`.

    Raises :class:`ScannerUnavailableError` (also if the file cannot be read).
    """
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ScannerUnavailableError(f"could not read the file to scan: {exc.strerror}") from None
    with stream:
        return clamd_scan_stream(
            socket_path, stream, timeout=timeout, max_stream_bytes=max_stream_bytes
        )


def _connect(socket_path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(socket_path))
    except BaseException:
        sock.close()
        raise
    return sock


def _read_reply(sock: socket.socket) -> str:
    data = bytearray()
    while b"\0" not in data:
        piece = sock.recv(MAX_REPLY_BYTES)
        if not piece:
            break
        data += piece
        if len(data) > MAX_REPLY_BYTES:
            raise ScannerUnavailableError("the virus scanner's answer is too long")
    return data.split(b"\0", 1)[0].decode("utf-8", errors="replace").strip()


def _parse_reply(reply: str) -> ClamdResult:
    # "stream: OK", "stream: <signature> FOUND", "<message> ERROR"
    if reply == "stream: OK":
        return ClamdResult(signature=None)
    if reply.startswith("stream: ") and reply.endswith(" FOUND"):
        name = reply[len("stream: ") : -len(" FOUND")].strip()
        printable = "".join(ch for ch in name if ch.isprintable())[:_MAX_SIGNATURE_CHARS]
        return ClamdResult(signature=printable or "unnamed signature")
    if reply.endswith("ERROR"):
        raise ScannerUnavailableError(f"the virus scanner reported an error: {reply[:200]}")
    raise ScannerUnavailableError("the virus scanner gave an answer that was not understood")
