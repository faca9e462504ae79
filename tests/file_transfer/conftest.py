"""Shared pieces of the file transfer tests: a sender and a receiver, and a hostile sender."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from bastion.client import Client, files
from bastion.files.cipher import encrypt_file
from tests.conftest import Profiles, ServerProcess
from tests.files.test_file_clamd import clamd_socket  # noqa: F401 - a real clamd, as a fixture
from tests.helpers import drain, next_events


@dataclass
class Pair:
    """Alice sends, Bob receives (connected with delivery on)."""

    alice: Client
    bob: Client
    server: ServerProcess
    root: Path

    @property
    def blob_dir(self) -> Path:
        return self.server.data_dir / "blobs"

    def blobs(self) -> list[Path]:
        """The complete blobs on the server's disk."""
        if not self.blob_dir.exists():
            return []
        return sorted(p for p in self.blob_dir.iterdir() if not p.name.endswith(".part"))

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(exist_ok=True)
        return path

    def quarantine(self) -> list[Path]:
        folder = self.bob.profile.path / "quarantine"
        return sorted(folder.iterdir()) if folder.exists() else []


@pytest.fixture
async def pair(tmp_path: Path, profiles: Profiles) -> Pair:
    await profiles.register("bob")
    await profiles.register("alice")
    await profiles.befriend("alice", "bob")
    bob = await profiles.online("bob")
    await drain(bob)  # the contact acceptance and anything else queued
    alice = await profiles.online("alice", receive=False)
    return Pair(alice, bob, profiles.server, tmp_path)


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


async def next_offer(client: Client) -> files.FileEvent:
    """The next event on a receiving client, which must be a file offer."""
    [event] = await next_events(client, 1)
    assert isinstance(event, files.FileEvent), event
    return event


async def hostile_offer(
    sender: Client, to: str, data: bytes, raw_name: str, claimed_type: str | None = None
) -> None:
    """What a modified client can send: any name and type, unsanitised, around a real blob."""
    assert sender.conn is not None
    folder = sender.profile.path / "outgoing"
    folder.mkdir(exist_ok=True)
    plain = folder / f"plain-{secrets.token_hex(4)}"
    plain.write_bytes(data)
    sealed = folder / f"sealed-{secrets.token_hex(4)}"
    encrypted = encrypt_file(plain, sealed)
    blob = await files.upload_blob(sender.conn, sealed, encrypted.size, encrypted.sha256, [to])
    body = files.OfferBody(
        blob=blob,
        key=encrypted.key.to_bytes(),
        sha256=encrypted.sha256,
        size=encrypted.size,
        plaintext_size=encrypted.plaintext_size,
        name=raw_name,
        type=claimed_type,
    )
    await sender.send_payload(
        to, files.OFFER_KIND, msgspec.json.encode(body).decode(), history=False
    )
