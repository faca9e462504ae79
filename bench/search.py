"""Search benchmark: one search over 100,000 stored messages in a real profile.

Creates a profile in a temporary folder (Argon2id at its default cost, as
``bastion register`` does) holding an account record and ``--messages`` history
records written through :meth:`bastion.client.profile.Profile.add_message`,
each sealed with AES-256-GCM exactly as received messages are: texts of 20 to
200 characters, spread over 40 direct conversations and 10 groups. Then it
opens the profile as a :class:`bastion.client.Client` (no server needed: a
search never connects) and times :func:`bastion.client.search.messages`:

- **hit near the end**: a word that only the oldest message holds, so the scan
  (newest first) opens every record before it finds it;
- **no hit**: a word nothing holds: every record is opened;
- **many hits**: a word in about every tenth message, limit 50: the scan stops
  early, as a search for a common word does.

Each search runs ``--runs`` times; the table gives p50 and the slowest run.
Nothing here asserts a number; record the output in docs/benchmarks.md.

    python bench/search.py                    # 100,000 messages, 5 runs
    python bench/search.py --messages 10000 --runs 3
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bastion.client import Client, search
from bastion.client.profile import Profile
from bastion.client.records import AccountInfo, HistoryRecord

PASSPHRASE = "bench passphrase, long enough"
ME = "alice"
WORDS = tuple(
    " ".join(
        (
            "the meeting moved to thursday, can you bring the slides and the notes from last",
            "week lunch later? i found a new place near the station that does good soup and",
            "bread deploy is done, logs look clean, the queue drained in under a minute",
        )
    ).split(" ")
)
RARE = "quokka"  # only in the oldest message
ABSENT = "zeppelin"  # in no message
COMMON = "ferryboat"  # in about every tenth message
BATCH = 5000  # messages per transaction while filling


def text_of(n: int, rng: secrets.SystemRandom) -> str:
    """A message text of 20 to 200 characters."""
    length = rng.randint(20, 200)
    words = []
    size = 0
    while size < length:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    if n % 10 == 3:
        words.insert(rng.randrange(len(words)), COMMON.upper() if n % 20 == 3 else COMMON)
    return " ".join(words)[:200]


def fill(path: Path, count: int) -> None:
    """A profile with an account and ``count`` sealed history records, oldest first."""
    rng = secrets.SystemRandom()
    profile = Profile.create(path, PASSPHRASE)
    try:
        with profile.transaction():
            profile.put(
                "account",
                AccountInfo(
                    username=ME,
                    server_url="wss://127.0.0.1:1",
                    fingerprint="SHA256:" + "00" * 32,
                    server_name="bench",
                    device_id="bench-device",
                    created_at=0,
                ),
            )
        peers = [f"user{i:02d}" for i in range(40)]
        group_ids = [secrets.token_bytes(16) for _ in range(10)]
        for start in range(0, count, BATCH):
            with profile.transaction():
                for n in range(start, min(start + BATCH, count)):
                    if n % 5 == 4:
                        conversation = "group:" + group_ids[n % len(group_ids)].hex()
                        peer = conversation
                        sender = peers[n % len(peers)]
                    else:
                        peer = peers[n % len(peers)]
                        conversation = "dm:" + ",".join(sorted((ME, peer)))
                        sender = peer if n % 2 else ME
                    text = f"{RARE} at the very start" if n == 0 else text_of(n, rng)
                    message_id = secrets.token_bytes(16)
                    record = HistoryRecord(
                        id=message_id,
                        sender=sender,
                        device="d1",
                        peer=peer,
                        conversation=conversation,
                        text=text,
                        sent_at=1_700_000_000_000 + n * 1000,
                        server_ts=1_700_000_000_000 + n * 1000,
                        direction="out" if sender == ME else "in",
                        state="sent" if sender == ME else "received",
                    )
                    profile.add_message(conversation, message_id, record)
    finally:
        profile.close()


def timed(client: Client, text: str, limit: int, runs: int) -> tuple[list[float], int]:
    """Seconds of each run, and how many messages the search found."""
    times = []
    found = 0
    for _ in range(runs):
        start = time.perf_counter()
        found = len(search.messages(client, text, limit=limit))
        times.append(time.perf_counter() - start)
    return times, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000, help="history records")
    parser.add_argument("--runs", type=int, default=5, help="runs of each search")
    parser.add_argument("--dir", help="scratch folder (default: a new temporary folder)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bastion-bench-search-", dir=args.dir))
    try:
        start = time.perf_counter()
        fill(root / "profile", args.messages)
        filled_s = time.perf_counter() - start
        db_mb = (root / "profile" / "profile.db").stat().st_size / 1e6
        client = Client.open(root / "profile", PASSPHRASE)
        try:
            rows = [
                ("hit near the end", *timed(client, RARE.upper(), 50, args.runs)),
                ("no hit", *timed(client, ABSENT, 50, args.runs)),
                ("many hits, limit 50", *timed(client, COMMON, 50, args.runs)),
            ]
        finally:
            client.profile.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"search, {args.messages:,} messages"
        f" ({db_mb:.1f} MB profile.db, filled in {filled_s:.1f} s)"
    )
    print(
        f"{platform.machine()} x{os.cpu_count()}, python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}, {args.runs} runs each"
    )
    for name, times, found in rows:
        p50 = statistics.median(times) * 1000
        worst = max(times) * 1000
        print(f"  {name:<22} p50 {p50:8.1f} ms   max {worst:8.1f} ms   found {found}")


if __name__ == "__main__":
    main()
