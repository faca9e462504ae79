"""A relay that lies about group chains, for the security tests.

Run it like ``bastion server run`` (``--data DIR --port N``). It runs the real
server entry point with the group fetch handler and the change notices wrapped,
as chosen by the environment:

- ``BASTION_TEST_WITHHOLD=user:seq,...``: ``user`` is never told of, nor shown,
  any change at position ``seq`` or later (a withheld removal).
- ``BASTION_TEST_FORK_FILE`` and ``BASTION_TEST_FORK_USERS=user,...``: while the
  file holds an encoded change at position ``k``, those users are shown the
  stored chain before ``k`` and then that change instead of the real ones (a
  forked chain, e.g. signed by an admin removed at ``k``).
- ``BASTION_TEST_ENDLESS_MORE=1``: every fetch is answered with no change and
  ``more`` set, forever.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bastion.groups.chain import decode_change
from bastion.protocol import frames
from bastion.server import main as server_main
from bastion.server.app import Overrides
from bastion.server.handlers._context import Route, Services
from bastion.server.handlers._request import Request
from bastion.server.handlers.groups import CHAIN_PAGE, fetch_chain
from bastion.server.storage.groups import SQLiteGroupStore

WITHHOLD_ENV = "BASTION_TEST_WITHHOLD"
FORK_FILE_ENV = "BASTION_TEST_FORK_FILE"
FORK_USERS_ENV = "BASTION_TEST_FORK_USERS"
ENDLESS_ENV = "BASTION_TEST_ENDLESS_MORE"


def _withheld() -> dict[str, int]:
    pairs = [p.split(":") for p in os.environ.get(WITHHOLD_ENV, "").split(",") if p]
    return {user: int(seq) for user, seq in pairs}


def _fork() -> bytes | None:
    path = os.environ.get(FORK_FILE_ENV)
    if not path or not Path(path).exists():
        return None
    data = Path(path).read_bytes()
    return data or None


async def _all_changes(store: SQLiteGroupStore, group_id: bytes) -> list[bytes]:
    raw: list[bytes] = []
    while True:
        page = await store.changes(group_id, len(raw) - 1, CHAIN_PAGE)
        raw += page
        if len(page) < CHAIN_PAGE:
            return raw


async def lying_fetch(request: Request, services: Services, frame: frames.GroupFetch) -> None:
    """Answer a fetch with the chain this user is meant to see."""
    user, _ = request.signed_in()
    if os.environ.get(ENDLESS_ENV):
        request.reply(
            frames.GroupChain(
                req=frame.req, group_id=frame.group_id, changes=[], more=True, members=[user]
            )
        )
        return
    limit = _withheld().get(user)
    fork = _fork() if user in os.environ.get(FORK_USERS_ENV, "").split(",") else None
    if limit is None and fork is None:
        await fetch_chain(request, services, frame)
        return
    store = services.groups.store
    if not isinstance(store, SQLiteGroupStore):
        raise RuntimeError("the lying chain server runs on SQLite only")
    chain = await _all_changes(store, frame.group_id)
    if fork is not None:
        at = decode_change(fork).seq
        chain = [*chain[:at], fork]
    if limit is not None:
        chain = chain[:limit]
    shown = chain[frame.after_seq + 1 :]
    members = await store.active_members(frame.group_id)
    request.reply(
        frames.GroupChain(
            req=frame.req, group_id=frame.group_id, changes=shown, more=False, members=members
        )
    )


def main() -> None:
    """Wrap the group fetch handler and the change notices, then run the real server."""
    parser = argparse.ArgumentParser(description="a relay that lies about group chains")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    honest_append = SQLiteGroupStore.append_change

    async def append_withholding(
        self: SQLiteGroupStore, *, seq: int, notify: list[str], **rest: object
    ) -> object:
        withheld = _withheld()
        told = [u for u in notify if seq < withheld.get(u, seq + 1)]
        return await honest_append(self, seq=seq, notify=told, **rest)  # type: ignore[arg-type]

    SQLiteGroupStore.append_change = append_withholding  # type: ignore[method-assign,assignment]
    overrides = Overrides(routes=(Route(frames.GroupFetch, lying_fetch),))
    server_main.run(args.data, "127.0.0.1", args.port, overrides=overrides)


if __name__ == "__main__":
    main()
