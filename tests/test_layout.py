"""Rules about the source tree that a reader cannot check at a glance.

- The no-I/O set (``protocol``, ``crypto``, ``groups``, ``server/core``, ``ratelimit.py``)
  does no I/O, reads no clock, and imports nothing first-party but itself and the error tree
  (sans-I/O, STYLE.md).
- The layers point one way (docs/architecture.md): front ends import only the client's public
  API (``bastion.client.__all__``), ``bastion.errors``, ``bastion.display`` and each other;
  handlers never import ``server/net``; storage imports nothing above it; the server and the
  client never import each other.
- No import cycles in the package, lazy and type-checking imports included; an import inside a
  function only loads a heavy or optional part (``LAZY_ALLOWED``).
- No ``assert`` in the package: it vanishes under ``python -O``; validation must raise.
- No ``random`` module anywhere in the package: secrets come from ``secrets`` or the libraries.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

import bastion.client

SRC = Path(__file__).resolve().parent.parent / "src" / "bastion"
IO_MODULES = frozenset(
    {"asyncio", "sqlite3", "socket", "ssl", "picows", "threading", "time", "pathlib", "shutil"}
    | {"subprocess", "tempfile", "select", "selectors", "datetime"}
)


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


def test_no_assert_statements_in_the_package() -> None:
    offenders = {relative(p): assert_lines(p.read_text()) for p in modules(SRC)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_random_module_in_the_package() -> None:
    offenders = [relative(p) for p in modules(SRC) if "random" in imported_modules(p.read_text())]
    assert offenders == []


# --- the import graph ---------------------------------------------------------------------------
#
# Every module of the package is a node; ``import a.b`` and ``from a import b`` are edges, to the
# submodule when ``b`` is one, else to ``a``. An edge remembers whether it sits inside a function
# (a lazy import, which can hide a cycle) and whether it exists for the type checker only.


@dataclass(frozen=True, slots=True)
class Edge:
    source: str
    target: str
    line: int
    lazy: bool  # inside a function: runs on first call, not at import
    typing_only: bool  # under ``if TYPE_CHECKING:``


def module_name(path: Path, root: Path = SRC) -> str:
    """``src/bastion/server/core/delivery.py`` -> ``bastion.server.core.delivery``."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def package_edges(
    name: str, source: str, known: frozenset[str], *, is_package: bool = False
) -> list[Edge]:
    """The edges from module ``name`` to other modules in ``known`` (first-party only)."""
    edges: list[Edge] = []
    package = name if is_package else name.rpartition(".")[0]

    def add(target: str, node: ast.stmt, lazy: bool, typing_only: bool) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            edges.append(Edge(name, target, node.lineno, lazy, typing_only))

    def visit(body: list[ast.stmt], lazy: bool, typing_only: bool) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node, lazy, typing_only)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    module = f"{base}.{node.module}" if node.module else base
                else:
                    module = node.module or ""
                for alias in node.names:
                    submodule = f"{module}.{alias.name}"
                    add(submodule if submodule in known else module, node, lazy, typing_only)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(node.body, True, typing_only)
            elif isinstance(node, ast.If):
                inner = typing_only or _is_type_checking(node.test)
                visit(node.body, lazy, inner)
                visit(node.orelse, lazy, typing_only)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    children = getattr(node, field, None)
                    if isinstance(children, list):
                        stmts = [c for c in children if isinstance(c, ast.stmt)]
                        for handler in children:
                            if isinstance(handler, ast.ExceptHandler):
                                stmts.extend(handler.body)
                        visit(stmts, lazy, typing_only)

    visit(ast.parse(source).body, False, False)
    return edges


def import_graph(root: Path = SRC) -> list[Edge]:
    """Every first-party import edge in the package under ``root``."""
    paths = modules(root)
    known = frozenset(module_name(p, root) for p in paths)
    return [
        edge
        for path in paths
        for edge in package_edges(
            module_name(path, root), path.read_text(), known, is_package=path.name == "__init__.py"
        )
    ]


