"""Streaming end-to-end encryption of files.

A file is encrypted under its own random 256-bit key with AES-256-GCM, in
fixed-size chunks, so any size is handled in constant memory.

Layout of a ciphertext blob::

    header  = version (1 byte, = 1) | chunk size (4 bytes, big-endian) | file nonce prefix (8 bytes)
    chunk i = AES-256-GCM(key, nonce_i, plaintext_i, ad_i)   (plaintext_i + 16-byte tag)

Every chunk but the last holds exactly ``chunk size`` plaintext bytes; the last
holds 0 to ``chunk size`` bytes (an empty file is one empty last chunk).

Nonces: ``nonce_i = prefix (8 random bytes) | i (4 bytes, big-endian)``. The key
is fresh for every file, and inside one file the counter ``i`` never repeats
(the 4-byte counter allows 2**32 chunks and encryption refuses more), so no nonce is ever used twice
under one key. The random prefix is defence in depth: even a caller who wrongly
reused a key for two files would collide only with probability about 2**-64.

Associated data: ``signing_input("bastion/v1/file-chunk", [header, i, last])``.
Binding the index stops reordering, binding the last-chunk flag stops
truncation (the real last chunk cannot be dropped: the one before it is not
flagged last) and extension (nothing may follow a chunk flagged last), and
binding the header stops a changed chunk size or nonce prefix.

The receiver also checks the SHA-256 of the whole blob, which the sender put in
the end-to-end message next to the key. Decryption writes to a temporary file in
the destination folder and gives it its final name only when every check has
passed; on any failure the temporary file is deleted and nothing appears.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.crypto.signing import signing_input
from bastion.errors import ConfigError, StorageError
from bastion.files.errors import FileIntegrityError

CHUNK_CONTEXT = "bastion/v1/file-chunk"
FORMAT_VERSION = 1
KEY_BYTES = 32
NONCE_PREFIX_BYTES = 8
TAG_BYTES = 16
SHA256_BYTES = 32
__all__ = ["EncryptedFile", "FileIntegrityError", "FileKey", "decrypt_file", "encrypt_stream"]
DEFAULT_CHUNK_SIZE = 64 * 1024
MIN_CHUNK_SIZE = 64
MAX_CHUNK_SIZE = 4 * 1024 * 1024
MAX_CHUNKS = 2**32

_HEADER = struct.Struct(">BI8s")
HEADER_BYTES = _HEADER.size


class FileKey:
    """The random AES-256 key of one file. ``repr`` never shows it."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise FileIntegrityError("a file key must be 32 bytes")
        self._key = key

    @classmethod
    def generate(cls) -> FileKey:
        """Return a new random key (one per file, never reused)."""
        return cls(AESGCM.generate_key(bit_length=256))

    def to_bytes(self) -> bytes:
        """Return the raw key, to be sent inside an end-to-end encrypted message."""
        return self._key

    def __repr__(self) -> str:
        return "FileKey(<redacted>)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FileKey):
            return NotImplemented
        return hmac.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return hash(hashlib.sha256(self._key).digest())


@dataclass(frozen=True, slots=True)
class EncryptedFile:
    """What the sender puts in the end-to-end message next to the blob."""

    key: FileKey
    sha256: bytes
    size: int
    plaintext_size: int


def _chunk_nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def _chunk_ad(header: bytes, index: int, last: bool) -> bytes:
    return signing_input(CHUNK_CONTEXT, [header, index, 1 if last else 0])


def _read_exact(src: BinaryIO, size: int) -> bytes:
    """Read up to ``size`` bytes, looping over short reads; fewer only at end of stream."""
    parts: list[bytes] = []
    remaining = size
    while remaining > 0:
        data = src.read(remaining)
        if not data:
            break
        parts.append(data)
        remaining -= len(data)
    return b"".join(parts)


def encrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    key: FileKey | None = None,
    nonce_prefix: bytes | None = None,
) -> EncryptedFile:
    """Encrypt ``src`` into ``dst`` under a fresh random key, in constant memory.

    ``key`` and ``nonce_prefix`` exist for exact tests; leave them out in real use
    (a key must never encrypt two files). Returns the key, the SHA-256 and size of
    the ciphertext and the plaintext size. Raises :class:`ConfigError` for a chunk
    size outside its bounds or a file too large for it, and :class:`StorageError`
    if reading or writing fails.
    """
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ConfigError(f"chunk size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}")
    file_key = key if key is not None else FileKey.generate()
    prefix = nonce_prefix if nonce_prefix is not None else secrets.token_bytes(NONCE_PREFIX_BYTES)
    if len(prefix) != NONCE_PREFIX_BYTES:
        raise ConfigError("the nonce prefix must be 8 bytes")
    aead = AESGCM(file_key.to_bytes())
    header = _HEADER.pack(FORMAT_VERSION, chunk_size, prefix)
    digest = hashlib.sha256(header)
    size = len(header)
    plaintext_size = 0
    try:
        dst.write(header)
        index = 0
        current = _read_exact(src, chunk_size)
        while True:
            following = _read_exact(src, chunk_size) if len(current) == chunk_size else b""
            last = not following
            if index >= MAX_CHUNKS:
                raise ConfigError("file too large for this chunk size")
            sealed = aead.encrypt(
                _chunk_nonce(prefix, index), current, _chunk_ad(header, index, last)
            )
            dst.write(sealed)
            digest.update(sealed)
            size += len(sealed)
            plaintext_size += len(current)
            if last:
                break
            current = following
            index += 1
    except OSError as exc:
        raise StorageError(f"could not encrypt the file: {exc.strerror or 'I/O error'}") from None
    return EncryptedFile(
        key=file_key, sha256=digest.digest(), size=size, plaintext_size=plaintext_size
    )


