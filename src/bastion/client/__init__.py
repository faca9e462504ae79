"""The client library: profile, connection, end-to-end messaging. Front ends sit on it.

Everything a front end may use is named in ``__all__``: the :class:`Client`
(with :data:`DEFAULT_FEATURES` installed), the events it yields, the records
it returns, and the feature modules as namespaces (``groups.send_text(client,
...)``). Anything else in the package is internal and may change.
"""

from __future__ import annotations

from bastion.client import (
    comparison,
    contacts,
    devices,
    files,
    group_invites,
    groups,
    link_history,
    message_actions,
    outbox,
    policy,
    presence,
    receipts,
    receiving,
    replies,
    search,
    trust,
    verification,
)
from bastion.client._default import DEFAULT_FEATURES, Client, open_client
from bastion.client._util import UNANSWERED, USERNAME_RE, check_username, now_ms
from bastion.client.client import SendRefusedError, check_text
from bastion.client.events import (
    ConnectionStateEvent,
    DevicesChangedEvent,
    Event,
    FeatureEvent,
    KeyChangedEvent,
    MessageEvent,
    WarningEvent,
)
from bastion.client.feature import ClientCore, Feature, Hooks
from bastion.client.kept_connection import SENT_AWAY
from bastion.client.passphrase import check_new_passphrase, weakness
from bastion.client.reconnect import Backoff
from bastion.client.records import ContactRecord, HistoryRecord

__all__ = [
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
