"""Bounded reading of archives (zip, tar, gzip, bzip2, xz) for the scanner.

Nothing is extracted to disk. Members are read into memory in pieces, and
every piece is counted against :class:`ArchiveLimits` before more is read: a
member's size (whatever its header claims), the bytes read across the whole
scan, the number of members, the compression ratio and the nesting depth. A
zip bomb therefore costs at most about one limit's worth of work before it is
refused with :class:`ArchiveRefused`.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from bastion.errors import ConfigError, SecurityError
from bastion.files.content_type import ContentType

READ_PIECE_BYTES = 64 * 1024

#: What malformed archives make the standard library raise; all mean "damaged".
PARSE_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    NotImplementedError,
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    OverflowError,
    struct.error,
    zlib.error,
    lzma.LZMAError,
    KeyError,
    IndexError,
)


class ArchiveRefused(SecurityError):
    """An archive broke a limit or could not be read safely; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ArchiveLimits:
    """Limits against archive bombs; every one applies across nested archives."""

    max_depth: int = 3
    max_members: int = 10_000
    max_total_bytes: int = 512 * 1024 * 1024
    max_member_bytes: int = 64 * 1024 * 1024
    max_ratio: int = 100
    ratio_floor_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        if min(self.max_depth, self.max_members, self.max_total_bytes, self.max_member_bytes) < 1:
            raise ConfigError("archive limits must be positive")
        if self.max_ratio < 1 or self.ratio_floor_bytes < 0:
            raise ConfigError("archive ratio limits must be positive")


@dataclass(slots=True)
class ArchiveBudget:
    """What one scan has used so far, shared by every nested archive."""

    limits: ArchiveLimits
    members: int = 0
    total_bytes: int = field(default=0)

    def count_member(self) -> None:
        """Count one member; raises :class:`ArchiveRefused` past the limit."""
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveRefused(
                f"the archive has more than {self.limits.max_members} files (possible archive bomb)"
            )


@dataclass(frozen=True, slots=True)
class Member:
    """One regular file inside an archive, read into memory within the limits."""

    name: str
    data: bytes


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


def _read_bounded(
    stream: _Readable, budget: ArchiveBudget, *, compressed_size: int | None, declared: int | None
) -> bytes:
    limits = budget.limits
    parts: list[bytes] = []
    size = 0
    while piece := stream.read(READ_PIECE_BYTES):
        size += len(piece)
        budget.total_bytes += len(piece)
        if declared is not None and size > declared:
            raise ArchiveRefused("an archive member is larger than its header says")
        if size > limits.max_member_bytes:
            raise ArchiveRefused(
                f"an archive member is larger than {limits.max_member_bytes} bytes unpacked"
            )
        if budget.total_bytes > limits.max_total_bytes:
            raise ArchiveRefused(
                f"the archive unpacks to more than {limits.max_total_bytes} bytes "
                "(possible archive bomb)"
            )
        if (
            compressed_size is not None
            and size > limits.ratio_floor_bytes
            and size > limits.max_ratio * max(compressed_size, 1)
        ):
            raise ArchiveRefused(
                f"an archive member is compressed more than {limits.max_ratio} to 1 "
                "(possible archive bomb)"
            )
        parts.append(piece)
    return b"".join(parts)


def zip_names(stream: BinaryIO) -> list[str]:
    """Return the member names of the zip in ``stream``; raises one of :data:`PARSE_ERRORS`."""
    with zipfile.ZipFile(stream) as archive:
        return archive.namelist()


def zip_members(stream: BinaryIO, budget: ArchiveBudget) -> Iterator[Member]:
    """Yield the regular files of the zip in ``stream``, each read within the limits.

    Raises :class:`ArchiveRefused` for a broken limit, an encrypted member or a
    symbolic link, or one of :data:`PARSE_ERRORS` for a damaged archive.
    """
    limits = budget.limits
    with zipfile.ZipFile(stream) as archive:
        infos = archive.infolist()
        if len(infos) + budget.members > limits.max_members:
            raise ArchiveRefused(
                f"the archive has more than {limits.max_members} files (possible archive bomb)"
            )
        for info in infos:
            budget.count_member()
            if info.is_dir():
                continue
            if info.flag_bits & 0x1:
                raise ArchiveRefused("the archive is password-protected, so it cannot be checked")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ArchiveRefused("the archive contains a symbolic link")
            if info.file_size > limits.max_member_bytes:
                raise ArchiveRefused(
                    f"an archive member is larger than {limits.max_member_bytes} bytes unpacked"
                )
            if (
                info.file_size > limits.ratio_floor_bytes
                and info.file_size > limits.max_ratio * max(info.compress_size, 1)
            ):
                raise ArchiveRefused(
                    f"an archive member is compressed more than {limits.max_ratio} to 1 "
                    "(possible archive bomb)"
                )
            with archive.open(info) as member:
                data = _read_bounded(
                    member, budget, compressed_size=info.compress_size, declared=info.file_size
                )
            yield Member(name=info.filename, data=data)


def tar_members(stream: BinaryIO, budget: ArchiveBudget) -> Iterator[Member]:
    """Yield the regular files of the (uncompressed) tar in ``stream``, within the limits.

    Raises :class:`ArchiveRefused` for a broken limit or a link or device
    member, or one of :data:`PARSE_ERRORS` for a damaged archive.
    """
    limits = budget.limits
    with tarfile.open(fileobj=stream, mode="r:") as archive:
        for info in archive:
            budget.count_member()
            if info.isdir():
                continue
            if info.issym() or info.islnk():
                raise ArchiveRefused("the archive contains a link")
            if not info.isfile():
                raise ArchiveRefused("the archive contains a device or other special file")
            if info.size > limits.max_member_bytes:
                raise ArchiveRefused(
                    f"an archive member is larger than {limits.max_member_bytes} bytes"
                )
            extracted = archive.extractfile(info)
            if extracted is None:
                continue
            with extracted:
                data = _read_bounded(extracted, budget, compressed_size=None, declared=info.size)
            yield Member(name=info.name, data=data)


def _open_compressed(
    stream: BinaryIO, kind: ContentType
) -> gzip.GzipFile | bz2.BZ2File | lzma.LZMAFile:
    if kind is ContentType.GZIP:
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if kind is ContentType.BZIP2:
        return bz2.BZ2File(stream, mode="rb")
    return lzma.LZMAFile(stream, mode="rb")


def decompress(
    stream: BinaryIO, kind: ContentType, compressed_size: int, budget: ArchiveBudget
) -> bytes:
    """Return the decompressed content of a gzip, bzip2 or xz ``stream``, within the limits.

    Raises :class:`ArchiveRefused` for a broken limit, or one of
    :data:`PARSE_ERRORS` for damaged data.
    """
    budget.count_member()
    with _open_compressed(stream, kind) as unpacked:
        return _read_bounded(unpacked, budget, compressed_size=compressed_size, declared=None)


def inner_name(name: str, kind: ContentType) -> str:
    """The name of what a compressed file holds: ``a.tar.gz`` or ``a.tgz`` -> ``a.tar``."""
    lower = name.lower()
    for suffix, replacement in ((".tgz", ".tar"), (".tbz2", ".tar"), (".txz", ".tar")):
        if lower.endswith(suffix):
            return name[: -len(suffix)] + replacement
    suffix = {ContentType.GZIP: ".gz", ContentType.BZIP2: ".bz2", ContentType.XZ: ".xz"}[kind]
    return name[: -len(suffix)] if lower.endswith(suffix) else name
