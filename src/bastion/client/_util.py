"""Small helpers every client module shares: the clock, usernames, peers' JSON, conversation ids.

A conversation id says what it is by its prefix (usernames hold no ``:``):
``dm:<a>,<b>`` for the 1:1 chat of two users (sorted, so the same on both
sides) and ``group:<hex id>`` for a group.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from bastion.crypto.payload import direct_conversation
from bastion.protocol import frames

USERNAME_RE = re.compile(frames.USERNAME_PATTERN)
DM_PREFIX = "dm:"
GROUP_PREFIX = "group:"
# Refusals that say nothing about the message itself: it may go through on another try.
TRANSIENT_ERRORS = frozenset({"disconnected", "timeout", "unreachable", "rate_limited", "internal"})
# No answer came: the server may or may not have stored the message, so it stays kept.
UNANSWERED = frozenset({"disconnected", "timeout"})


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def check_username(username: str) -> str:
    """Return ``username`` if valid; raise ValueError with a sentence a user understands."""
    if not USERNAME_RE.match(username):
        raise ValueError(
            f"{username!r} is not a valid username: use 3 to 32 characters, "
            "lowercase letters, digits, '.', '_' or '-'"
        )
    return username


def json_object(body: str) -> dict[str, Any]:
    """A peer's JSON payload body as a dict; empty if it is not a JSON object (never raises)."""
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def dm_conversation(a: str, b: str) -> str:
    """The conversation id of the 1:1 chat between two users: ``dm:<a>,<b>``, sorted."""
    return direct_conversation(a, b)


def is_dm_conversation(conversation: str) -> bool:
    """Whether ``conversation`` is a 1:1 chat (not a group)."""
    return conversation.startswith(DM_PREFIX)


def group_conversation(group_id: bytes) -> str:
    """The conversation id of a group: ``group:<hex id>``."""
    return GROUP_PREFIX + group_id.hex()
