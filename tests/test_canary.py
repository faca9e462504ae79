"""A message's text exists in clear only inside the two clients, never on disk or on the wire.

A unique canary is sent both ways through a server that records every frame.
Afterwards every byte the server wrote (database, WAL and shared-memory files,
certificate, audit log, standard error and output), every recorded frame and
every byte of both client profiles is searched for it in several encodings.
"""

from __future__ import annotations

import base64
import secrets
import sqlite3
from collections.abc import Iterable
from pathlib import Path

import pytest

from bastion.client import MessageEvent
from bastion.protocol import frames
from tests.conftest import Profiles, ServerProcess
from tests.helpers import next_events
from tests.malicious_server import read_record

pytestmark = pytest.mark.network


def canary_forms(canary: str) -> dict[str, bytes]:
    """The byte patterns under which ``canary`` would be found if it were stored in clear."""
    raw = canary.encode()
    forms = {
        "utf-8": raw,
        "utf-16-le": canary.encode("utf-16-le"),
        "utf-16-be": canary.encode("utf-16-be"),
        "hex": raw.hex().encode(),
        "HEX": raw.hex().upper().encode(),
    }
    for shift in range(3):
        # The middle of the Base64 text does not depend on the bytes around the canary.
        encoded = base64.b64encode(b"\0" * shift + raw)
        forms[f"base64+{shift}"] = encoded[4:-4]
    return forms


def find_in_bytes(data: bytes, canary: str) -> list[str]:
    """The names of the encodings under which ``canary`` occurs in ``data``."""
    return [name for name, form in canary_forms(canary).items() if form in data]


def find_in_files(paths: Iterable[Path], canary: str) -> list[str]:
    """``file: encoding`` for every occurrence of ``canary`` in the files (folders searched)."""
    hits = []
    for top in paths:
        files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
        for path in files:
            hits += [f"{path}: {name}" for name in find_in_bytes(path.read_bytes(), canary)]
    return hits


def new_canary() -> str:
    return "canary-" + secrets.token_hex(16)


# --- the scanner finds what is there --------------------------------------------------------


def test_scanner_finds_a_canary_written_on_purpose(tmp_path: Path) -> None:
    canary = new_canary()
    for encoding in ["utf-8", "utf-16-le", "utf-16-be"]:
        path = tmp_path / encoding / "note.txt"
        path.parent.mkdir()
        path.write_bytes(b"junk" + canary.encode(encoding) + b"junk")
        assert find_in_files([tmp_path / encoding], canary) == [f"{path}: {encoding}"]
    for shift in range(3):
        blob = base64.b64encode(b"x" * shift + canary.encode() + b"y")
        assert f"base64+{shift}" in find_in_bytes(blob, canary)
    assert "hex" in find_in_bytes(canary.encode().hex().encode(), canary)

    # Written into an SQLite database in WAL mode, it is found in the -wal file.
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    conn = sqlite3.connect(db_dir / "store.db")
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (v TEXT)")
        conn.commit()
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("INSERT INTO t VALUES (?)", (canary,))
        conn.commit()
        hits = find_in_files([db_dir], canary)
        assert f"{db_dir / 'store.db-wal'}: utf-8" in hits
    finally:
        conn.close()
    assert find_in_files([tmp_path], new_canary()) == []


# --- the canary through a real server --------------------------------------------------------


async def test_canary_is_nowhere_but_in_the_clients(
    recorded: tuple[ServerProcess, Profiles], tmp_path: Path
) -> None:
    server, profiles = recorded
    alice = await profiles.online("alice")
    bob = await profiles.online("bob")
    await profiles.befriend("alice", "bob")
    to_bob, to_alice = new_canary(), new_canary()
    await alice.send_text("bob", f"the word is {to_bob}")
    [got] = await next_events(bob, 1)
    assert isinstance(got, MessageEvent)
    assert got.record.text == f"the word is {to_bob}"
    await bob.send_text("alice", f"and back: {to_alice}")
    [got] = await next_events(alice, 1)
    assert isinstance(got, MessageEvent)
    assert got.record.text == f"and back: {to_alice}"
    # The clients decrypt their own stores: the text is there, sealed.
    assert [r.text for r in bob.history("alice")] == [
        f"the word is {to_bob}",
        f"and back: {to_alice}",
    ]

    record = read_record(tmp_path / "frames.txt")
    received = [frames.decode_client_frame(data) for d, data in record if d == "in"]
    assert sum(isinstance(f, frames.Send) for f in received) == 2, "the sends were not recorded"
    wire = b"".join(data for _, data in record)
    server_files = [server.data_dir, server.log_path]
    client_files = [profiles.path("alice"), profiles.path("bob")]
    assert (server.data_dir / "bastion.db-wal").exists(), "the server's WAL file was not scanned"

    for canary in (to_bob, to_alice):
        assert find_in_bytes(wire, canary) == []
        assert find_in_files(server_files, canary) == []
        assert find_in_files(client_files, canary) == []

    # Again once everything is closed and flushed.
    await profiles.close()
    profiles.clients.clear()
    assert server.stop() == 0
    server.proc = None  # stopped for good: the fixture's teardown would read its closed stdout
    for canary in (to_bob, to_alice):
        assert find_in_bytes(server.stdout, canary) == []
        assert find_in_files(server_files, canary) == []
        assert find_in_files(client_files, canary) == []