def cycles(edges: Iterable[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        # Iterative, so a long chain of imports cannot exhaust Python's recursion limit.
        work = [(node, iter(sorted(graph[node])))]
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        while work:
            current, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[current] = min(low[current], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[current])
            if low[current] == index[current]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == current:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(found)


def within(module: str, *prefixes: str) -> bool:
    """Whether ``module`` is one of ``prefixes`` or inside one of them."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


GRAPH_SYNTHETIC = {
    "pkg/__init__.py": "from pkg.api import thing\n",
    "pkg/api.py": (
        "from typing import TYPE_CHECKING\n"
        "from pkg import util\n"
        "from . import helpers as h\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.core import Core\n"
        "def later():\n"
        "    from pkg.core import make\n"
        "    import textual\n"
    ),
    "pkg/util.py": "import os\nfrom .sub.deep import value\n",
    "pkg/helpers.py": "",
    "pkg/core.py": "from pkg.api import thing\n",
    "pkg/sub/__init__.py": "from .deep import value\n",
    "pkg/sub/deep.py": "from ..util import os\n",
}


@pytest.fixture
def synthetic_package(tmp_path: Path) -> Path:
    for name, text in GRAPH_SYNTHETIC.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "pkg"


def test_graph_resolves_every_kind_of_first_party_import(synthetic_package: Path) -> None:
    edges = {(e.source, e.target, e.lazy, e.typing_only) for e in import_graph(synthetic_package)}
    assert edges == {
        ("pkg", "pkg.api", False, False),
        ("pkg.api", "pkg.util", False, False),  # a submodule named in ``from pkg import``
        ("pkg.api", "pkg.helpers", False, False),  # relative, aliased
        ("pkg.api", "pkg.core", False, True),  # for the type checker only
        ("pkg.api", "pkg.core", True, False),  # inside a function
        ("pkg.util", "pkg.sub.deep", False, False),
        ("pkg.core", "pkg.api", False, False),
        ("pkg.sub", "pkg.sub.deep", False, False),
        ("pkg.sub.deep", "pkg.util", False, False),  # two dots climb to the parent package
    }


def test_cycle_finder_reports_each_circle_once(synthetic_package: Path) -> None:
    assert cycles(import_graph(synthetic_package)) == [
        ["pkg.api", "pkg.core"],
        ["pkg.sub.deep", "pkg.util"],
    ]
    line = [Edge(f"m{i}", f"m{i + 1}", 1, False, False) for i in range(3000)]
    assert cycles(line) == []  # deep chains need no recursion
    assert cycles([*line, Edge("m3000", "m0", 1, False, False)]) == [
        sorted(f"m{i}" for i in range(3001))
    ]


def test_within_matches_whole_package_names() -> None:
    assert within("bastion.server.net.connection", "bastion.server.net")
    assert within("bastion.server.net", "bastion.server.net")
    assert not within("bastion.server.network", "bastion.server.net")


# --- the layers hold in the package -------------------------------------------------------------

# Modules that compute and never touch the world: no I/O, no clock, and (first-party) nothing but
# each other and the error tree.
NO_IO = (
    "bastion.protocol",
    "bastion.crypto",
    "bastion.groups",
    "bastion.server.core",
    "bastion.ratelimit",
)
FRONT_ENDS = ("bastion.cli", "bastion.tui", "bastion.gateway")
# What a front end may import besides the client's public API and each other.
FRONT_END_ALLOWED = ("bastion", "bastion.errors", "bastion.display", "bastion.tlsprofile")
# The two operator commands run or inspect a server; they load it on use.
SERVER_COMMANDS = ("bastion.cli.server", "bastion.cli.admin")
# Imports inside a function: only heavy or optional parts loaded on first use, never a way to
# hide a cycle.
LAZY_ALLOWED = (
    "textual",
    "rich.progress",
    "uvloop",
    "zxingcpp",
    "PIL",
    "bastion.tui",  # Textual, for ``bastion chat``
    "bastion.server",  # from the operator commands only (see SERVER_COMMANDS)
    "bastion.server.storage.postgres",  # asyncpg, for a PostgreSQL node only
    "bastion.server.cluster.redis",  # redis, for a clustered node only
    "bastion.server.net.proxy",  # aiofastnet, behind a PROXY-protocol balancer only
)
# (importer, forbidden import): the layers below never reach up.
FORBIDDEN = (
    ("bastion.server.handlers", "bastion.server.net"),
    ("bastion.server.storage", "bastion.server.handlers"),
    ("bastion.server.storage", "bastion.server.net"),
    ("bastion.server.storage", "bastion.server.cluster"),
    ("bastion.server.storage", "bastion.server.app"),
    ("bastion.server.core", "bastion.server.storage"),
    ("bastion.server", "bastion.client"),
    ("bastion.server", "bastion.cli"),
    ("bastion.server", "bastion.tui"),
    ("bastion.client", "bastion.server"),
    ("bastion.client", "bastion.cli"),
    ("bastion.client", "bastion.tui"),
)


def lazy_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import inside a function, third-party ones included."""
    found: list[tuple[int, str]] = []
    for function in ast.walk(ast.parse(source)):
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    found.extend((node.lineno, alias.name) for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.extend((node.lineno, f"{node.module}.{a.name}") for a in node.names)
    return sorted(set(found))


def names_from(source: str, module: str) -> set[str]:
    """The names a source takes with ``from <module> import ...``."""
    return {
        alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == module
        for alias in node.names
    }


def front_end_offences(edges: Iterable[Edge], public: Iterable[str]) -> list[str]:
    """Front-end imports of anything but the client's public API, each other and the allowed."""
    allowed = {*FRONT_END_ALLOWED, "bastion.client", *(f"bastion.client.{n}" for n in public)}
    return [
        f"{e.source}:{e.line} imports {e.target}"
        for e in edges
        if within(e.source, *FRONT_ENDS)
        and not within(e.target, *FRONT_ENDS)
        and e.target not in allowed
        and not (e.source in SERVER_COMMANDS and within(e.target, "bastion.server"))
    ]


def test_lazy_import_finder_sees_nested_functions_only() -> None:
    source = (
        "import os\n"
        "def outer():\n"
        "    import uvloop\n"
        "    async def inner():\n"
        "        from bastion.server import app\n"
        "    return inner\n"
    )
    assert lazy_imports(source) == [(3, "uvloop"), (5, "bastion.server.app")]


def test_front_end_rule_tells_public_from_internal() -> None:
    edges = [
        Edge("bastion.cli.messages", "bastion.client", 1, False, False),
        Edge("bastion.cli.messages", "bastion.client.groups", 2, False, False),
        Edge("bastion.cli.messages", "bastion.client.transport", 3, False, False),
        Edge("bastion.tui.chat", "bastion.crypto.safety", 4, False, False),
        Edge("bastion.tui.chat", "bastion.cli._common", 5, False, False),
        Edge("bastion.cli.server", "bastion.server.main", 6, True, False),
        Edge("bastion.cli.messages", "bastion.server.main", 7, True, False),
    ]
    assert front_end_offences(edges, ["groups"]) == [
        "bastion.cli.messages:3 imports bastion.client.transport",
        "bastion.tui.chat:4 imports bastion.crypto.safety",
        "bastion.cli.messages:7 imports bastion.server.main",
    ]


def no_io_sources() -> list[Path]:
    found: list[Path] = []
    for name in NO_IO:
        path = SRC.parent.joinpath(*name.split("."))
        found.extend(modules(path) if path.is_dir() else [path.with_suffix(".py")])
    return found


@pytest.mark.parametrize("path", no_io_sources(), ids=relative)
def test_the_no_io_set_does_no_io(path: Path) -> None:
    assert sorted(imported_modules(path.read_text()) & IO_MODULES) == []


def test_the_no_io_set_imports_only_itself_and_the_error_tree() -> None:
    offences = [
        f"{e.source}:{e.line} imports {e.target}"
        for e in import_graph()
        if within(e.source, *NO_IO) and not within(e.target, *NO_IO, "bastion.errors")
    ]
    assert offences == []


def test_front_ends_use_only_the_client_public_api() -> None:
    public = bastion.client.__all__
    assert front_end_offences(import_graph(), public) == []
    private = {
        relative(path): sorted(names_from(path.read_text(), "bastion.client") - set(public))
        for root in FRONT_ENDS
        for path in modules(SRC.parent.joinpath(*root.split(".")))
    }
    assert {k: v for k, v in private.items() if v} == {}


@pytest.mark.parametrize(("importer", "forbidden"), FORBIDDEN)
def test_layers_never_import_upward(importer: str, forbidden: str) -> None:
    offences = [
        f"{e.source}:{e.line} imports {e.target}"
        for e in import_graph()
        if within(e.source, importer) and within(e.target, forbidden)
    ]
    assert offences == []


def test_no_import_cycles() -> None:
    # Lazy and type-checking imports count: they hide a circle, they do not remove it.
    assert cycles(import_graph()) == []


def test_imports_inside_functions_only_load_heavy_parts() -> None:
    offences = [
        f"{relative(path)}:{line} imports {module}"
        for path in modules(SRC)
        for line, module in lazy_imports(path.read_text())
        if not within(module, *LAZY_ALLOWED)
        and not within(module.rpartition(".")[0], *LAZY_ALLOWED)
    ]
    assert offences == []
    server_loads = [
        f"{e.source}:{e.line}"
        for e in import_graph()
        if e.lazy
        and within(e.target, "bastion.server")
        and within(e.source, *FRONT_ENDS)
        and e.source not in SERVER_COMMANDS
    ]
    assert server_loads == []
