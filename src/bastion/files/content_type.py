"""The true type of a file, from its first bytes rather than its name.

A tight table of magic numbers rather than a library: the scanner needs only
the types it blocks or must tell apart (executables, scripts, shortcuts,
installers, archives it looks into, and the documents whose extension it checks),
each decided by a documented, fixed signature. Generic detectors
(``puremagic``, ``filetype``, libmagic) know thousands of types we do not act on,
disagree on ambiguous cases such as ``CA FE BA BE`` (Java class or universal
Mach-O), and libmagic adds a C parser of hostile input to the attack surface.
ZIP containers (APK, JAR, OOXML, ODF) are told apart by the scanner from their
member names, which the first bytes cannot show.
"""

from __future__ import annotations

import enum
import re
import struct


class ContentType(enum.StrEnum):
    """What a file really is, by content. The value is a phrase a user understands."""

    EMPTY = "an empty file"
    PE = "a Windows program (PE executable)"
    ELF = "a Linux program (ELF executable)"
    MACHO = "a macOS program (Mach-O executable)"
    SCRIPT = "a script (starts with #!)"
    LNK = "a Windows shortcut"
    JAVA_CLASS = "a Java class file"
    OLE = "an OLE compound document (old Office format or installer)"
    PDF = "a PDF document"
    PNG = "a PNG image"
    JPEG = "a JPEG image"
    GIF = "a GIF image"
    ZIP = "a ZIP archive"
    GZIP = "a gzip-compressed file"
    BZIP2 = "a bzip2-compressed file"
    XZ = "an xz-compressed file"
    TAR = "a tar archive"
    SEVEN_ZIP = "a 7-Zip archive"
    RAR = "a RAR archive"
    CAB = "a Windows cabinet archive"
    TEXT = "plain text"
    HTML = "a web page (HTML)"
    SVG = "an SVG image"
    ONENOTE = "a OneNote section (it can carry programs that run with one click)"
    CLICKONCE = "a ClickOnce application or shortcut (it installs and runs a program)"
    UNKNOWN = "an unrecognised binary format"
    # Refinements of ZIP, decided from member names by the scanner.
    APK = "an Android app (APK)"
    JAR = "a Java archive (JAR)"
    OOXML = "an Office Open XML document"
    ODF = "an OpenDocument file"


#: Types that run code on their own and are always blocked.
EXECUTABLE_TYPES = frozenset(
    {
        ContentType.PE,
        ContentType.ELF,
        ContentType.MACHO,
        ContentType.SCRIPT,
        ContentType.LNK,
        ContentType.JAVA_CLASS,
        ContentType.APK,
        ContentType.JAR,
    }
)

#: Archives that cannot be looked into, so their contents cannot be vouched for.
OPAQUE_ARCHIVES = frozenset({ContentType.SEVEN_ZIP, ContentType.RAR, ContentType.CAB})

#: Documents that start a program on a click, always blocked.
LAUNCHER_TYPES = frozenset({ContentType.ONENOTE, ContentType.CLICKONCE})

#: Markup a browser runs: blocked when it holds active content.
WEB_TYPES = frozenset({ContentType.HTML, ContentType.SVG})

#: How many leading bytes :func:`sniff` needs.
HEAD_BYTES = 4096

_ZIPS = frozenset({ContentType.ZIP, ContentType.OOXML, ContentType.ODF})
# Text that happens to be markup is still text to an editor; active markup is caught apart.
_TEXTS = frozenset({ContentType.TEXT, ContentType.HTML, ContentType.SVG})

#: Extension -> the content types it may hold. Extensions not listed are not checked
#: for a mismatch (their content is still checked).
EXPECTED_BY_EXTENSION: dict[str, frozenset[ContentType]] = {
    "pdf": frozenset({ContentType.PDF}),
    "png": frozenset({ContentType.PNG}),
    "jpg": frozenset({ContentType.JPEG}),
    "jpeg": frozenset({ContentType.JPEG}),
    "jpe": frozenset({ContentType.JPEG}),
    "gif": frozenset({ContentType.GIF}),
    "zip": _ZIPS,
    "docx": frozenset({ContentType.OOXML}),
    "xlsx": frozenset({ContentType.OOXML}),
    "pptx": frozenset({ContentType.OOXML}),
    "odt": frozenset({ContentType.ODF}),
    "ods": frozenset({ContentType.ODF}),
    "odp": frozenset({ContentType.ODF}),
    "doc": frozenset({ContentType.OLE}),
    "xls": frozenset({ContentType.OLE}),
    "ppt": frozenset({ContentType.OLE}),
    "gz": frozenset({ContentType.GZIP}),
    "tgz": frozenset({ContentType.GZIP}),
    "bz2": frozenset({ContentType.BZIP2}),
    "xz": frozenset({ContentType.XZ}),
    "tar": frozenset({ContentType.TAR}),
    "txt": _TEXTS,
    "csv": _TEXTS,
    "md": _TEXTS,
    "log": _TEXTS,
    "json": _TEXTS,
}

#: Declared MIME type -> the content types it may hold (others are not checked).
EXPECTED_BY_MIME: dict[str, frozenset[ContentType]] = {
    "application/pdf": frozenset({ContentType.PDF}),
    "image/png": frozenset({ContentType.PNG}),
    "image/jpeg": frozenset({ContentType.JPEG}),
    "image/gif": frozenset({ContentType.GIF}),
    "application/zip": _ZIPS,
    "application/gzip": frozenset({ContentType.GZIP}),
    "application/x-tar": frozenset({ContentType.TAR}),
    "text/plain": _TEXTS,
    "text/csv": _TEXTS,
    "text/markdown": _TEXTS,
    "application/msword": frozenset({ContentType.OLE}),
    "application/vnd.ms-excel": frozenset({ContentType.OLE}),
    "application/vnd.ms-powerpoint": frozenset({ContentType.OLE}),
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": frozenset(
        {ContentType.OOXML}
    ),
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": frozenset(
        {ContentType.OOXML}
    ),
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": frozenset(
        {ContentType.OOXML}
    ),
}

