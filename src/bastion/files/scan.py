"""The verdict on a received file, decided in quarantine before the user may save it.

:func:`scan_file` runs every check and collects every reason, one line each:

1. the name: bidirectional-text tricks, double extensions, risky extensions,
   risky declared types;
2. the true type by content (:mod:`bastion.files.content_type`): programs,
   scripts, shortcuts, Java and Android apps, macro-enabled and installer OLE
   files, OOXML with a VBA project, ODF with macros, archives that cannot be
   looked into, and a content that is not what the name or declared type says;
3. archives (zip, tar, gzip, bzip2, xz, nested) looked into with the same checks
   on every member's name and content, within :class:`ArchiveLimits`; archives
   and programs that start after other bytes (:mod:`bastion.files.active`), a
   ZIP archive after other data looked into; OneNote sections and ClickOnce
   files; web pages and SVG images with scripts or other active content;
4. the YARA rules shipped with Bastion, on the file and on every member;
5. ClamAV's clamd, when a socket is configured.

Fail closed: a scanner that cannot run makes the verdict ``error``, never
``clean``; anything blocked makes it ``blocked``.
"""

from __future__ import annotations

import enum
import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from bastion.errors import ConfigError
from bastion.files import active, archives
from bastion.files.archives import ArchiveBudget, ArchiveLimits, ArchiveRefused
from bastion.files.clamd import DEFAULT_MAX_STREAM_BYTES, clamd_scan_file
from bastion.files.content_type import (
    EXECUTABLE_TYPES,
    EXPECTED_BY_EXTENSION,
    EXPECTED_BY_MIME,
    HEAD_BYTES,
    LAUNCHER_TYPES,
    OPAQUE_ARCHIVES,
    WEB_TYPES,
    ContentType,
    sniff,
)
from bastion.files.errors import ScannerUnavailableError
from bastion.files.names import RISKY_EXTENSIONS, extension_of, hides_executable, sanitize_filename
from bastion.files.signatures import RULES_DIR, SignatureScanner

__all__ = ["ArchiveLimits", "Verdict", "VerdictKind", "scan_file"]

DEFAULT_MAX_FILE_BYTES = 2 * 1024 * 1024 * 1024
_SEARCH_PIECE_BYTES = 1024 * 1024
_MAX_SHOWN_NAME_CHARS = 80

RISKY_MIME_TYPES = frozenset(
    {
        "application/x-msdownload", "application/x-msdos-program", "application/x-dosexec",
        "application/vnd.microsoft.portable-executable", "application/x-executable",
        "application/x-elf", "application/x-mach-binary", "application/x-sharedlib",
        "application/x-sh", "application/x-shellscript", "application/javascript",
        "text/javascript", "application/x-javascript", "text/vbscript", "application/hta",
        "application/x-ms-shortcut", "application/x-msi", "application/x-ms-installer",
        "application/java-archive", "application/x-java-archive",
        "application/vnd.android.package-archive", "application/x-bat",
        "application/vnd.ms-word.document.macroenabled.12",
        "application/vnd.ms-excel.sheet.macroenabled.12",
        "application/vnd.ms-powerpoint.presentation.macroenabled.12",
    }
)  # fmt: skip

_INSPECTED_ARCHIVES = frozenset(
    {
        ContentType.ZIP,
        ContentType.OOXML,
        ContentType.ODF,
        ContentType.TAR,
        ContentType.GZIP,
        ContentType.BZIP2,
        ContentType.XZ,
    }
)
_ZIP_KINDS = frozenset(
    {ContentType.ZIP, ContentType.OOXML, ContentType.ODF, ContentType.APK, ContentType.JAR}
)
_BLOCKED_BY_TYPE = EXECUTABLE_TYPES | LAUNCHER_TYPES | OPAQUE_ARCHIVES
#: Names a browser opens as a page or an image that can run script, whatever the content.
_WEB_EXTENSIONS = {
    **dict.fromkeys(("html", "htm", "xhtml", "xht", "shtml"), ContentType.HTML),
    "svg": ContentType.SVG,
}
_OLE_VBA_MARKERS = ("_VBA_PROJECT".encode("utf-16-le"),)
_MSI_CLSID = bytes.fromhex("84100c0000000000c000000000000046")


