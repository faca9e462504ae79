"""Group chats on the client, as one API: the verified chain and the messages sent under it.

:mod:`bastion.client.group_state` keeps the chain (sync, ingest, create and
change, forks); :mod:`bastion.client.group_messages` sends and receives
messages and room keys on top of it. Front ends use this module; ``FEATURE``
is the receiving side that :class:`bastion.client.Client` installs.
"""

from __future__ import annotations

from bastion.client.group_messages import (
    FEATURE,
    history,
    send_body,
    send_text,
)
from bastion.client.group_state import (
    MAX_INBOUND_PER_DEVICE,
    MAX_SYNC_PAGES,
    MAX_UNKNOWN_GROUP_KEYS,
    MAX_UNKNOWN_GROUP_KEYS_PER_SENDER,
    GroupChangeEvent,
    GroupRecord,
    GroupWarningEvent,
    InboundSessions,
    add_member,
    chain_hashes,
    change,
    change_log,
    conversation,
    create,
    groups,
    ingest,
    resolve,
    settle_fork,
    state_of,
    sync,
)
from bastion.groups.chain import (
    Demote,
    GroupState,
    Leave,
    MemberChange,
    Promote,
    RemoveMember,
    Rename,
)

__all__ = [
    "FEATURE",
    "MAX_INBOUND_PER_DEVICE",
    "MAX_SYNC_PAGES",
    "MAX_UNKNOWN_GROUP_KEYS",
    "MAX_UNKNOWN_GROUP_KEYS_PER_SENDER",
    "Demote",
    "GroupChangeEvent",
    "GroupRecord",
    "GroupState",
    "GroupWarningEvent",
    "InboundSessions",
    "Leave",
    "MemberChange",
    "Promote",
    "RemoveMember",
    "Rename",
    "add_member",
    "chain_hashes",
    "change",
    "change_log",
    "conversation",
    "create",
    "groups",
    "history",
    "ingest",
    "resolve",
    "send_body",
    "send_text",
    "settle_fork",
    "state_of",
    "sync",
]
