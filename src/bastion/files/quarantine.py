"""The quarantine folder where received files wait for their verdict.

The folder is private to the user (0700). A received file is held here
*sealed*: the downloaded ciphertext, still encrypted under the file's own key,
which only the encrypted profile holds (:meth:`Quarantine.hold`). It is
decrypted under a random name without extension, mode 0600, only for the scan
and for the moment it is released (:meth:`Quarantine.receive`), so no file
manager or shell runs or previews it, and a blocked or unscanned file never
sits here as plaintext; the caller deletes the plaintext when the scan is done,
and :meth:`Quarantine.sweep_plaintext` removes what a crash left behind. Only a
file whose verdict is clean can be released: copied to a folder of the user's
choice under its sanitised name, never over an existing file
(``report (1).pdf`` instead), mode 0644 without any execute bit. Nothing here
ever opens or runs a file.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import time
from pathlib import Path
from typing import BinaryIO

from bastion.errors import SecurityError, StorageError
from bastion.files.cipher import FileKey, decrypt_stream_to_path
from bastion.files.names import extension_of, sanitize_filename
from bastion.files.scan import Verdict

FOLDER_MODE = 0o700
QUARANTINED_MODE = 0o600
RELEASED_MODE = 0o644
MAX_NAME_ATTEMPTS = 1000
SEALED_PREFIX = "sealed-"
PLAINTEXT_PREFIXES = ("received-", ".bastion-partial-")
#: A plaintext older than this is left over from a scan that never finished.
PLAINTEXT_MAX_AGE_S = 3600.0


class Quarantine:
    """A private folder of received files awaiting (or failing) their scan."""

    __slots__ = ("folder",)

    def __init__(self, folder: Path) -> None:
        """Create ``folder`` (mode 0700) if needed and tighten its mode if it exists.

        Raises :class:`StorageError` if it cannot be made private or is a symlink.
        """
        try:
            folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
            info = folder.lstat()
            if not stat.S_ISDIR(info.st_mode):
                raise StorageError("the quarantine path is not a folder")
            if stat.S_IMODE(info.st_mode) != FOLDER_MODE:
                os.chmod(folder, FOLDER_MODE)
        except OSError as exc:
            raise StorageError(f"could not prepare the quarantine folder: {exc.strerror}") from None
        self.folder = folder

    def receive(
        self, ciphertext: BinaryIO, key: FileKey, *, expected_sha256: bytes, expected_size: int
    ) -> Path:
        """Decrypt a downloaded blob into the quarantine; return the quarantined file.

        Raises :class:`~bastion.files.errors.FileIntegrityError` or
        :class:`StorageError`; on failure nothing is left in the folder.
        """
        destination = self.folder / f"received-{secrets.token_hex(12)}"
        decrypt_stream_to_path(
            ciphertext,
            destination,
            key,
            expected_sha256=expected_sha256,
            expected_size=expected_size,
        )
        return destination

    def hold(self, downloaded: Path) -> Path:
        """Move a downloaded ciphertext into the quarantine; return the sealed file.

        ``downloaded`` must be on the same file system (the profile's downloads
        folder). Raises :class:`StorageError` if it cannot be moved.
        """
        sealed = self.folder / f"{SEALED_PREFIX}{secrets.token_hex(12)}"
        try:
            os.chmod(downloaded, QUARANTINED_MODE)
            os.replace(downloaded, sealed)
        except OSError as exc:
            raise StorageError(f"could not keep the download: {exc.strerror}") from None
        return sealed

    def open_sealed(
        self, sealed: Path, key: FileKey, *, expected_sha256: bytes, expected_size: int
    ) -> Path:
        """Decrypt a sealed file into the quarantine for a scan; return the plaintext file.

        The caller deletes the plaintext when done (:meth:`discard`). Raises
        :class:`~bastion.files.errors.FileIntegrityError` or :class:`StorageError`.
        """
        self._check_inside(sealed)
        try:
            with open(sealed, "rb") as src:
                return self.receive(
                    src, key, expected_sha256=expected_sha256, expected_size=expected_size
                )
        except OSError as exc:
            raise StorageError(f"could not read the quarantined file: {exc.strerror}") from None

    def sweep_plaintext(
        self, *, now: float | None = None, max_age_s: float = PLAINTEXT_MAX_AGE_S
    ) -> int:
        """Delete decrypted files older than ``max_age_s`` (left by a crash); return how many."""
        cutoff = (time.time() if now is None else now) - max_age_s
        removed = 0
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return 0
        for entry in entries:
            if not entry.name.startswith(PLAINTEXT_PREFIXES):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(f"could not clean the quarantine: {exc.strerror}") from None
        return removed

    def discard(self, quarantined: Path) -> None:
        """Delete a quarantined file. Raises :class:`StorageError` if it is not ours."""
        self._check_inside(quarantined)
        quarantined.unlink(missing_ok=True)

    def release(
        self, quarantined: Path, verdict: Verdict, destination_folder: Path, claimed_name: str
    ) -> Path:
        """Move a clean quarantined file to ``destination_folder`` under its sanitised name.

        Never overwrites: ``name (1).ext``, ``name (2).ext``... The released file
        has mode 0644. Raises :class:`SecurityError` if ``verdict`` is not clean
        and :class:`StorageError` if the file cannot be written.
        """
        if not verdict.is_clean:
            raise SecurityError("only a file whose scan was clean can be released")
        self._check_inside(quarantined)
        name = sanitize_filename(claimed_name).name
        try:
            with open(quarantined, "rb") as src:
                fd, target = _create_unique(destination_folder, name)
                try:
                    with os.fdopen(fd, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                        dst.flush()
                        os.fchmod(dst.fileno(), RELEASED_MODE)
                        os.fsync(dst.fileno())
                except BaseException:
                    target.unlink(missing_ok=True)
                    raise
        except OSError as exc:
            raise StorageError(f"could not save the file: {exc.strerror}") from None
        quarantined.unlink(missing_ok=True)
        return target

    def _check_inside(self, path: Path) -> None:
        if path.parent.resolve() != self.folder.resolve():
            raise StorageError("that file is not in the quarantine folder")


def _create_unique(folder: Path, name: str) -> tuple[int, Path]:
    """Create a new file in ``folder`` named ``name`` or ``name (n)``; never replace one."""
    ext = extension_of(name)
    stem, suffix = (name[: -len(ext) - 1], name[-len(ext) - 1 :]) if ext else (name, "")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    for attempt in range(MAX_NAME_ATTEMPTS):
        candidate = name if attempt == 0 else f"{stem} ({attempt}){suffix}"
        target = folder / candidate
        try:
            return os.open(target, flags, RELEASED_MODE), target
        except FileExistsError:
            continue
    raise StorageError("too many files with that name already exist in the folder")
