"""How the client package is wired: features plug in through Hooks.

- The core (``client.py``) imports no feature, and no feature imports the core:
  each gets the client as a ``ClientCore``. (No cycles anywhere in the package is
  tests/test_layout.py's rule.)
- A kind, frame type or feature name is claimed once: a second claim is an error,
  not a silent replacement.
"""

from __future__ import annotations

import pytest

from bastion.client import DEFAULT_FEATURES, Hooks
from bastion.client.feature import FeatureSpec, Registry, install_all
from bastion.protocol import frames
from tests.test_layout import import_graph

# Modules that assemble the client from the core and its features.
ASSEMBLY = frozenset({"bastion.client", "bastion.client._default"})


def test_the_core_imports_no_feature_and_no_feature_imports_the_core() -> None:
    edges = {(e.source, e.target) for e in import_graph() if e.source.startswith("bastion.client")}
    features = {feature.install.__module__ for feature in DEFAULT_FEATURES}
    assert sorted(t for s, t in edges if s == "bastion.client.client" and t in features) == []
    assert sorted(s for s, t in edges if s in features and t == "bastion.client.client") == []
    # Only the package and devices (which builds the client of a linked or imported
    # device) use the assembled client; everything below it sees a ClientCore.
    assert sorted({s for s, t in edges if t in ASSEMBLY and s not in ASSEMBLY}) == [
        "bastion.client.devices",
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
