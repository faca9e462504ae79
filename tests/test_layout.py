"""Rules about the source tree that a reader cannot check at a glance.

- The protocol core and the crypto layer do no I/O and read no clock (sans-I/O, STYLE.md).
- No ``assert`` in the package: it vanishes under ``python -O``; validation must raise.
- No ``random`` module anywhere in the package: secrets come from ``secrets`` or the libraries.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "bastion"
SANS_IO_PACKAGES = ("protocol", "crypto")
IO_MODULES = frozenset({"asyncio", "sqlite3", "socket", "ssl", "picows", "threading", "time"})


def imported_modules(source: str) -> set[str]:
    """The top-level names of every module a source imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def assert_lines(source: str) -> list[int]:
    """Line numbers of ``assert`` statements."""
    return sorted(n.lineno for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Assert))


def modules(root: Path) -> list[Path]:
    found = sorted(root.rglob("*.py"))
    assert found, f"no modules under {root}"
    return found


def relative(path: Path) -> str:
    return path.relative_to(SRC.parent).as_posix()


# --- the checkers find what they look for ------------------------------------------------------


SYNTHETIC = """
import os, asyncio.subprocess
from time import monotonic
import sqlite3 as db
from . import time as local_time
from .socket import thing

def later():
    import threading
    from ssl import SSLContext
    assert later
    try:
        import picows
    except ImportError:
        pass

class Probe:
    def check(self):
        assert self, "gone under -O"
"""


def test_import_walker_finds_every_kind_of_import() -> None:
    assert imported_modules(SYNTHETIC) == {
        "os",
        "asyncio",
        "time",
        "sqlite3",
        "threading",
        "ssl",
        "picows",
    }
    # Relative imports of a sibling that happens to share a name are not the stdlib.
    assert "socket" not in imported_modules(SYNTHETIC)


def test_assert_finder_finds_nested_asserts() -> None:
    assert assert_lines(SYNTHETIC) == [11, 19]


def test_random_finder_sees_both_spellings() -> None:
    assert "random" in imported_modules("import random")
    assert "random" in imported_modules("from random import choice")
    assert "random" in imported_modules("import random as r")
    assert "random" not in imported_modules("import secrets\nfrom .random import x")


# --- the rules hold in the package -------------------------------------------------------------


@pytest.mark.parametrize("package", SANS_IO_PACKAGES)
def test_protocol_and_crypto_do_no_io(package: str) -> None:
    offenders = {
        relative(path): sorted(imported_modules(path.read_text()) & IO_MODULES)
        for path in modules(SRC / package)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_assert_statements_in_the_package() -> None:
    offenders = {relative(p): assert_lines(p.read_text()) for p in modules(SRC)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_random_module_in_the_package() -> None:
    offenders = [relative(p) for p in modules(SRC) if "random" in imported_modules(p.read_text())]
    assert offenders == []
