"""Files through a real server: round trips, resumed downloads, who may read a blob, expiry."""

from __future__ import annotations

import os
import secrets
import stat

import pytest

from bastion.client import files
from bastion.errors import ServerRefusedError
from bastion.protocol import frames
from tests.conftest import Profiles
from tests.file_transfer.conftest import Pair, next_offer, write

pytestmark = pytest.mark.network


async def test_multi_chunk_file_round_trip(pair: Pair) -> None:
    data = secrets.token_hex((5 * frames.MAX_BLOB_CHUNK_BYTES + 1234) // 2).encode()
    source = write(pair.folder("out"), "notes.txt", data)
    seen: list[tuple[int, int]] = []

    sent = await files.send_file(
        pair.alice, "bob", source, progress=lambda done, total: seen.append((done, total))
    )
    offer = await next_offer(pair.bob)
    assert offer.to_json() == {
        "type": "file",
        "id": sent.offer_id,
        "from": "alice",
        "name": "notes.txt",
        "size": len(data),
        "content_type": "text/plain",
        "at": files.iso_time(offer.at),
    }
    assert seen[-1][0] == seen[-1][1] > len(data)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert len(pair.blobs()) == 1  # uploaded, not yet downloaded

    to = pair.folder("in")
    result = await files.get_file(pair.bob, offer.id[:10], to)
    assert result.verdict.is_clean
    assert result.saved_to == to / "notes.txt"
    assert result.saved_to.read_bytes() == data
    assert not stat.S_IMODE(result.saved_to.stat().st_mode) & 0o111
    [record] = files.list_files(pair.bob)
    assert (record.state, record.verdict, record.saved_to) == (
        "saved",
        "clean",
        str(to / "notes.txt"),
    )
    # Every recipient has it: the server deleted the blob.
    assert pair.blobs() == []
    assert pair.quarantine() == []


async def test_empty_file_round_trip(pair: Pair) -> None:
    source = write(pair.folder("out"), "empty.txt", b"")
    await files.send_file(pair.alice, "bob", source)
    offer = await next_offer(pair.bob)
    assert offer.size == 0
    result = await files.get_file(pair.bob, offer.id, pair.folder("in"))
    assert result.verdict.is_clean
    assert result.saved_to is not None
    assert result.saved_to.read_bytes() == b""


async def test_a_second_copy_gets_a_new_name_and_never_overwrites(pair: Pair) -> None:
    to = pair.folder("in")
    (to / "report.txt").write_text("mine, keep me")
    await files.send_file(pair.alice, "bob", write(pair.folder("out"), "report.txt", b"theirs"))
    offer = await next_offer(pair.bob)
    result = await files.get_file(pair.bob, offer.id, to)
    assert result.saved_to == to / "report (1).txt"
    assert (to / "report.txt").read_text() == "mine, keep me"


async def test_download_resumes_from_a_partial_file(pair: Pair) -> None:
    data = secrets.token_hex(2 * frames.MAX_BLOB_CHUNK_BYTES).encode()
    await files.send_file(pair.alice, "bob", write(pair.folder("out"), "big.txt", data))
    offer = await next_offer(pair.bob)
    [blob] = pair.blobs()
    stored = blob.read_bytes()
    half = 2 * frames.MAX_BLOB_CHUNK_BYTES
    # Bob already has the first half from an interrupted download...
    downloads = pair.bob.profile.path / "downloads"
    downloads.mkdir(mode=0o700)
    (downloads / f"{offer.id}.blob").write_bytes(stored[:half])
    # ...and the server's copy of that half is now damaged: only a resumed download works.
    with blob.open("r+b") as f:
        f.write(bytes(half))
    result = await files.get_file(pair.bob, offer.id, pair.folder("in"))
    assert result.saved_to is not None
    assert result.saved_to.read_bytes() == data


async def test_only_the_sender_and_recipients_can_read_a_blob(
    pair: Pair, profiles: Profiles
) -> None:
    sent = await files.send_file(
        pair.alice, "bob", write(pair.folder("out"), "private.txt", b"for bob only")
    )
    carol = await profiles.online("carol", receive=False)
    assert carol.conn is not None
    with pytest.raises(ServerRefusedError) as refused:
        await files.download_blob(carol.conn, sent.blob, 100, pair.root / "carol.part")
    assert refused.value.code == "unknown_blob"
    # The owner may read it back; a blob id that does not exist looks the same as a foreign one.
    assert pair.alice.conn is not None
    req = pair.alice.conn.next_req()
    reply = await pair.alice.conn.request(frames.BlobGet(req=req, blob_id=sent.blob, offset=0), req)
    assert isinstance(reply, frames.BlobData)
    with pytest.raises(ServerRefusedError) as missing:
        await files.download_blob(carol.conn, "0" * 32, 100, pair.root / "carol2.part")
    assert missing.value.code == "unknown_blob"


async def test_blob_store_holds_only_ciphertext(pair: Pair) -> None:
    canary = "canary-" + secrets.token_hex(8)
    data = (f"top secret {canary} " * 5000).encode()
    source = write(pair.folder("out"), f"{canary}.txt", data)
    await files.send_file(pair.alice, "bob", source)
    await next_offer(pair.bob)
    needles = [canary.encode(), canary.encode("utf-16-le"), data[:64]]
    assert pair.blobs()
    for path in pair.server.data_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for needle in needles:
                assert needle not in content, f"{needle!r} found in {path.name}"
    for path in pair.blob_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert canary not in path.name
    # The sender's temporary ciphertext is gone too.
    assert os.listdir(pair.alice.profile.path / "outgoing") == []
