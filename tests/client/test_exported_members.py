"""The public API of ``bastion.client``: exactly the names front ends may use, each real."""

from __future__ import annotations

import bastion.client

EXPECTED = [
    "DEFAULT_FEATURES",
    "UNANSWERED",
    "USERNAME_RE",
    "Client",
    "ClientCore",
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
    "check_username",
    "comparison",
    "contacts",
    "devices",
    "files",
    "group_invites",
    "groups",
    "now_ms",
    "open_client",
    "outbox",
    "policy",
    "presence",
    "receipts",
    "receiving",
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
