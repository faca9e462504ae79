"""Groups as IRC channels: a stable, valid, unambiguous ``#name`` for each group. No I/O.

A group's name is anyone's choice (any admin may rename it), so it is turned
into a channel name with ASCII letters, digits, ``-``, ``_`` and ``.`` only:
look-alike letters from other alphabets cannot make a group pose as another
channel. When two groups would get the same channel (compared without case),
the later one gets a suffix from its group id (``#family-3fa91c``). A channel
keeps its name for the IRC session even when the group is renamed; the topic
shows the group's current name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_CHANNEL_CHARS = 40
SUFFIX_HEX = 6
_OTHER_RE = re.compile(r"[^A-Za-z0-9_.-]+")
_NICK_RE = re.compile(r"[a-z0-9._-]{1,64}")


def _nick_ok(name: str) -> bool:
    """Whether a member's name can be written as a nick (the chain names usernames)."""
    return _NICK_RE.fullmatch(name) is not None


def base_channel(name: str) -> str:
    """``#`` and the group name reduced to safe characters (``#group`` when none is left)."""
    reduced = _OTHER_RE.sub("-", name).strip("-.")[:MAX_CHANNEL_CHARS].strip("-.")
    return "#" + (reduced or "group")


def fold(channel: str) -> str:
    """A channel name compared as the IRC client does (CASEMAPPING=ascii)."""
    return channel.lower()


@dataclass(slots=True)
class ChannelBook:
    """Which channel stands for which group, for one IRC session."""

    by_channel: dict[str, bytes] = field(default_factory=dict)
    by_group: dict[bytes, str] = field(default_factory=dict)

    def channel_of(self, group_id: bytes, name: str) -> str:
        """The channel of a group: the one it has, or a new one that no other group holds."""
        known = self.by_group.get(group_id)
        if known is not None:
            return known
        channel = base_channel(name)
        if fold(channel) in self.by_channel:
            channel = f"{channel[: MAX_CHANNEL_CHARS + 1]}-{group_id.hex()[:SUFFIX_HEX]}"
            length = SUFFIX_HEX
            while fold(channel) in self.by_channel:  # a suffix that collides as well
                length += 2
                channel = f"{base_channel(name)}-{group_id.hex()[:length]}"
        self.by_channel[fold(channel)] = group_id
        self.by_group[group_id] = channel
        return channel

    def group_of(self, channel: str) -> bytes | None:
        """The group a channel stands for, if any."""
        return self.by_channel.get(fold(channel))


@dataclass(slots=True)
class ChannelView:
    """What the IRC client was last shown of a joined channel."""

    channel: str
    name: str
    members: set[str]
    admins: set[str]


def names_params(view: ChannelView) -> list[str]:
    """The members as in a NAMES reply (admins marked ``@``), in pieces that fit a line."""
    marked = sorted(("@" + m) if m in view.admins else m for m in view.members if _nick_ok(m))
    out: list[str] = []
    current = ""
    for nick in marked:
        if current and len(current) + len(nick) + 1 > 400:
            out.append(current)
            current = ""
        current = f"{current} {nick}".strip()
    if current or not out:
        out.append(current)
    return out
