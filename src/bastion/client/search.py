"""Search across every conversation, over the decrypted history on this device only.

Nothing leaves the device and nothing is indexed: a search opens the sealed
history records one after the other, newest first, and stops at the limit
(:meth:`bastion.client.profile.Profile.search_messages`). A full-text index
would keep the words of every message readable on disk, so there is none; the
cost is one pass over the history, measured in docs/benchmarks.md.
"""

from __future__ import annotations

import msgspec

from bastion.client.feature import ClientCore
from bastion.client.records import HistoryRecord

MAX_TEXT_CHARS = 200
"""The longest text a search looks for."""
MAX_LIMIT = 500
"""The most messages one search returns."""
DEFAULT_LIMIT = 50


class _Text(msgspec.Struct):
    """The one field of a history record a search looks at (the others are not decoded)."""

    text: str


def check_query(text: str, limit: int = DEFAULT_LIMIT) -> None:
    """Raise ValueError, with a sentence a user understands, if a search cannot be run as asked."""
    if not text.strip():
        raise ValueError("say what to search for: the text is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"search for at most {MAX_TEXT_CHARS} characters")
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"the limit is a number from 1 to {MAX_LIMIT}")


def matches(record: HistoryRecord, text: str) -> bool:
    """Whether a message's text holds ``text``, ignoring case (as :func:`messages` matches)."""
    return text.casefold() in record.text.casefold()


def messages(client: ClientCore, text: str, *, limit: int = DEFAULT_LIMIT) -> list[HistoryRecord]:
    """Messages of every conversation (direct and group) whose text holds ``text``, newest first.

    The match ignores case (Unicode case folding: ``STRASSE`` finds ``Straße``).
    Each record names its conversation (``dm:<a>,<b>`` or ``group:<hex id>``)
    and its ``peer`` (the other user, or the group's conversation). At most
    ``limit`` records. Raises ValueError for an empty or too long text or a
    limit outside 1 to :data:`MAX_LIMIT`; :class:`~bastion.errors.ProfileError`
    if a stored record was altered.
    """
    check_query(text, limit)
    needle = text.casefold()
    return client.profile.search_messages(
        _Text, lambda record: needle in record.text.casefold(), HistoryRecord, limit=limit
    )