class VerdictKind(enum.StrEnum):
    """The outcome of a scan."""

    CLEAN = "clean"
    BLOCKED = "blocked"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Verdict:
    """A scan's outcome; ``reasons`` are lines a user understands (empty when clean)."""

    kind: VerdictKind
    reasons: tuple[str, ...]
    content_type: ContentType | None = None

    @property
    def is_clean(self) -> bool:
        """Whether the file may be released to the user."""
        return self.kind is VerdictKind.CLEAN


def scan_file(
    path: Path,
    claimed_name: str,
    claimed_type: str | None = None,
    *,
    limits: ArchiveLimits = ArchiveLimits(),  # noqa: B008 - frozen, immutable default
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    rules_dir: Path = RULES_DIR,
    clamd_socket: Path | None = None,
    clamd_timeout: float = 30.0,
    clamd_max_stream_bytes: int = DEFAULT_MAX_STREAM_BYTES,
) -> Verdict:
    """Scan the quarantined file at ``path``, received as ``claimed_name`` / ``claimed_type``.

    Returns a :class:`Verdict`: ``blocked`` with every reason found, else
    ``error`` if any scanner could not run (YARA missing, clamd unreachable,
    file unreadable), else ``clean``. Raises :class:`ConfigError` only for
    invalid limits; hostile content never makes it raise.
    """
    if max_file_bytes < 1:
        raise ConfigError("max_file_bytes must be positive")
    run = _Scan(limits)
    run.check_name(claimed_name, claimed_type)
    content_type: ContentType | None = None
    try:
        scanner = SignatureScanner(rules_dir)
    except ScannerUnavailableError as exc:
        run.errors.append(str(exc))
        scanner = None
    run.signatures = scanner
    try:
        with open(path, "rb") as stream:
            size = stream.seek(0, io.SEEK_END)
            stream.seek(0)
            if size > max_file_bytes:
                run.blocked.append(
                    f"the file is larger than {max_file_bytes} bytes, too big to check"
                )
            else:
                display = sanitize_filename(claimed_name).name
                content_type = run.check_content(stream, display, size, depth=0, where="the file")
                run.check_declared_type(claimed_type, content_type)
        run.check_signatures_on_path(path)
        if clamd_socket is not None:
            run.check_clamd(clamd_socket, path, clamd_timeout, clamd_max_stream_bytes)
    except OSError as exc:
        run.errors.append(f"the file could not be read ({exc.strerror or 'I/O error'})")
    return run.verdict(content_type)


