"""How the client package is wired: features plug in through Hooks, and no module circles back.

- The core (``client.py``) imports no feature, and no feature imports the core:
  each gets the client as a ``ClientCore``.
- No import cycles among the modules of ``bastion.client`` (a strongly-connected-
  components pass over their imports, function-level ones included).
- A kind, frame type or feature name is claimed once: a second claim is an error,
  not a silent replacement.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bastion.client import DEFAULT_FEATURES, Hooks
from bastion.client.feature import FeatureSpec, Registry, install_all
from bastion.protocol import frames

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "bastion" / "client"
# Modules that assemble the client from the core and its features.
ASSEMBLY = frozenset({"__init__", "_default"})


def client_imports(source: str) -> set[str]:
    """The ``bastion.client`` modules a source imports, anywhere in it (by short name)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[:2] != ["bastion", "client"]:
                continue
            if len(parts) > 2:
                found.add(parts[2])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[:2] == ["bastion", "client"] and len(parts) > 2:
                    found.add(parts[2])
    return found


def import_graph() -> dict[str, set[str]]:
    sources = {p.stem: p.read_text() for p in sorted(PACKAGE.glob("*.py"))}
    return {name: client_imports(text) & set(sources) - {name} for name, text in sources.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member (sorted)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_cycle_finder_finds_a_cycle_and_only_that() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_finder_sees_function_level_and_package_imports() -> None:
    source = (
        "from bastion.client import groups, files\n"
        "from bastion.client.events import Event\n"
        "def later():\n"
        "    import bastion.client.policy\n"
    )
    assert client_imports(source) == {"groups", "files", "events", "policy"}


def test_no_import_cycles_among_client_modules() -> None:
    assert cycles(import_graph()) == []


def test_the_core_imports_no_feature_and_no_feature_imports_the_core() -> None:
    graph = import_graph()
    features = {feature.install.__module__.rsplit(".", 1)[1] for feature in DEFAULT_FEATURES}
    assert graph["client"] & features == set()
    assert sorted(name for name in features if "client" in graph[name]) == []
    # Only the package and devices (which builds the client of a linked or imported
    # device) use the assembled client; everything below it sees a ClientCore.
    assert sorted(name for name, deps in graph.items() if ASSEMBLY & deps) == [
        "__init__",
        "devices",
    ]


def test_a_kind_is_claimed_once() -> None:
    registry: Registry[str, int] = Registry("payload kind")
    registry.add("text.note", 1)
    with pytest.raises(ValueError, match="already has a handler"):
        registry.add("text.note", 2)
    assert registry.get("text.note") == 1
    assert registry.get("other") is None


def test_a_feature_is_installed_once() -> None:
    installed: list[str] = []

    def install(client: object, hooks: Hooks) -> None:
        del client
        installed.append("x")
        hooks.pushes.add(frames.Synced, _no_event)

    twice = [FeatureSpec("twice", install), FeatureSpec("twice", install)]
    with pytest.raises(ValueError, match="installed twice"):
        install_all(twice, client=None)  # type: ignore[arg-type]
    assert installed == ["x"]


async def _no_event(frame: frames.Frame) -> None:
    del frame
