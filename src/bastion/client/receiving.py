"""Which process of a profile takes its deliveries right now.

The server delivers to one receiving connection per device: a second one (say
``bastion history`` while ``bastion listen`` runs) would take over and cut the
first. A process that receives holds a shared lock on ``receiving.lock`` in the
profile folder; a command that only wants fresh lists checks it, and when
another process is receiving (and so already storing everything that arrives in
the same profile) it lists without taking over.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: never held, always free
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "receiving.lock"


def hold(profile_dir: Path) -> int | None:
    """Mark this process as receiving for the profile; returns the descriptor to close later."""
    if fcntl is None:
        return None
    fd = os.open(profile_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def held_elsewhere(profile_dir: Path) -> bool:
    """Whether another process is receiving for the profile right now."""
    if fcntl is None or not (profile_dir / LOCK_FILE).exists():
        return False
    fd = os.open(profile_dir / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also releases the lock taken to test
    return False
