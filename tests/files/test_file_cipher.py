"""Streaming file encryption: round trips, and every tampering fails leaving nothing behind."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.errors import BastionError, StorageError
from bastion.files.cipher import (
    HEADER_BYTES,
    TAG_BYTES,
    EncryptedFile,
    FileKey,
    decrypt_file,
    decrypt_stream_to_path,
    encrypt_file,
    encrypt_stream,
)
from bastion.files.errors import FileIntegrityError

CHUNK = 256
RECORD = CHUNK + TAG_BYTES


def encrypt_bytes(data: bytes, *, chunk_size: int = CHUNK) -> tuple[bytes, EncryptedFile]:
    out = io.BytesIO()
    sealed = encrypt_stream(io.BytesIO(data), out, chunk_size=chunk_size)
    return out.getvalue(), sealed


def split_records(blob: bytes) -> tuple[bytes, list[bytes]]:
    body = blob[HEADER_BYTES:]
    return blob[:HEADER_BYTES], [body[i : i + RECORD] for i in range(0, len(body), RECORD)]


def decrypt_bytes(blob: bytes, key: FileKey, folder: Path, *, sha256: bytes | None = None) -> Path:
    destination = folder / "out.bin"
    decrypt_stream_to_path(
        io.BytesIO(blob),
        destination,
        key,
        expected_sha256=sha256 if sha256 is not None else hashlib.sha256(blob).digest(),
        expected_size=len(blob),
    )
    return destination


@pytest.mark.parametrize(
    ("size", "chunk_size"),
    [
        (0, CHUNK),
        (1, CHUNK),
        (CHUNK, CHUNK),  # exactly one full chunk: it is the last one
        (3 * CHUNK, CHUNK),  # exact multiple
        (3 * CHUNK + 17, CHUNK),
        (300_000, 64 * 1024),  # default chunk size, several chunks
    ],
)
def test_round_trip(tmp_path: Path, size: int, chunk_size: int) -> None:
    plain = os.urandom(size)
    source = tmp_path / "plain"
    source.write_bytes(plain)
    blob_path = tmp_path / "blob"
    sealed = encrypt_file(source, blob_path, chunk_size=chunk_size)
    blob = blob_path.read_bytes()
    assert sealed.size == len(blob)
    assert sealed.plaintext_size == size
    assert sealed.sha256 == hashlib.sha256(blob).digest()
    chunks = max(1, -(-size // chunk_size))
    assert len(blob) == HEADER_BYTES + size + chunks * TAG_BYTES

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    destination = out_dir / "received"
    written = decrypt_file(
        blob_path, destination, sealed.key, expected_sha256=sealed.sha256, expected_size=sealed.size
    )
    assert written == size
    assert destination.read_bytes() == plain
    mode = stat.S_IMODE(destination.stat().st_mode)
    assert mode & 0o077 == 0
    assert mode & 0o111 == 0
    assert os.listdir(out_dir) == ["received"]


def test_each_file_gets_a_fresh_key_and_nonce_prefix() -> None:
    blob_a, sealed_a = encrypt_bytes(b"same content")
    blob_b, sealed_b = encrypt_bytes(b"same content")
    assert sealed_a.key != sealed_b.key
    assert blob_a[5:HEADER_BYTES] != blob_b[5:HEADER_BYTES]
    assert blob_a[HEADER_BYTES:] != blob_b[HEADER_BYTES:]


def test_key_is_redacted_in_repr() -> None:
    key = FileKey.generate()
    assert key.to_bytes().hex() not in repr(key)
    assert "redacted" in repr(key)
    _blob, sealed = encrypt_bytes(b"x")
    assert sealed.key.to_bytes().hex() not in repr(sealed)


@pytest.mark.parametrize("raw", [b"", b"k" * 31, b"k" * 33])
def test_key_of_wrong_length_is_refused(raw: bytes) -> None:
    with pytest.raises(FileIntegrityError):
        FileKey(raw)


def _flip(records: list[bytes]) -> list[bytes]:
    first = bytearray(records[0])
    first[5] ^= 0x01
    return [bytes(first), *records[1:]]


ATTACKS: dict[str, Callable[[list[bytes]], list[bytes]]] = {
    "flipped byte": _flip,
    "dropped middle chunk": lambda r: [r[0], *r[2:]],
    "dropped last chunk": lambda r: r[:-1],
    "reordered chunks": lambda r: [r[1], r[0], *r[2:]],
    "truncated last chunk": lambda r: [*r[:-1], r[-1][:-5]],
    "extended with a copy": lambda r: [*r, r[-1]],
    "last chunk duplicated in the middle": lambda r: [r[0], r[-1], *r[1:]],
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_tampered_chunks_fail_even_with_a_matching_hash(tmp_path: Path, attack: str) -> None:
    # The hash is recomputed over the tampered blob: the chunk layer alone must refuse it.
    blob, sealed = encrypt_bytes(os.urandom(3 * CHUNK + 40))
    header, records = split_records(blob)
    assert len(records) == 4
    tampered = header + b"".join(ATTACKS[attack](records))
    with pytest.raises(FileIntegrityError):
        decrypt_bytes(tampered, sealed.key, tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_tampered_blob_fails_against_the_announced_hash(tmp_path: Path, attack: str) -> None:
    blob, sealed = encrypt_bytes(os.urandom(3 * CHUNK + 40))
    header, records = split_records(blob)
    tampered = header + b"".join(ATTACKS[attack](records))
    with pytest.raises(FileIntegrityError):
        decrypt_bytes(tampered, sealed.key, tmp_path, sha256=sealed.sha256)
    assert os.listdir(tmp_path) == []


def test_truncated_to_the_header_fails(tmp_path: Path) -> None:
    blob, sealed = encrypt_bytes(b"hello" * 100)
    for cut in (0, 3, HEADER_BYTES, HEADER_BYTES + 10):
        with pytest.raises(FileIntegrityError):
            decrypt_bytes(blob[:cut], sealed.key, tmp_path)
    assert os.listdir(tmp_path) == []


def test_swapped_blob_fails(tmp_path: Path) -> None:
    # The server hands over another file's ciphertext (even one of the same size).
    blob, sealed = encrypt_bytes(b"a" * 1000)
    other_blob, _other = encrypt_bytes(b"b" * 1000)
    assert len(blob) == len(other_blob)
    with pytest.raises(FileIntegrityError):
        decrypt_bytes(other_blob, sealed.key, tmp_path, sha256=sealed.sha256)
    assert os.listdir(tmp_path) == []


def test_changed_header_fails(tmp_path: Path) -> None:
    blob, sealed = encrypt_bytes(b"c" * 1000)
    for position in (0, 4, 8):  # version, chunk size, nonce prefix
        tampered = bytearray(blob)
        tampered[position] ^= 0x01
        with pytest.raises(FileIntegrityError):
            decrypt_bytes(bytes(tampered), sealed.key, tmp_path)
    huge_chunks = bytearray(blob)
    huge_chunks[1:5] = (2**31).to_bytes(4, "big")
    with pytest.raises(FileIntegrityError):
        decrypt_bytes(bytes(huge_chunks), sealed.key, tmp_path)
    assert os.listdir(tmp_path) == []


def test_wrong_key_fails(tmp_path: Path) -> None:
    blob, _sealed = encrypt_bytes(b"secret")
    with pytest.raises(FileIntegrityError):
        decrypt_bytes(blob, FileKey.generate(), tmp_path)
    assert os.listdir(tmp_path) == []


def test_wrong_announced_size_fails(tmp_path: Path) -> None:
    blob, sealed = encrypt_bytes(b"z" * 700)
    for size in (len(blob) - 1, len(blob) + 1):
        with pytest.raises(FileIntegrityError):
            decrypt_stream_to_path(
                io.BytesIO(blob),
                tmp_path / "out",
                sealed.key,
                expected_sha256=sealed.sha256,
                expected_size=size,
            )
    assert os.listdir(tmp_path) == []


def test_existing_destination_is_never_replaced(tmp_path: Path) -> None:
    blob, sealed = encrypt_bytes(b"new content")
    destination = tmp_path / "out.bin"
    destination.write_bytes(b"user's own file")
    with pytest.raises(StorageError):
        decrypt_bytes(blob, sealed.key, tmp_path)
    assert destination.read_bytes() == b"user's own file"
    assert os.listdir(tmp_path) == ["out.bin"]


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=2000), size_delta=st.integers(-3, 3))
def test_arbitrary_ciphertext_raises_only_integrity_errors(
    tmp_path: Path, garbage: bytes, size_delta: int
) -> None:
    key = FileKey.generate()
    folder = tmp_path / "h"
    folder.mkdir(exist_ok=True)
    try:
        decrypt_stream_to_path(
            io.BytesIO(garbage),
            folder / "out",
            key,
            expected_sha256=hashlib.sha256(garbage).digest(),
            expected_size=max(0, len(garbage) + size_delta),
        )
    except FileIntegrityError:
        pass
    except BastionError as exc:  # pragma: no cover - would be a defect
        pytest.fail(f"unexpected error kind {type(exc).__name__}")
    assert os.listdir(folder) == []