_MACHO_MAGICS = frozenset(
    {
        b"\xfe\xed\xfa\xce",  # 32-bit, big-endian
        b"\xfe\xed\xfa\xcf",  # 64-bit, big-endian
        b"\xce\xfa\xed\xfe",  # 32-bit, little-endian
        b"\xcf\xfa\xed\xfe",  # 64-bit, little-endian
        b"\xbe\xba\xfe\xca",  # universal (fat), byte-swapped
        b"\xbf\xba\xfe\xca",  # universal (fat64), byte-swapped
        b"\xca\xfe\xba\xbf",  # universal (fat64)
    }
)
_FAT_MAGIC = b"\xca\xfe\xba\xbe"  # universal Mach-O, or a Java class file
_FIRST_JAVA_MAJOR = 45  # class file major versions start at 45; fat headers count archs
_LNK_HEADER = bytes.fromhex("4c0000000114020000000000c000000000000046")
_OLE_MAGIC = bytes.fromhex("d0cf11e0a1b11ae1")
_TEXT_CONTROLS = frozenset(b"\t\n\r\f\b\x1b")
_PDF_SEARCH = 1024
_TAR_MAGIC_OFFSET = 257
_ONENOTE_SECTION = bytes.fromhex("e4525c7b8cd8a74daeb15378d02996d3")  # {7B5C52E4-D88C-...}
# The root element of a page or image, after an XML declaration, doctype or comments.
_MARKUP_ROOT = re.compile(
    rb"\A(?:\xef\xbb\xbf)?\s*(?:<\?xml[^>]{0,200}>\s*)?(?:<!--.{0,2000}?-->\s*)*"
    rb"<(!doctype\s+html|html|head|body|script|iframe|!doctype\s+svg|svg)\b",
    re.DOTALL,
)
_CLICKONCE_MANIFEST = re.compile(
    rb"<(?:[a-z0-9]+:)?assembly\b[^>]{0,2000}urn:schemas-microsoft-com:asm\.v[123]", re.DOTALL
)
_CLICKONCE_SHORTCUT = re.compile(r"\.application#.{0,300}publickeytoken=", re.DOTALL)


def sniff(head: bytes) -> ContentType:
    """Return the content type of a file whose first bytes are ``head``.

    ``head`` should be at least :data:`HEAD_BYTES` long when the file is. Never
    raises.
    """
    if not head:
        return ContentType.EMPTY
    first4 = head[:4]
    if head.startswith(b"MZ"):
        return ContentType.PE
    if first4 == b"\x7fELF":
        return ContentType.ELF
    if first4 in _MACHO_MAGICS:
        return ContentType.MACHO
    if first4 == _FAT_MAGIC:
        if len(head) >= 8 and struct.unpack(">I", head[4:8])[0] >= _FIRST_JAVA_MAJOR:
            return ContentType.JAVA_CLASS
        return ContentType.MACHO
    if head.startswith(b"#!"):
        return ContentType.SCRIPT
    if head.startswith(_LNK_HEADER):
        return ContentType.LNK
    if head.startswith(_OLE_MAGIC):
        return ContentType.OLE
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ContentType.PNG
    if head.startswith(b"\xff\xd8\xff"):
        return ContentType.JPEG
    if head.startswith((b"GIF87a", b"GIF89a")):
        return ContentType.GIF
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
        return ContentType.ZIP
    if head.startswith(b"\x1f\x8b"):
        return ContentType.GZIP
    if head.startswith(b"BZh"):
        return ContentType.BZIP2
    if head.startswith(b"\xfd7zXZ\x00"):
        return ContentType.XZ
    if head.startswith(b"7z\xbc\xaf\x27\x1c"):
        return ContentType.SEVEN_ZIP
    if head.startswith(b"Rar!\x1a\x07"):
        return ContentType.RAR
    if head.startswith(b"MSCF\x00\x00\x00\x00"):
        return ContentType.CAB
    if head[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar":
        return ContentType.TAR
    if head.startswith(_ONENOTE_SECTION):
        return ContentType.ONENOTE
    if b"%PDF-" in head[:_PDF_SEARCH]:
        return ContentType.PDF
    if _looks_like_text(head):
        return _kind_of_text(head)
    return ContentType.UNKNOWN


def _kind_of_text(head: bytes) -> ContentType:
    """Plain text, or markup a browser renders, or a ClickOnce manifest or shortcut."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16-le" if head.startswith(b"\xff\xfe") else "utf-16-be"
        text = head[2 : len(head) & ~1].decode(encoding, errors="replace").lower()
        if _CLICKONCE_SHORTCUT.search(text):
            return ContentType.CLICKONCE
        head = text.encode("utf-8", errors="replace")
    lowered = head.lower()
    if _CLICKONCE_MANIFEST.search(lowered) or _CLICKONCE_SHORTCUT.search(
        lowered.decode("utf-8", errors="replace")
    ):
        return ContentType.CLICKONCE
    root = _MARKUP_ROOT.match(lowered)
    if root is None:
        return ContentType.TEXT
    return ContentType.SVG if root.group(1).endswith(b"svg") else ContentType.HTML


def _looks_like_text(head: bytes) -> bool:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return True  # UTF-16 with a byte order mark
    if b"\x00" in head:
        return False
    controls = sum(1 for byte in head if byte < 0x20 and byte not in _TEXT_CONTROLS)
    return controls * 100 <= len(head)
