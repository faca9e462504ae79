"""What a failing server tells the peer: its refusals, never its database's own words."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from bastion.client import contacts
from bastion.errors import ServerRefusedError
from tests.conftest import Profiles, ServerProcess

pytestmark = pytest.mark.network

# Text that only the database knows: a table, a constraint and a trigger name.
SCHEMA_WORDS = "contacts_guard_trigger on table contacts (owner, peer)"


async def test_a_storage_failure_reaches_the_peer_as_a_fixed_message(
    tmp_path: Path, server_factory: Callable[..., ServerProcess]
) -> None:
    server = server_factory()
    profiles = Profiles(tmp_path, server)
    try:
        await profiles.register("alice")
        await profiles.register("bob")
        await profiles.close()
        assert server.stop() == 0
        # The database now fails every new contact pair, with its own text.
        db = sqlite3.connect(server.data_dir / "bastion.db")
        db.execute(
            "CREATE TRIGGER contacts_guard_trigger BEFORE INSERT ON contacts"
            f" BEGIN SELECT RAISE(ABORT, '{SCHEMA_WORDS}'); END"
        )
        db.commit()
        db.close()
        server.start()
        alice = await profiles.online("alice", receive=False)
        with pytest.raises(ServerRefusedError) as caught:
            await contacts.request(alice, "bob", notify=False)
        assert caught.value.code == "refused"
        assert caught.value.message == "the server could not complete the request"
        assert "contacts" not in caught.value.message
        # The operator still learns which error it was, from the log.
        assert "StorageError" in server.log_text()
    finally:
        await profiles.close()


async def test_a_deliberate_refusal_keeps_its_code_and_text(
    tmp_path: Path, server: ServerProcess
) -> None:
    profiles = Profiles(tmp_path, server)
    try:
        alice = await profiles.online("alice", receive=False)
        with pytest.raises(ServerRefusedError) as caught:
            await contacts.request(alice, "nobody", notify=False)
        assert caught.value.code == "unknown_user"
        assert caught.value.message == "there is no user named nobody"
    finally:
        await profiles.close()
