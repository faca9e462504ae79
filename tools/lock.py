"""Keep the dependency locks ``requirements*.txt`` honest about ``pyproject.toml``.

``python tools/lock.py check`` exits 1 with one sentence when the dependencies
declared in pyproject.toml are not the ones the locks were made from;
``python tools/lock.py stamp`` records them in each lock after ``make lock``.
Only the standard library is used: this runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = [
    ROOT / name for name in ("requirements.txt", "requirements-dev.txt", "requirements-build.txt")
]
STAMP = "# pyproject-sha256: "


def declared_digest() -> str:
    """A digest of everything in pyproject.toml that decides what gets installed."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project = data["project"]
    declared = {
        "build": data["build-system"]["requires"],
        "python": project.get("requires-python", ""),
        "dependencies": project.get("dependencies", []),
        "optional": project.get("optional-dependencies", {}),
    }
    return hashlib.sha256(json.dumps(declared, sort_keys=True).encode()).hexdigest()


def recorded_digest(lock: Path) -> str | None:
    """The digest a lock was stamped with, or None."""
    for line in lock.read_text(encoding="utf-8").splitlines():
        if line.startswith(STAMP):
            return line.removeprefix(STAMP).strip()
    return None


def check() -> int:
    """0 when every lock matches pyproject.toml; 1 with a sentence saying what to do."""
    digest = declared_digest()
    for lock in LOCKS:
        if not lock.exists():
            print(f"{lock.relative_to(ROOT)} is missing: run `make lock` and commit it.")
            return 1
        if recorded_digest(lock) != digest:
            print(
                f"pyproject.toml and {lock.relative_to(ROOT)} disagree: the dependencies "
                "changed since the lock was made. Run `make lock` and commit the result."
            )
            return 1
    return 0


def stamp() -> int:
    """Write the current digest into every lock (after they were compiled)."""
    digest = declared_digest()
    for lock in LOCKS:
        lines = [
            line
            for line in lock.read_text(encoding="utf-8").splitlines()
            if not line.startswith(STAMP)
        ]
        lock.write_text("\n".join([STAMP + digest, *lines]) + "\n", encoding="utf-8")
    return 0


def build_requires() -> int:
    """Print pyproject.toml's build requirements, one a line, for the build lock."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    print("\n".join(data["build-system"]["requires"]))
    return 0


if __name__ == "__main__":
    commands = {"check": check, "stamp": stamp, "build-requires": build_requires}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        print("usage: python tools/lock.py check|stamp|build-requires", file=sys.stderr)
        sys.exit(2)
    sys.exit(commands[sys.argv[1]]())