class _Scan:
    """The reasons collected by one :func:`scan_file` call."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.budget = ArchiveBudget(limits)
        self.blocked: list[str] = []
        self.errors: list[str] = []
        self.signatures: SignatureScanner | None = None

    def verdict(self, content_type: ContentType | None) -> Verdict:
        if self.blocked:
            lines = _unique(self.blocked + [f"also: {e}" for e in self.errors])
            return Verdict(VerdictKind.BLOCKED, lines, content_type)
        if self.errors:
            return Verdict(VerdictKind.ERROR, _unique(self.errors), content_type)
        return Verdict(VerdictKind.CLEAN, (), content_type)

    def check_name(self, claimed_name: str, claimed_type: str | None) -> None:
        cleaned = sanitize_filename(claimed_name)
        if cleaned.bidi_trick:
            self.blocked.append(
                "the file name hides its real extension with right-to-left characters"
            )
        self._check_name_extensions(cleaned.name, "the file", hidden=cleaned.hidden_executable)
        mime = (claimed_type or "").split(";", 1)[0].strip().lower()
        if mime in RISKY_MIME_TYPES:
            self.blocked.append(f"the sender says it is {mime}, a type that runs code")

    def _check_name_extensions(self, name: str, where: str, *, hidden: bool) -> None:
        if hidden or hides_executable(name):
            self.blocked.append(
                f"{where} has a double extension that disguises a program ({_shown(name)})"
            )
        ext = extension_of(name)
        if ext in RISKY_EXTENSIONS:
            self.blocked.append(f"{where} ends in .{ext}, a kind of file that can run code")

    def check_member_name(self, raw_name: str, where: str) -> str:
        """Check an archive member's path; return its last component, sanitised."""
        cleaned = sanitize_filename(raw_name)
        parts = raw_name.replace("\\", "/").split("/")
        if (
            raw_name.startswith(("/", "\\"))
            or ".." in parts
            or (len(raw_name) > 1 and raw_name[1] == ":")
        ):
            self.blocked.append(f"{where} has a path that escapes its folder")
        if cleaned.bidi_trick:
            self.blocked.append(f"{where} hides its real extension with right-to-left characters")
        self._check_name_extensions(cleaned.name, where, hidden=cleaned.hidden_executable)
        return cleaned.name

    def check_content(
        self, stream: BinaryIO, name: str, size: int, *, depth: int, where: str
    ) -> ContentType:
        """Check what ``stream`` really is; look into archives. Returns its type."""
        head = stream.read(HEAD_BYTES)
        stream.seek(0)
        kind = sniff(head)
        if kind is ContentType.ZIP:
            kind = self._check_zip(stream, where)
        if kind in EXECUTABLE_TYPES or kind in LAUNCHER_TYPES:
            self.blocked.append(f"{where} is {kind.value}")
        elif kind is ContentType.OLE:
            self._check_ole(stream, where)
        elif kind in OPAQUE_ARCHIVES:
            self.blocked.append(f"{where} is {kind.value}, which cannot be checked")
        expected = EXPECTED_BY_EXTENSION.get(extension_of(name))
        if expected is not None and kind not in expected and kind is not ContentType.EMPTY:
            self.blocked.append(
                f"{where} is named .{extension_of(name)} but is really {kind.value}"
            )
        self._check_active_markup(stream, kind, extension_of(name), where)
        if kind not in _BLOCKED_BY_TYPE:  # what those hold adds nothing to the verdict
            self._check_embedded(stream, where)
        if kind in _INSPECTED_ARCHIVES:
            self._look_inside(stream, kind, name, size, depth=depth, where=where)
        elif kind not in _ZIP_KINDS and kind not in EXECUTABLE_TYPES and _hides_zip(stream):
            self._look_inside(
                stream, ContentType.ZIP, name, size, depth=depth,
                where=f"{where} (a ZIP archive after other data)",
            )  # fmt: skip
        return kind

    def _check_active_markup(
        self, stream: BinaryIO, kind: ContentType, ext: str, where: str
    ) -> None:
        shown_as = kind if kind in WEB_TYPES else _WEB_EXTENSIONS.get(ext)
        if shown_as is None:
            return
        found = active.find_active_markup(stream)
        if found is not None:
            self.blocked.append(f"{where} is {shown_as.value} with active content ({found})")

    def _check_embedded(self, stream: BinaryIO, where: str) -> None:
        window = stream.read(active.EMBEDDED_SEARCH_BYTES)
        stream.seek(0)
        for hit in active.find_embedded(window):
            if hit.crowded:
                self.blocked.append(
                    f"{where} repeats the signature of {hit.kind.value} more than "
                    f"{active.MAX_HITS_PER_MAGIC} times, too often to check"
                )
            elif hit.kind in OPAQUE_ARCHIVES:
                self.blocked.append(
                    f"{where} hides {hit.kind.value} after {hit.offset} bytes of other data, "
                    "which cannot be checked"
                )
            else:
                self.blocked.append(
                    f"{where} hides {hit.kind.value} after {hit.offset} bytes of other data"
                )

    def check_declared_type(self, claimed_type: str | None, kind: ContentType) -> None:
        mime = (claimed_type or "").split(";", 1)[0].strip().lower()
        expected = EXPECTED_BY_MIME.get(mime)
        if expected is not None and kind not in expected and kind is not ContentType.EMPTY:
            self.blocked.append(f"the sender says it is {mime} but it is really {kind.value}")

    def _check_zip(self, stream: BinaryIO, where: str) -> ContentType:
        try:
            names = archives.zip_names(stream)
        except archives.PARSE_ERRORS:
            self.blocked.append(f"{where} is a damaged ZIP archive that cannot be checked")
            return ContentType.ZIP
        finally:
            stream.seek(0)
        lower = {n.lower() for n in names}
        kind = ContentType.ZIP
        if "androidmanifest.xml" in lower or "classes.dex" in lower:
            kind = ContentType.APK
        elif "meta-inf/manifest.mf" in lower or any(n.endswith(".class") for n in lower):
            kind = ContentType.JAR
        elif "[content_types].xml" in lower:
            kind = ContentType.OOXML
            if any(n.endswith("vbaproject.bin") for n in lower):
                self.blocked.append(f"{where} is an Office document with VBA macros")
        elif "mimetype" in lower:
            kind = ContentType.ODF
            if any(n.startswith(("basic/", "scripts/")) for n in lower):
                self.blocked.append(f"{where} is an OpenDocument file with macros")
        return kind

    def _check_ole(self, stream: BinaryIO, where: str) -> None:
        found = _stream_contains(stream, (*_OLE_VBA_MARKERS, _MSI_CLSID))
        if _MSI_CLSID in found:
            self.blocked.append(f"{where} is a Windows Installer package")
        if found & set(_OLE_VBA_MARKERS):
            self.blocked.append(f"{where} is an Office document with VBA macros")

    def _look_inside(
        self, stream: BinaryIO, kind: ContentType, name: str, size: int, *, depth: int, where: str
    ) -> None:
        limits = self.budget.limits
        if depth >= limits.max_depth:
            self.blocked.append(f"{where} holds archives nested more than {limits.max_depth} deep")
            return
        try:
            if kind in (ContentType.GZIP, ContentType.BZIP2, ContentType.XZ):
                data = archives.decompress(stream, kind, size, self.budget)
                self._check_member(
                    archives.Member(archives.inner_name(name, kind), data),
                    depth=depth + 1,
                    where=where,
                    compressed=True,
                )
                return
            members = (
                archives.tar_members(stream, self.budget)
                if kind is ContentType.TAR
                else archives.zip_members(stream, self.budget)
            )
            for member in members:
                self._check_member(member, depth=depth + 1, where=where, compressed=False)
        except ArchiveRefused as exc:
            self.blocked.append(f"{where}: {exc.reason}")
        except archives.PARSE_ERRORS:
            self.blocked.append(f"{where} is a damaged archive that cannot be checked")

    def _check_member(
        self, member: archives.Member, *, depth: int, where: str, compressed: bool
    ) -> None:
        if compressed:
            label = where
            name = member.name
        else:
            label = f"{_shown(member.name)} inside {where}"
            name = self.check_member_name(member.name, label)
        self.check_content(
            io.BytesIO(member.data), name, len(member.data), depth=depth, where=label
        )
        if self.signatures is not None:
            try:
                for description in self.signatures.match_bytes(member.data):
                    self.blocked.append(f"{label} matches a signature: {description}")
            except ScannerUnavailableError as exc:
                self.errors.append(str(exc))

    def check_signatures_on_path(self, path: Path) -> None:
        if self.signatures is None:
            return
        try:
            for description in self.signatures.match_path(path):
                self.blocked.append(f"the file matches a signature: {description}")
        except ScannerUnavailableError as exc:
            self.errors.append(str(exc))

    def check_clamd(self, socket_path: Path, path: Path, timeout: float, max_bytes: int) -> None:
        try:
            result = clamd_scan_file(socket_path, path, timeout=timeout, max_stream_bytes=max_bytes)
        except ScannerUnavailableError as exc:
            self.errors.append(str(exc))
            return
        if result.found:
            self.blocked.append(f"the virus scanner found {result.signature}")


