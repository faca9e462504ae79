"""How the server's layers may import each other, checked on the source tree.

- Handlers never import ``bastion.server.net``: they see a connection only as ``Request``.
- Storage imports nothing from ``handlers``, ``net`` or ``cluster``.
- Nothing in the server registers handlers at import: every handler module exports
  ``ROUTES`` and ``server/app.py`` lists the modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

from bastion.server.app import HANDLER_MODULES

SERVER = Path(__file__).resolve().parents[2] / "src" / "bastion" / "server"


def imports(source: str) -> set[str]:
    """Every absolute module name a source imports (``from a.b import c`` gives a.b and a.b.c)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((SERVER / package).rglob("*.py")):
        for name in imports(path.read_text("utf-8")):
            if name.startswith(forbidden):
                found.append(f"{path.relative_to(SERVER).as_posix()} imports {name}")
    return found


def test_the_import_finder_sees_plain_from_and_function_imports() -> None:
    source = (
        "import bastion.server.net.listener\n"
        "from bastion.server import net\n"
        "def later():\n"
        "    from bastion.server.net.connection import ClientConnection\n"
    )
    assert {
        "bastion.server.net.listener",
        "bastion.server.net",
        "bastion.server.net.connection",
    } <= imports(source)


def test_handlers_never_import_the_network_layer() -> None:
    assert offenders("handlers", ("bastion.server.net",)) == []


def test_storage_imports_nothing_above_it() -> None:
    forbidden = ("bastion.server.handlers", "bastion.server.net", "bastion.server.cluster")
    assert offenders("storage", forbidden) == []


def test_every_handler_module_is_routed_by_the_app() -> None:
    on_disk = {p.stem for p in (SERVER / "handlers").glob("*.py")} - {"__init__", "_context"}
    assert {m.__name__.rsplit(".", 1)[1] for m in HANDLER_MODULES} == on_disk
    assert all(m.ROUTES for m in HANDLER_MODULES)
