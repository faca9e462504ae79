"""The IRC wire format, and making peers' text safe for an IRC client. No I/O.

Messages follow RFC 1459/2812 with the IRCv3 message-tags prefix
(``@tags :prefix COMMAND params :trailing``). What the gateway writes is one
line of at most :data:`MAX_LINE_BYTES` bytes (CR LF included): longer texts are
split on UTF-8 boundaries, at a space where there is one (:func:`split_text`).

Everything a peer controls (message text, names of groups and files, status
lines, reasons) goes through :func:`clean_text` before it reaches the IRC
client: CTCP is dropped (an ACTION becomes ``* nick text``), IRC formatting
codes are removed, and every other control or bidi character is shown visibly
as :mod:`bastion.display` does, so no peer can inject an IRC line or fake one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from bastion.display import is_unsafe, visible

MAX_LINE_BYTES = 512  # RFC 1459 §2.3: CR LF included
MAX_CLIENT_LINE_BYTES = 8192  # a longer line from the IRC client ends the connection
MAX_PARAMS = 15
SERVER = "bastion"
SERVICE = "*bastion"  # the nick the gateway's notices come from
SERVICE_PREFIX = f"{SERVICE}!bastion@{SERVER}"

# \x02 bold, \x03 colour (with up to two numbers), \x04 hex colour, \x0f reset, \x11 monospace,
# \x16 reverse, \x1d italics, \x1e strike-through, \x1f underline.
FORMATTING_RE = re.compile(
    r"\x03(?:\d{1,2}(?:,\d{1,2})?)?|\x04(?:[0-9a-fA-F]{6}(?:,[0-9a-fA-F]{6})?)?|[\x02\x0f\x11\x16\x1d\x1e\x1f]"
)
CTCP_RE = re.compile(r"\x01([^\x01]*)(?:\x01|$)")
LINE_BREAK_RE = re.compile(r"\r\n|[\r\n\u2028\u2029\x85]")


@dataclass(frozen=True, slots=True)
class Message:
    """One parsed IRC line: tags, prefix, command (upper-cased) and parameters."""

    command: str
    params: list[str] = field(default_factory=list)
    prefix: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def parse(raw: bytes) -> Message | None:
    """One line from the IRC client (without or with its CR LF); None for an empty line.

    Raises ValueError for a line that is not an IRC message. Bytes that are not
    UTF-8 are replaced (some clients still send Latin-1).
    """
    text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    text = text.replace("\x00", "")
    if not text.strip():
        return None
    tags: dict[str, str] = {}
    rest = text.lstrip(" ")
    if rest.startswith("@"):
        raw_tags, _, rest = rest[1:].partition(" ")
        for item in raw_tags.split(";"):
            if item:
                key, _, value = item.partition("=")
                tags[key] = value
        rest = rest.lstrip(" ")
    prefix = None
    if rest.startswith(":"):
        prefix, _, rest = rest[1:].partition(" ")
        rest = rest.lstrip(" ")
    command, _, rest = rest.partition(" ")
    if not command or not (command.isascii() and (command.isalpha() or command.isdigit())):
        raise ValueError("not an IRC command")
    params: list[str] = []
    while rest:
        rest = rest.lstrip(" ")
        if not rest:
            break
        if rest.startswith(":") or len(params) == MAX_PARAMS - 1:
            params.append(rest[1:] if rest.startswith(":") else rest)
            break
        param, _, rest = rest.partition(" ")
        params.append(param)
    return Message(command=command.upper(), params=params, prefix=prefix, tags=tags)


def line(prefix: str | None, command: str, *params: str) -> bytes:
    """One line to the IRC client, CR LF included; the last parameter may hold spaces.

    The last parameter is always written as the trailing one (``:text``), as
    most servers do. CR, LF and NUL cannot be in a parameter (callers clean
    what peers sent); as a last guard they become spaces here, so no line can
    ever carry another.
    """
    parts = [f":{prefix}"] if prefix else []
    parts.append(command)
    for index, param in enumerate(params):
        safe = param.replace("\r", " ").replace("\n", " ").replace("\x00", " ")
        if index == len(params) - 1:
            parts.append(":" + safe)
        else:
            parts.append(safe.lstrip(":").replace(" ", "_") or "*")
    return (" ".join(parts)).encode("utf-8") + b"\r\n"


def user_prefix(nick: str) -> str:
    """The ``nick!user@host`` of a Bastion user as the IRC client sees them."""
    return f"{nick}!{nick}@{SERVER}"


# --- text from peers ---------------------------------------------------------------------------


def strip_formatting(text: str) -> str:
    """``text`` without IRC bold, colour, italics, underline, reverse and reset codes."""
    return FORMATTING_RE.sub("", text)


def escape_line(text: str) -> str:
    """One line with every control and bidi character shown visibly (a tab is a space)."""
    text = text.replace("\t", " ")
    if not any(is_unsafe(ch) for ch in text):
        return text
    return "".join(visible(ch) if is_unsafe(ch) else ch for ch in text)


def clean_text(text: str, sender: str) -> list[str]:
    """A peer's message as the lines to show on IRC: CTCP and formatting gone, controls visible.

    An ACTION (``/me``) becomes ``* sender text``; any other CTCP request is
    dropped. Empty lines are left out; an empty result means nothing is shown.
    """
    out: list[str] = []
    for part in LINE_BREAK_RE.split(text):
        action, raw = "", part
        if part.startswith("\x01ACTION ") or part == "\x01ACTION\x01":
            body = part[len("\x01ACTION") :].lstrip(" ")
            action, raw = f"* {sender} ", body.split("\x01", 1)[0]
        stripped = CTCP_RE.sub("", raw)
        shown = escape_line(strip_formatting(stripped)).strip(" ")
        if shown or action:
            out.append((action + shown).rstrip(" "))
    return out


def ctcp_commands(text: str) -> list[str]:
    """The CTCP commands in ``text`` other than ACTION (letters and digits only, for a notice)."""
    names = []
    for body in CTCP_RE.findall(text):
        name = re.sub(r"[^A-Z0-9]", "", body.split(" ", 1)[0].upper())[:16]
        if name and name != "ACTION":
            names.append(name)
    return names


def clean_name(text: str) -> str:
    """A name or short text from a peer as one safe line (group names, file names, statuses)."""
    return escape_line(strip_formatting(CTCP_RE.sub("", text)))


def outgoing_text(text: str, me: str) -> str | None:
    """What our user typed, as it goes to peers: IRC formatting removed, CTCP refused.

    An ACTION becomes ``* me text``; any other CTCP (VERSION, PING, DCC...) is
    not sent (None).
    """
    if text.startswith("\x01ACTION"):
        body = text[len("\x01ACTION") :].strip("\x01").lstrip(" ")
        return strip_formatting(f"* {me} {body}".rstrip(" "))
    if "\x01" in text:
        return None
    return strip_formatting(text)


def split_text(text: str, budget: int) -> list[str]:
    """``text`` in pieces of at most ``budget`` UTF-8 bytes, split at a space where possible.

    A split at a space drops that space (a reader joins the pieces with one); a
    word longer than the budget is cut between two characters, never inside one.
    """
    if budget < 8:
        raise ValueError("the line budget is too small")
    pieces: list[str] = []
    rest = text
    while len(rest.encode("utf-8")) > budget:
        encoded = rest.encode("utf-8")[:budget]
        cut = encoded.decode("utf-8", errors="ignore")  # whole characters only
        space = cut.rfind(" ")
        if space > 0:
            pieces.append(cut[:space])
            rest = rest[space + 1 :]
        else:
            pieces.append(cut)
            rest = rest[len(cut) :]
    if rest or not pieces:
        pieces.append(rest)
    return pieces


def text_lines(prefix: str, command: str, target: str, lines: list[str]) -> list[bytes]:
    """PRIVMSG or NOTICE lines of ``lines`` to ``target``, each at most 512 bytes."""
    head = len(f":{prefix} {command} {target} :".encode()) + 2
    budget = MAX_LINE_BYTES - head
    out: list[bytes] = []
    for text in lines:
        for piece in split_text(text, budget):
            if piece:
                out.append(line(prefix, command, target, piece))
    return out
