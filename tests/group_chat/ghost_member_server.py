"""A relay that slips a ghost member into every group it serves, for the security tests.

Run it like ``bastion server run`` (``--data DIR --port N``); the ghost is the
account named by ``BASTION_TEST_GHOST_MEMBER``. The server lists the ghost as a
member and fans every group message out to it, without any signed change.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bastion.server import main as server_main
from bastion.server.storage.groups import SQLiteGroupStore

GHOST_ENV = "BASTION_TEST_GHOST_MEMBER"


def main() -> None:
    """Patch the group store's member list, then run the real server entry point."""
    parser = argparse.ArgumentParser(description="a relay that adds a ghost group member")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    ghost = os.environ[GHOST_ENV]
    honest = SQLiteGroupStore.active_members

    async def with_ghost(self: SQLiteGroupStore, group_id: bytes) -> list[str]:
        return sorted({*await honest(self, group_id), ghost})

    SQLiteGroupStore.active_members = with_ghost  # type: ignore[method-assign]
    server_main.run(args.data, "127.0.0.1", args.port)


if __name__ == "__main__":
    main()