def encrypt_file(
    source: Path, destination: Path, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> EncryptedFile:
    """Encrypt the file at ``source`` into a new file ``destination`` (created 0600).

    Raises :class:`StorageError` if ``destination`` exists or I/O fails, and
    :class:`ConfigError` for a bad chunk size.
    """
    try:
        fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise StorageError(f"could not create the encrypted file: {exc.strerror}") from None
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
            return encrypt_stream(src, dst, chunk_size=chunk_size)
    except OSError as exc:
        destination.unlink(missing_ok=True)
        raise StorageError(f"could not encrypt the file: {exc.strerror}") from None
    except BaseException:
        destination.unlink(missing_ok=True)
        raise


def _decrypt_chunks(
    src: BinaryIO,
    dst: BinaryIO,
    key: FileKey,
    *,
    expected_size: int,
    max_chunk_size: int,
) -> tuple[bytes, int, int]:
    """Decrypt every chunk into ``dst``; return (blob SHA-256, blob size, plaintext size)."""
    header = _read_exact(src, HEADER_BYTES)
    if len(header) != HEADER_BYTES:
        raise FileIntegrityError("the encrypted file is truncated (no header)")
    version, chunk_size, prefix = _HEADER.unpack(header)
    if version != FORMAT_VERSION:
        raise FileIntegrityError(f"unsupported encrypted file version {version}")
    if not MIN_CHUNK_SIZE <= chunk_size <= min(max_chunk_size, MAX_CHUNK_SIZE):
        raise FileIntegrityError("the encrypted file declares an invalid chunk size")
    aead = AESGCM(key.to_bytes())
    digest = hashlib.sha256(header)
    seen = len(header)
    plaintext_size = 0
    record_size = chunk_size + TAG_BYTES
    index = 0
    current = _read_exact(src, record_size)
    while True:
        seen += len(current)
        if seen > expected_size:
            raise FileIntegrityError("the encrypted file is longer than announced")
        following = _read_exact(src, record_size) if len(current) == record_size else b""
        last = not following
        if len(current) < TAG_BYTES:
            raise FileIntegrityError("the encrypted file is truncated")
        if index >= MAX_CHUNKS:
            raise FileIntegrityError("the encrypted file has too many chunks")
        digest.update(current)
        try:
            plain = aead.decrypt(
                _chunk_nonce(prefix, index), current, _chunk_ad(header, index, last)
            )
        except InvalidTag:
            raise FileIntegrityError(
                f"chunk {index} failed authentication (tampered, reordered or truncated)"
            ) from None
        dst.write(plain)
        plaintext_size += len(plain)
        if last:
            break
        current = following
        index += 1
    if src.read(1):
        raise FileIntegrityError("data follows the last chunk")
    return digest.digest(), seen, plaintext_size


def decrypt_stream_to_path(
    src: BinaryIO,
    destination: Path,
    key: FileKey,
    *,
    expected_sha256: bytes,
    expected_size: int,
    max_chunk_size: int = MAX_CHUNK_SIZE,
) -> int:
    """Decrypt the blob read from ``src`` into the new file ``destination`` (mode 0600).

    The plaintext goes to a temporary file in ``destination``'s folder and is
    linked to ``destination`` only when every chunk authenticated, the chunk
    order and end were right, and the blob's SHA-256 and size equal
    ``expected_sha256`` and ``expected_size``. Returns the plaintext size.
    Raises :class:`FileIntegrityError` on any integrity failure and
    :class:`StorageError` if ``destination`` exists or I/O fails; in both cases
    nothing is left in the folder.
    """
    if len(expected_sha256) != SHA256_BYTES:
        raise FileIntegrityError("the announced ciphertext hash is not a SHA-256")
    if expected_size < HEADER_BYTES + TAG_BYTES:
        raise FileIntegrityError("the announced ciphertext size is impossible")
    folder = destination.parent
    try:
        fd, temp_name = _make_temp(folder)
    except OSError as exc:
        raise StorageError(f"could not write into the folder: {exc.strerror}") from None
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as dst:
            digest, blob_size, plaintext_size = _decrypt_chunks(
                src, dst, key, expected_size=expected_size, max_chunk_size=max_chunk_size
            )
            dst.flush()
            os.fsync(dst.fileno())
        if blob_size != expected_size:
            raise FileIntegrityError("the encrypted file's size is not the announced one")
        if not hmac.compare_digest(digest, expected_sha256):
            raise FileIntegrityError("the encrypted file's hash is not the announced one")
        _link_new(temp, destination)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise StorageError(f"could not write the decrypted file: {exc.strerror}") from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    temp.unlink(missing_ok=True)
    return plaintext_size


def decrypt_file(
    source: Path,
    destination: Path,
    key: FileKey,
    *,
    expected_sha256: bytes,
    expected_size: int,
    max_chunk_size: int = MAX_CHUNK_SIZE,
) -> int:
    """Decrypt the blob at ``source`` into the new file ``destination``; see
    :func:`decrypt_stream_to_path`. The blob's size must equal ``expected_size``.

    Raises :class:`FileIntegrityError` or :class:`StorageError`; nothing is left
    behind on failure.
    """
    try:
        src = open(source, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise StorageError(f"could not read the encrypted file: {exc.strerror}") from None
    with src:
        try:
            actual = os.fstat(src.fileno()).st_size
        except OSError as exc:
            raise StorageError(f"could not read the encrypted file: {exc.strerror}") from None
        if actual != expected_size:
            raise FileIntegrityError("the encrypted file's size is not the announced one")
        return decrypt_stream_to_path(
            src,
            destination,
            key,
            expected_sha256=expected_sha256,
            expected_size=expected_size,
            max_chunk_size=max_chunk_size,
        )


def _make_temp(folder: Path) -> tuple[int, str]:
    name = folder / f".bastion-partial-{secrets.token_hex(8)}"
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    return fd, str(name)


def _link_new(temp: Path, destination: Path) -> None:
    """Give ``temp`` the name ``destination`` without ever replacing an existing file."""
    try:
        os.link(temp, destination)
    except FileExistsError:
        raise StorageError("the destination file already exists") from None
    except OSError:
        # File systems without hard links: check, then rename (the folder is ours).
        if destination.exists() or destination.is_symlink():
            raise StorageError("the destination file already exists") from None
        os.rename(temp, destination)
