"""Render the main-screen snapshot as the README's PNG: ``python -m tests.tui.screenshot``.

Uses CairoSVG (a test-only dependency) on the SVG that the snapshot test checks.
"""

from __future__ import annotations

from pathlib import Path

import cairosvg  # type: ignore[import-untyped]

HERE = Path(__file__).resolve().parent
SNAPSHOT = HERE / "__snapshots__" / "test_snapshots" / "test_main_screen.svg"
TARGET = HERE.parent.parent / "docs" / "tui.png"


def main() -> None:
    """Write docs/tui.png from the checked-in main-screen snapshot."""
    # The snapshot names a web font; render with a monospace font every system has.
    svg = SNAPSHOT.read_text().replace("Fira Code", "DejaVu Sans Mono")
    cairosvg.svg2png(bytestring=svg.encode(), write_to=str(TARGET), scale=1.5)
    print(f"wrote {TARGET.relative_to(HERE.parent.parent)}")


if __name__ == "__main__":
    main()
