"""Organisation policy and limits: file transfer off, the size cap, the per-user quota."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bastion.client import files
from bastion.errors import ServerRefusedError
from bastion.protocol import frames
from tests.conftest import Profiles
from tests.file_transfer.conftest import write
from tests.hardening.harness import ConfiguredServers, admin

pytestmark = pytest.mark.network

MIB = 1024 * 1024


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ConfiguredServers]:
    factory = ConfiguredServers(tmp_path)
    yield factory
    for server in factory.started:
        server.kill()


@pytest.fixture
async def people(tmp_path: Path, servers: ConfiguredServers) -> AsyncIterator[Profiles]:
    server = servers.start(admin_poll_s=0.1, blob_quota_mb=2)
    profiles = Profiles(tmp_path, server)
    await profiles.register("bob")
    await profiles.befriend("alice", "bob")
    yield profiles
    await profiles.close()


def audit_lines(data_dir: Path) -> list[str]:
    result = admin(data_dir, "audit", "show")
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


async def set_policy(data_dir: Path, setting: str) -> None:
    result = admin(data_dir, "policy", "set", setting)
    assert result.returncode == 0, result.stderr
    await asyncio.sleep(0.5)  # the running server polls its admin events


async def test_file_transfer_off_refuses_with_a_sentence_and_is_audited(
    tmp_path: Path, people: Profiles
) -> None:
    alice = await people.online("alice", receive=False)
    source = write(tmp_path, "notes.txt", b"hello")
    await files.send_file(alice, "bob", source)  # allowed by default

    await set_policy(people.server.data_dir, "file_transfer=off")
    with pytest.raises(ServerRefusedError) as refused:
        await files.send_file(alice, "bob", source)
    assert refused.value.code == "file_transfer_off"
    assert str(refused.value) == (
        "Your organisation has turned file transfer off on this server, so the file was not sent."
    )
    assert any(
        "upload.blocked" in line and "reason=file_transfer_off" in line and "user=alice" in line
        for line in audit_lines(people.server.data_dir)
    )

    await set_policy(people.server.data_dir, "file_transfer=on")
    await files.send_file(alice, "bob", source)


async def test_files_over_the_size_cap_are_refused(tmp_path: Path, people: Profiles) -> None:
    await set_policy(people.server.data_dir, "max_file_mb=1")
    alice = await people.online("alice", receive=False)
    await files.send_file(alice, "bob", write(tmp_path, "ok.txt", b"a" * (MIB - 1000)))
    with pytest.raises(ServerRefusedError) as refused:
        await files.send_file(alice, "bob", write(tmp_path, "big.txt", b"a" * (MIB + MIB // 2)))
    assert refused.value.code == "file_too_large"
    assert "too large" in str(refused.value)
    assert "1 MB" in str(refused.value)
    blobs = people.server.data_dir / "blobs"
    assert len([p for p in blobs.iterdir() if not p.name.endswith(".part")]) == 1


async def test_the_size_is_enforced_while_streaming(people: Profiles) -> None:
    alice = await people.online("alice", receive=False)
    assert alice.conn is not None
    conn = alice.conn
    req = conn.next_req()
    started = await conn.request(
        frames.BlobBegin(req=req, size=100, sha256=bytes(32), recipients=["bob"]), req
    )
    assert isinstance(started, frames.BlobStarted)
    req = conn.next_req()
    with pytest.raises(ServerRefusedError) as refused:
        await conn.request(
            frames.BlobChunk(req=req, blob_id=started.blob_id, offset=0, data=b"x" * 4096), req
        )
    assert refused.value.code == "file_too_large"
    # The upload is gone: nothing more can be appended to it.
    req = conn.next_req()
    with pytest.raises(ServerRefusedError) as gone:
        await conn.request(
            frames.BlobChunk(req=req, blob_id=started.blob_id, offset=0, data=b"x"), req
        )
    assert gone.value.code == "unknown_blob"
    assert list((people.server.data_dir / "blobs").iterdir()) == []


async def test_quota_counts_files_waiting_on_the_server(tmp_path: Path, people: Profiles) -> None:
    alice = await people.online("alice", receive=False)
    part = b"q" * (MIB - 4096)
    await files.send_file(alice, "bob", write(tmp_path, "one.txt", part))
    await files.send_file(alice, "bob", write(tmp_path, "two.txt", part))
    with pytest.raises(ServerRefusedError) as refused:
        await files.send_file(alice, "bob", write(tmp_path, "three.txt", part))
    assert refused.value.code == "quota_exceeded"
    assert "quota" in str(refused.value)

    # Once Bob has downloaded a file, its space is free again.
    bob = await people.online("bob")
    offers = []
    async for event in bob.receive(until_synced=True):
        if isinstance(event, files.FileEvent):
            offers.append(event)
    assert len(offers) == 2
    to = tmp_path / "bob-downloads"
    to.mkdir()
    await files.get_file(bob, offers[0].id, to)
    await files.send_file(alice, "bob", write(tmp_path, "three.txt", part))


async def test_uploads_in_progress_per_account_are_bounded(people: Profiles) -> None:
    alice = await people.online("alice", receive=False)
    assert alice.conn is not None
    conn = alice.conn

    async def begin() -> frames.ServerFrame:
        req = conn.next_req()
        return await conn.request(
            frames.BlobBegin(req=req, size=100, sha256=bytes(32), recipients=["bob"]), req
        )

    for _ in range(8):
        assert isinstance(await begin(), frames.BlobStarted)
    with pytest.raises(ServerRefusedError) as refused:
        await begin()
    assert refused.value.code == "rate_limited"
