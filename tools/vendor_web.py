"""The browser app's third-party code: copied from the pinned npm lock, and checked.

The app has no build step; its only third-party file is the QR decoder, taken
from the npm package pinned (with its integrity hash) in ``web/package-lock.json``.

    python3 tools/vendor_web.py sync    install the lock with npm and copy the files in
    python3 tools/vendor_web.py check   install the lock in a temporary folder and fail
                                        if the copies in the package differ from it

npm runs with ``--ignore-scripts``: no package code runs at install.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK_DIR = ROOT / "web"
VENDOR = ROOT / "src" / "bastion" / "gateway" / "web" / "vendor"
# (file in node_modules, name in the package)
FILES = (
    ("jsqr/dist/jsQR.js", "jsQR.js"),
    ("jsqr/LICENSE", "jsQR.LICENSE"),
)


def install(where: Path) -> Path:
    """``npm ci`` of the lock in ``where``; returns its node_modules."""
    for name in ("package.json", "package-lock.json"):
        shutil.copy2(LOCK_DIR / name, where / name)
    subprocess.run(
        ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--silent"],
        cwd=where,
        check=True,
    )
    return where / "node_modules"


def main(argv: list[str]) -> int:
    if argv not in (["sync"], ["check"]):
        print(__doc__, file=sys.stderr)
        return 2
    if shutil.which("npm") is None:
        print("npm is not installed: the vendored files cannot be checked", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        modules = install(Path(tmp))
        stale = []
        for source, name in FILES:
            fresh = (modules / source).read_bytes()
            target = VENDOR / name
            if argv == ["sync"]:
                VENDOR.mkdir(parents=True, exist_ok=True)
                target.write_bytes(fresh)
            elif not target.exists() or target.read_bytes() != fresh:
                stale.append(name)
    if stale:
        print(
            f"out of date with web/package-lock.json: {', '.join(stale)} "
            "(run: python3 tools/vendor_web.py sync)",
            file=sys.stderr,
        )
        return 1
    print("vendored files match web/package-lock.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
