"""The public API of ``bastion.client``: exactly the names front ends may use, each real, and front
ends that import nothing else of the client package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bastion.client

EXPECTED = [
    "DEFAULT_FEATURES",
    "SENT_AWAY",
    "UNANSWERED",
    "USERNAME_RE",
    "Backoff",
    "Client",
    "ClientCore",
    "ConnectionStateEvent",
    "ContactRecord",
    "DevicesChangedEvent",
    "Event",
    "Feature",
    "FeatureEvent",
    "HistoryRecord",
    "Hooks",
    "KeyChangedEvent",
    "MessageEvent",
    "SendRefusedError",
    "WarningEvent",
    "check_new_passphrase",
    "check_text",
    "check_username",
    "comparison",
    "contacts",
    "devices",
    "files",
    "group_invites",
    "groups",
    "link_history",
    "message_actions",
    "now_ms",
    "open_client",
    "outbox",
    "policy",
    "presence",
    "receipts",
    "receiving",
    "replies",
    "search",
    "trust",
    "verification",
    "weakness",
]


def _isort_key(name: str) -> tuple[int, str]:
    """Constants, then classes, then the rest (functions, modules), each alphabetical."""
    kind = 0 if name.isupper() else 1 if name[0].isupper() else 2
    return kind, name


def test_all_is_exactly_the_expected_names_in_sorted_order() -> None:
    assert bastion.client.__all__ == EXPECTED
    assert bastion.client.__all__ == sorted(bastion.client.__all__, key=_isort_key)


def test_every_exported_name_resolves() -> None:
    for name in bastion.client.__all__:
        assert getattr(bastion.client, name, None) is not None, name


def test_no_exported_name_is_private() -> None:
    assert [name for name in bastion.client.__all__ if name.startswith("_")] == []


def test_the_exported_client_installs_the_default_features() -> None:
    names = [feature.name for feature in bastion.client.DEFAULT_FEATURES]
    assert len(set(names)) == len(names)
    assert {"verification", "receipts", "policy", "files", "groups", "contacts"} <= set(names)
    assert issubclass(bastion.client.Client, bastion.client.client.Client)


FRONT_ENDS = Path(__file__).resolve().parents[2] / "src" / "bastion"


def client_imports(tree: ast.AST) -> list[str]:
    """Each ``bastion.client`` import of a module: ``bastion.client.X`` modules and names."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "bastion.client":
                found.extend(alias.name for alias in node.names)
            elif node.module.startswith("bastion.client."):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(a.name for a in node.names if a.name.startswith("bastion.client"))
    return found


def test_the_import_finder_sees_modules_and_names() -> None:
    tree = ast.parse(
        "from bastion.client import Client, groups\n"
        "from bastion.client.profile import Profile\n"
        "def later():\n"
        "    import bastion.client.transport\n"
    )
    assert sorted(client_imports(tree)) == [
        "Client",
        "bastion.client.profile",
        "bastion.client.transport",
        "groups",
    ]


@pytest.mark.parametrize("front_end", ["cli", "tui"])
def test_front_ends_import_only_the_exported_names(front_end: str) -> None:
    outside = {
        f"{path.name}: {name}"
        for path in sorted((FRONT_ENDS / front_end).rglob("*.py"))
        for name in client_imports(ast.parse(path.read_text()))
        if name not in bastion.client.__all__
    }
    assert sorted(outside) == []
