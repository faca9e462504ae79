"""Content that acts or hides: signatures past a prefix, and web pages with active content.

Two checks of the scanner (:mod:`bastion.files.scan`) that the first bytes alone
cannot make:

- :func:`find_embedded`: an archive or a program that starts after some other
  bytes. 7-Zip and WinRAR look for an archive's signature past the start of a
  file (that is how self-extracting archives work), so ``b"junk" + RAR`` opens
  in them as a RAR archive. The search covers the first
  :data:`EMBEDDED_SEARCH_BYTES` bytes and confirms each hit by the structure
  that follows the magic, so a stray ``MZ`` in a photo is not a program.
- :func:`find_active_markup`: a web page or an SVG image that runs script,
  embeds other documents, redirects or posts a form when a browser opens it
  (HTML smuggling and phishing pages arrive this way). The whole file is read in
  pieces (constant memory), lower-cased, UTF-16 decoded when it starts with a
  byte order mark.

Both read only the stream they are given and never raise for hostile content.
"""

from __future__ import annotations

import codecs
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from bastion.files.content_type import ContentType

#: How far into a file :func:`find_embedded` looks for a signature.
EMBEDDED_SEARCH_BYTES = 1024 * 1024
_MARKUP_PIECE_BYTES = 1024 * 1024
_MARKUP_OVERLAP_BYTES = 256
#: Unconfirmed hits of one magic checked before the window counts as crowded (ordinary
#: data has a few dozen ``MZ`` per MiB at most; only a file built to hide one has more).
MAX_HITS_PER_MAGIC = 4096

#: Magic numbers worth finding past the start, in the order they are reported.
_MAGICS: tuple[tuple[bytes, ContentType], ...] = (
    (b"Rar!\x1a\x07", ContentType.RAR),
    (b"7z\xbc\xaf\x27\x1c", ContentType.SEVEN_ZIP),
    (b"MSCF\x00\x00\x00\x00", ContentType.CAB),
    (b"\x7fELF", ContentType.ELF),
    (b"MZ", ContentType.PE),
)

# What makes a web page or an SVG image act when it is opened (bytes, lower case). Each
# pattern starts with a literal, so a search costs a few milliseconds per MiB.
_ACTIVE_ELEMENT = re.compile(rb"<(?:script|i?frame|object|embed|applet|foreignobject|form|base)\b")
_REFRESH = re.compile(rb"http-equiv\s*=\s*[\"']?refresh")
_SCRIPT_LINK = re.compile(rb"script\s*:")  # javascript: or vbscript: (checked before it)
_HANDLER = re.compile(rb"on[a-z]{3,}\s*=")  # onload= (checked: an attribute starts there)
_ATTRIBUTE_START = frozenset(b" \t\r\n\f\"'/;")


@dataclass(frozen=True, slots=True)
class Embedded:
    """A signature found past the start of a file: what it is and where it starts.

    ``crowded`` means the magic occurred more than :data:`MAX_HITS_PER_MAGIC`
    times without a confirmed hit: too many to check, so it is reported rather
    than let a real one hide behind decoys (``offset`` is then where the search
    stopped).
    """

    kind: ContentType
    offset: int
    crowded: bool = False


def find_embedded(window: bytes) -> list[Embedded]:
    """Archives and programs that start after the first byte of ``window``.

    ``window`` is the start of a file (up to :data:`EMBEDDED_SEARCH_BYTES`). A
    hit counts only if the bytes after the magic have that format's structure.
    Returns at most one hit per kind (the first). Never raises.
    """
    found = []
    for magic, kind in _MAGICS:
        start = 1
        for _ in range(MAX_HITS_PER_MAGIC):
            at = window.find(magic, start)
            if at == -1:
                break
            if _confirmed(window, at, kind):
                found.append(Embedded(kind, at))
                break
            start = at + 1
        else:
            found.append(Embedded(kind, start, crowded=True))
    return found


def _confirmed(window: bytes, at: int, kind: ContentType) -> bool:
    after = window[at : at + 8]
    if kind is ContentType.RAR:
        return after[6:7] == b"\x00" or after[6:8] == b"\x01\x00"  # RAR 4 or RAR 5
    if kind is ContentType.SEVEN_ZIP:
        return after[6:7] == b"\x00"  # major version 0
    if kind is ContentType.CAB:
        return len(window) >= at + 16
    if kind is ContentType.ELF:
        return (
            after[4:5] in (b"\x01", b"\x02")
            and after[5:6] in (b"\x01", b"\x02")
            and (after[6:7] == b"\x01")
        )
    # PE: the DOS header points at a "PE\0\0" signature inside the window.
    if len(window) < at + 0x40:
        return False
    (pe_offset,) = struct.unpack_from("<I", window, at + 0x3C)
    header = at + pe_offset
    return (
        pe_offset >= 4  # the smallest DOS stub a loader accepts
        and header + 4 <= len(window)
        and window[header : header + 4] == b"PE\x00\x00"
    )


def _lowered_pieces(stream: BinaryIO) -> Iterator[bytes]:
    """The stream in pieces, lower-cased, UTF-16 turned into UTF-8 when a BOM says so."""
    stream.seek(0)
    bom = stream.read(2)
    stream.seek(0)
    decoder = None
    if bom in (b"\xff\xfe", b"\xfe\xff"):
        encoding = "utf-16-le" if bom == b"\xff\xfe" else "utf-16-be"
        stream.seek(2)
        decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    while piece := stream.read(_MARKUP_PIECE_BYTES):
        if decoder is not None:
            piece = decoder.decode(piece).encode("utf-8", errors="replace")
        yield piece.lower()
    stream.seek(0)


def find_active_markup(stream: BinaryIO) -> str | None:
    """The first thing in a web page or SVG that acts when opened (``<script``...), or None."""
    tail = b""
    for piece in _lowered_pieces(stream):
        window = tail + piece
        found = _first_active(window)
        if found is not None:
            stream.seek(0)
            return found
        tail = window[-_MARKUP_OVERLAP_BYTES:]
    return None


def _first_active(window: bytes) -> str | None:
    element = _ACTIVE_ELEMENT.search(window)
    if element is not None:
        return f"a {element.group(0).decode('ascii')}> element"
    if _REFRESH.search(window):
        return "a refresh that sends you elsewhere"
    for link in _SCRIPT_LINK.finditer(window):
        before = window[max(0, link.start() - 4) : link.start()]
        if before.endswith((b"java", b"vb")):
            return f"a {'java' if before.endswith(b'java') else 'vb'}script: link"
    for handler in _HANDLER.finditer(window):
        if handler.start() > 0 and window[handler.start() - 1] in _ATTRIBUTE_START:
            name = handler.group(0).rstrip(b"= \t\r\n\f").decode("ascii")
            return f"an {name} handler"
    return None
