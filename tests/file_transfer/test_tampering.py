"""A server that changes, cuts, reorders or swaps a blob: the download fails, nothing is saved."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from bastion.client import files
from bastion.errors import ServerRefusedError
from bastion.files.cipher import HEADER_BYTES, TAG_BYTES
from bastion.files.errors import FileIntegrityError
from bastion.protocol import frames
from tests.file_transfer.conftest import Pair, next_offer, write

pytestmark = pytest.mark.network

CHUNK = 64 * 1024  # the cipher's default plaintext chunk
RECORD = CHUNK + TAG_BYTES


def flip_byte(blob: Path, other: Path) -> None:
    data = bytearray(blob.read_bytes())
    data[HEADER_BYTES + 100] ^= 0x01
    blob.write_bytes(bytes(data))


def truncate(blob: Path, other: Path) -> None:
    data = blob.read_bytes()
    blob.write_bytes(data[: HEADER_BYTES + RECORD])  # keep only the first chunk


def swap_chunks(blob: Path, other: Path) -> None:
    data = blob.read_bytes()
    first = data[HEADER_BYTES : HEADER_BYTES + RECORD]
    second = data[HEADER_BYTES + RECORD : HEADER_BYTES + 2 * RECORD]
    rest = data[HEADER_BYTES + 2 * RECORD :]
    blob.write_bytes(data[:HEADER_BYTES] + second + first + rest)


def drop_chunk(blob: Path, other: Path) -> None:
    data = blob.read_bytes()
    blob.write_bytes(data[:HEADER_BYTES] + data[HEADER_BYTES + RECORD :])


def serve_other_blob(blob: Path, other: Path) -> None:
    blob.write_bytes(other.read_bytes())


@pytest.mark.parametrize(
    "tamper",
    [flip_byte, truncate, swap_chunks, drop_chunk, serve_other_blob],
    ids=lambda f: f.__name__,
)
async def test_tampered_blob_never_reaches_the_folder(
    pair: Pair, tamper: Callable[[Path, Path], None]
) -> None:
    data = secrets.token_hex(3 * CHUNK // 2 + 500).encode()  # a little over 3 chunks
    other = secrets.token_hex(3 * CHUNK // 2 + 500).encode()
    await files.send_file(pair.alice, "bob", write(pair.folder("out"), "a.txt", data))
    offer = await next_offer(pair.bob)
    [target] = pair.blobs()
    await files.send_file(pair.alice, "bob", write(pair.folder("out"), "b.txt", other))
    await next_offer(pair.bob)
    [decoy] = [p for p in pair.blobs() if p != target]

    tamper(target, decoy)
    to = pair.folder("in")
    with pytest.raises(FileIntegrityError):
        await files.get_file(pair.bob, offer.id, to)
    assert list(to.iterdir()) == []
    assert pair.quarantine() == []
    assert list((pair.bob.profile.path / "downloads").iterdir()) == []
    record = files.find_file(pair.bob, offer.id)
    assert record.state == "failed"
    assert record.reasons


async def test_blob_that_fails_the_hash_is_refused_even_with_a_valid_key(pair: Pair) -> None:
    """The server swaps in another blob of the same size: only the hash can tell."""
    data = b"A" * 1000
    await files.send_file(pair.alice, "bob", write(pair.folder("out"), "a.txt", data))
    offer = await next_offer(pair.bob)
    [target] = pair.blobs()
    await files.send_file(pair.alice, "bob", write(pair.folder("out"), "b.txt", b"B" * 1000))
    await next_offer(pair.bob)
    [decoy] = [p for p in pair.blobs() if p != target]
    assert target.stat().st_size == decoy.stat().st_size
    target.write_bytes(decoy.read_bytes())
    to = pair.folder("in")
    with pytest.raises(FileIntegrityError, match="hash"):
        await files.get_file(pair.bob, offer.id, to)
    assert list(to.iterdir()) == []


async def test_upload_with_a_wrong_hash_is_not_made_available(pair: Pair) -> None:
    assert pair.alice.conn is not None
    conn = pair.alice.conn
    req = conn.next_req()
    started = await conn.request(
        frames.BlobBegin(req=req, size=10, sha256=bytes(32), recipients=["bob"]), req
    )
    assert isinstance(started, frames.BlobStarted)
    req = conn.next_req()
    await conn.request(
        frames.BlobChunk(req=req, blob_id=started.blob_id, offset=0, data=b"0123456789"), req
    )
    req = conn.next_req()
    with pytest.raises(ServerRefusedError) as refused:
        await conn.request(frames.BlobEnd(req=req, blob_id=started.blob_id), req)
    assert refused.value.code == "blob_mismatch"
    assert pair.blobs() == []
