"""Sanitising the name of a received file.

A file name comes from the sender, so it is hostile input. :func:`sanitize_filename`
turns it into one safe path component for this machine and for Windows, and
reports the tricks it found: bidirectional-text characters that make
``invoice<RLO>txt.exe`` display as ``invoiceexe.txt`` (a block reason), and
double extensions that hide an executable (``invoice.pdf.exe``,
``photo.jpg .scr``).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

MAX_NAME_BYTES = 255
MAX_EXTENSION_CHARS = 16
FALLBACK_NAME = "file"

# Explicit embeddings/overrides, isolates, marks: they reorder how a name displays.
BIDI_CONTROLS = frozenset(
    "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
)
# Format characters that stay: joiners are needed by emoji and several scripts.
_KEPT_FORMAT = frozenset("\u200c\u200d")
# Reserved on Windows file systems; replaced so a saved file keeps its name everywhere.
_WINDOWS_RESERVED_CHARS = frozenset('<>:"|?*')
_WINDOWS_DEVICE_NAMES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {
        f"{base}{n}"
        for base in ("COM", "LPT")
        for n in [*"0123456789", "\u00b9", "\u00b2", "\u00b3"]
    }
)

#: Extensions that run code, install software or point at something that does.
RISKY_EXTENSIONS = frozenset(
    {
        # native executables and libraries
        "exe", "com", "scr", "pif", "dll", "cpl", "sys", "drv", "ocx", "efi", "msc",
        "elf", "run", "so", "dylib", "app",
        # installers and packages
        "msi", "msp", "mst", "appx", "appxbundle", "msix", "msixbundle", "deb", "rpm",
        "pkg", "dmg", "apk", "xapk", "aab", "ipa", "jar", "jnlp", "xpi", "crx", "vsix",
        "appimage", "flatpakref", "snap",
        # scripts
        "js", "jse", "mjs", "vbs", "vbe", "wsf", "wsh", "wsc", "ws", "sct", "ps1", "psm1",
        "psd1", "ps1xml", "psc1", "bat", "cmd", "sh", "bash", "zsh", "csh", "ksh", "fish",
        "command", "tool", "py", "pyw", "pyc", "pyz", "pl", "rb", "php", "lua", "tcl",
        "applescript", "scpt", "scptd", "workflow", "action", "hta", "mht", "mhtml",
        # shortcuts and things that point elsewhere or change settings
        "lnk", "url", "website", "desktop", "scf", "inf", "reg", "library-ms",
        "searchconnector-ms", "settingcontent-ms", "appref-ms", "diagcab", "mof",
        "chm", "hlp", "gadget", "cab", "iso", "img", "vhd", "vhdx",
        # documents that launch programs: OneNote, ClickOnce
        "one", "onepkg", "application", "xbap",
        # macro-enabled Office documents and templates
        "docm", "dotm", "xlsm", "xltm", "xlam", "xla", "pptm", "potm", "ppsm", "ppam",
        "sldm", "accde", "accdb", "mdb", "mde", "ade", "adp",
    }
)  # fmt: skip

#: Extensions that people read as a harmless document: seen before a risky one they
#: mark a double-extension disguise.
DISGUISE_EXTENSIONS = frozenset(
    {
        "pdf", "doc", "docx", "xls", "xlsx", "ppt", "pptx", "odt", "ods", "odp", "rtf",
        "txt", "csv", "md", "htm", "html", "xml", "json", "jpg", "jpeg", "png", "gif",
        "bmp", "tif", "tiff", "webp", "heic", "svg", "mp3", "mp4", "m4a", "wav", "avi",
        "mov", "mkv", "wmv", "zip", "rar", "7z", "gz", "tar", "eml", "msg", "ics", "vcf",
    }
)  # fmt: skip

_WHITESPACE_RUN = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class SanitizedName:
    """A received file name made safe, with what was wrong with it."""

    name: str
    changed: bool
    bidi_trick: bool
    hidden_executable: bool

    @property
    def extension(self) -> str:
        """The final extension in lower case, without the dot ("" if none)."""
        return extension_of(self.name)


def extension_of(name: str) -> str:
    """Return the final extension of ``name`` in lower case, without the dot."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem.strip(" .") or not ext:
        return ""
    return ext.strip().lower()


def hides_executable(name: str) -> bool:
    """Whether ``name`` ends in a risky extension disguised behind another one.

    ``invoice.pdf.exe`` and ``photo.jpg .scr`` (padding before the real
    extension) are disguises; ``setup.exe`` is risky but not disguised.
    """
    stem, dot, ext = name.rpartition(".")
    if not dot or ext.strip().lower() not in RISKY_EXTENSIONS:
        return False
    if stem != stem.rstrip() or "  " in stem:
        return True
    inner = extension_of(stem.rstrip(" ."))
    return inner in DISGUISE_EXTENSIONS or inner in RISKY_EXTENSIONS


def sanitize_filename(raw: str, *, max_bytes: int = MAX_NAME_BYTES) -> SanitizedName:
    """Return ``raw`` as one safe file name component, and the tricks found in it.

    Drops folders and path traversal (keeps the last component), control,
    format and bidirectional characters, reserved characters; defuses Windows
    device names (``CON.txt`` becomes ``_CON.txt``); strips leading and trailing
    dots and spaces; caps the UTF-8 length at ``max_bytes`` keeping the
    extension; an empty result becomes ``"file"``. Never raises for any string.
    """
    limit = max(32, min(max_bytes, MAX_NAME_BYTES))
    bidi = any(ch in BIDI_CONTROLS for ch in raw)
    text = unicodedata.normalize("NFC", "".join(_clean_char(ch) for ch in raw))
    # Folders: both separators count, as the file may be saved on Windows later.
    parts = [p for p in text.replace("\\", "/").split("/") if p.strip(" .")]
    text = parts[-1] if parts else ""
    text = "".join("_" if ch in _WINDOWS_RESERVED_CHARS else ch for ch in text)
    hidden = hides_executable(text)
    text = _WHITESPACE_RUN.sub(" ", text).strip(" .")
    hidden = hidden or hides_executable(text)
    if _is_device_name(text):
        text = "_" + text
    text = _cap_length(text, limit)
    if not text:
        text = FALLBACK_NAME
    return SanitizedName(name=text, changed=text != raw, bidi_trick=bidi, hidden_executable=hidden)


def _clean_char(ch: str) -> str:
    if ch in _KEPT_FORMAT:
        return ch
    category = unicodedata.category(ch)
    if category in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
        return ""
    if category == "Zs":
        return " "
    return ch


def _is_device_name(name: str) -> bool:
    base = name.split(".", 1)[0].rstrip(" ").upper()
    return base in _WINDOWS_DEVICE_NAMES


def _cap_length(name: str, limit: int) -> str:
    if len(name.encode("utf-8")) <= limit:
        return name
    ext = extension_of(name)
    suffix = "." + name.rpartition(".")[2] if ext and len(ext) <= MAX_EXTENSION_CHARS else ""
    stem = name[: len(name) - len(suffix)]
    budget = limit - len(suffix.encode("utf-8"))
    encoded = stem.encode("utf-8")[:budget]
    stem = encoded.decode("utf-8", errors="ignore").rstrip(" .")
    return (stem or FALLBACK_NAME) + suffix