def _hides_zip(stream: BinaryIO) -> bool:
    """Whether a ZIP reader (7-Zip, WinRAR, unzip) finds a ZIP archive in a file of another kind."""
    try:
        return bool(archives.zip_names(stream))
    except archives.PARSE_ERRORS:
        return False  # no central directory: nothing a ZIP reader would open
    finally:
        stream.seek(0)


def _stream_contains(stream: BinaryIO, needles: tuple[bytes, ...]) -> set[bytes]:
    """Which of ``needles`` occur in ``stream``, read in pieces (constant memory)."""
    overlap = max(len(n) for n in needles) - 1
    found: set[bytes] = set()
    tail = b""
    stream.seek(0)
    while piece := stream.read(_SEARCH_PIECE_BYTES):
        window = tail + piece
        found.update(n for n in needles if n in window)
        tail = window[-overlap:] if overlap else b""
    stream.seek(0)
    return found


def _shown(name: str) -> str:
    """A member name fit to show: printable, no bidi tricks, bounded length."""
    printable = "".join(ch for ch in name if ch.isprintable())
    if len(printable) > _MAX_SHOWN_NAME_CHARS:
        printable = printable[: _MAX_SHOWN_NAME_CHARS - 1] + "…"
    return repr(printable)


def _unique(lines: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(lines))
