"""Link benchmark: how long linking a device takes with the history sent, against none.

Starts one server (SQLite, loopback), registers alice, and writes ``--messages``
history records into her profile through
:meth:`bastion.client.profile.Profile.add_message` (texts of about 100
characters, in one direct conversation). Then it links new devices through her
with :func:`bastion.client.devices.offer_link` and
:func:`bastion.client.devices.join_with_code`, once with ``--history none`` and
once with ``all``, and reports the bundle's size and pieces, the time to gather
it, and the whole link (code to enrolled device with the history stored; the new
profile's Argon2id included). The difference of the two links is what the
history costs. Nothing here asserts a number; record the output in
docs/benchmarks.md.

    python bench/link_history.py                     # 1,000, 10,000 and 100,000 messages
    python bench/link_history.py --messages 5000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from _servers import ServerUnderTest
from bastion.client import Client, HistoryRecord, devices, link_history, now_ms
from bastion.crypto.payload import direct_conversation

PASSPHRASE = "bench passphrase, long enough"
TEXT = "the meeting moved to thursday, can you bring the slides and the notes from last week "


def fill(client: Client, count: int) -> None:
    """``count`` sealed history records with bob, oldest first, half of them sent."""
    start = now_ms() - count
    conversation = direct_conversation("alice", "bob")
    with client.profile.transaction():
        for n in range(count):
            out = n % 2 == 0
            record = HistoryRecord(
                id=secrets.token_bytes(16),
                sender="alice" if out else "bob",
                device="a" * 16 if out else "b" * 16,
                peer="bob",
                conversation=conversation,
                text=f"{n} {TEXT}",
                sent_at=start + n,
                server_ts=start + n,
                direction="out" if out else "in",
                state="sent" if out else "received",
            )
            client.profile.add_message(conversation, record.id, record)


async def link(
    alice: Client, server: ServerUnderTest, folder: Path, choice: link_history.HistoryChoice
) -> tuple[float, int]:
    """Seconds from the code to the enrolled device, and the messages it stored."""
    codes: asyncio.Queue[str] = asyncio.Queue()
    started = time.perf_counter()
    offer = asyncio.create_task(devices.offer_link(alice, codes.put_nowait, history=choice))
    kept: list[link_history.HistorySummary] = []
    new = await devices.join_with_code(
        folder,
        PASSPHRASE,
        code=await codes.get(),
        server_url=server.url,
        fingerprint=server.fingerprint,
        on_history=kept.append,
    )
    await offer
    took = time.perf_counter() - started
    await new.close()
    return took, kept[0].messages


async def measure(count: int, root: Path) -> str:
    server = ServerUnderTest(root / f"n{count}", cpu=None)
    server.start()
    try:
        alice = await Client.register(
            root / f"n{count}" / "alice",
            PASSPHRASE,
            username="alice",
            server_url=server.url,
            fingerprint=server.fingerprint,
        )
        try:
            fill(alice, count)
            await alice.connect(receive=False)
            started = time.perf_counter()
            bundle, _ = link_history.build(alice, link_history.ALL_HISTORY, now=now_ms())
            gathered = time.perf_counter() - started
            bare, _ = await link(
                alice, server, root / f"n{count}" / "bare", link_history.NO_HISTORY
            )
            full, stored = await link(
                alice, server, root / f"n{count}" / "full", link_history.ALL_HISTORY
            )
        finally:
            await alice.close()
    finally:
        server.stop()
    if stored != count:
        raise RuntimeError(f"the new device stored {stored} of {count} messages")
    pieces = len(link_history.pieces(bundle))
    return (
        f"| {count:,} | {len(bundle) / 1e6:.2f} MB | {pieces} | {gathered * 1000:.0f} ms "
        f"| {bare:.2f} s | {full:.2f} s | {full - bare:+.2f} s |"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, action="append")
    args = parser.parse_args()
    counts = args.messages or [1_000, 10_000, 100_000]
    root = Path(tempfile.mkdtemp(prefix="bastion-bench-link-"))
    try:
        print(
            f"{platform.machine()} x{os.cpu_count()}, python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}"
        )
        print("| messages | bundle | pieces | gather | link, none | link, all | history costs |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for count in counts:
            print(await measure(count, root), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
