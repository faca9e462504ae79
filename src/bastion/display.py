"""Text from other people, or from a server, made safe to show to a person. No I/O.

Everything a contact, a stranger or a server controls (message bodies, notes,
status lines, group and file names, reasons, user and device names) goes
through this module before a human-readable front end shows it. One rule for
every front end:

- C0 controls, DEL and C1 controls (ESC among them, so no escape sequence
  reaches the terminal) are shown as ``\\xNN``; newline, carriage return and
  tab as ``\\n``, ``\\r`` and ``\\t``;
- bidirectional controls (U+202A-202E, U+2066-2069, U+200E, U+200F, U+061C),
  the Unicode line and paragraph separators (U+2028, U+2029) and lone
  surrogates are shown as ``⟨U+202E⟩``;
- everything else is shown as it is.

:func:`escape_text` makes one line of any text. :func:`escape_body` keeps a
message's line breaks but starts every line after the first with
:data:`CONTINUATION`, so a line inside a message can never pass for the start
of another message. ``--json`` output does not use this module: JSON escapes
controls itself and programs get the text exactly.
"""

from __future__ import annotations

#: Bidirectional formatting characters: they reorder how the text after them reads.
BIDI_CONTROLS = frozenset(
    "\u202a\u202b\u202c\u202d\u202e"  # embeddings and overrides (LRE RLE PDF LRO RLO)
    "\u2066\u2067\u2068\u2069"  # isolates (LRI RLI FSI PDI)
    "\u200e\u200f\u061c"  # marks (LRM RLM ALM)
)
#: Characters some terminals and tools treat as a line break.
LINE_SEPARATORS = frozenset("\u2028\u2029")
#: What starts every line of a message after its first.
CONTINUATION = "    │ "

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def is_unsafe(ch: str) -> bool:
    """Whether the character ``ch`` must not reach a terminal as it is."""
    code = ord(ch)
    return (
        code < 0x20
        or 0x7F <= code < 0xA0
        or ch in BIDI_CONTROLS
        or ch in LINE_SEPARATORS
        or 0xD800 <= code <= 0xDFFF
    )


def visible(ch: str) -> str:
    """How an unsafe character is shown: ``\\n``, ``\\x1b`` or ``⟨U+202E⟩``."""
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if code < 0xA0:
        return f"\\x{code:02x}"
    return f"⟨U+{code:04X}⟩"


def escape_text(text: str) -> str:
    """``text`` as one line, with every unsafe character shown visibly. Never raises."""
    if not any(is_unsafe(ch) for ch in text):
        return text
    return "".join(visible(ch) if is_unsafe(ch) else ch for ch in text)


def body_lines(text: str) -> list[str]:
    """The lines of a message body (split at ``\\n`` or ``\\r\\n``), each escaped."""
    return [escape_text(line) for line in text.replace("\r\n", "\n").split("\n")]


def escape_body(text: str) -> str:
    """A message body for a terminal: its lines kept, every line after the first marked.

    The result holds no unsafe character other than the ``\\n`` between lines,
    and every line but the first starts with :data:`CONTINUATION`.
    """
    first, *rest = body_lines(text)
    return "\n".join([first, *(CONTINUATION + line for line in rest)])
