"""How the command line is wired, checked on its source.

- ``cli/main.py`` only assembles: every command module is in ``COMMANDS``, and no
  command module imports ``main`` (they share ``cli/_common.py``, and ``cli/_gateway.py``
  to go through a running gateway).
- Building the parser loads neither the server nor Textual (imports inside functions
  are tests/test_layout.py's rule).
- The front ends (``cli``, ``tui``) use the client library's public API: no
  ``client.conn``, ``client.profile`` or ``_private`` attributes of a client (which
  modules they may import is tests/test_layout.py's rule).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from bastion.cli.main import COMMANDS

SRC = Path(__file__).resolve().parent.parent / "src" / "bastion"
CLI = SRC / "cli"
FRONT_ENDS = (SRC / "cli", SRC / "tui")
CLIENT_INTERNAL_MODULES = frozenset({"bastion.client.transport", "bastion.client.profile"})
CLIENT_INTERNAL_ATTRIBUTES = frozenset({"conn", "profile"})


def imported(tree: ast.AST) -> set[str]:
    """The full names of the modules imported (``from a import b`` counts ``a`` and ``a.b``)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def client_internals(tree: ast.AST) -> list[str]:
    """``client.conn``, ``x.client.profile``, ``client._anything``: a client's insides."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
        if name == "client" and (
            node.attr in CLIENT_INTERNAL_ATTRIBUTES or node.attr.startswith("_")
        ):
            found.append(f"{name}.{node.attr} (line {node.lineno})")
    return found


def sources(*roots: Path) -> list[Path]:
    found = sorted(path for root in roots for path in root.rglob("*.py"))
    assert found, f"no modules under {roots}"
    return found


# --- the checkers find what they look for ------------------------------------------------------

SYNTHETIC = """
from bastion.cli import main
import bastion.client.transport

async def run(client, self):
    from bastion.server.main import serve
    import json
    await client.conn.aclose()
    self.client.profile.put("x", 1)
    client._device()
    args.profile
    client.connected
"""


def test_the_checkers_find_imports_and_client_internals() -> None:
    tree = ast.parse(SYNTHETIC)
    assert {"bastion.cli.main", "bastion.client.transport"} <= imported(tree)
    assert sorted(client_internals(tree)) == [
        "client._device (line 10)",
        "client.conn (line 8)",
        "client.profile (line 9)",
    ]


# --- the rules ---------------------------------------------------------------------------------


def test_every_command_module_is_wired_into_the_parser() -> None:
    wired = set()
    for module in COMMANDS:
        assert isinstance(module, ModuleType)
        wired.add(module.__name__.rsplit(".", 1)[1])
    shared = {"__init__", "main", "_common", "_gateway"}
    on_disk = {path.stem for path in CLI.glob("*.py")} - shared
    assert wired == on_disk


def test_command_modules_never_import_the_entry_point() -> None:
    for path in sources(CLI):
        if path.name != "main.py":
            assert "bastion.cli.main" not in imported(ast.parse(path.read_text())), path.name


def test_front_ends_use_only_the_public_client_api() -> None:
    for path in sources(*FRONT_ENDS):
        tree = ast.parse(path.read_text())
        assert not imported(tree) & CLIENT_INTERNAL_MODULES, path.name  # and see test_layout.py
        assert client_internals(tree) == [], path.name


def test_building_the_parser_loads_neither_the_server_nor_textual() -> None:
    code = (
        "import sys; from bastion.cli.main import build_parser; build_parser(); "
        "print(sorted({m.split('.')[0] + '.' + m.split('.')[1] if m.startswith('bastion.') "
        "else m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(ast.literal_eval(out))
    assert "bastion.cli" in loaded  # the probe sees the package it loads
    assert not loaded & {"bastion.server", "bastion.tui", "textual"}
