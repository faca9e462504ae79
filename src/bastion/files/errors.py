"""Errors of the file layer, in Bastion's one exception tree (see :mod:`bastion.errors`).

::

    SecurityError
    ├── FileIntegrityError        ciphertext, header, key or hash did not check out
    └── ScannerUnavailableError   a scanner (YARA, clamd) could not run: fail closed
"""

from __future__ import annotations

from bastion.errors import SecurityError


class FileIntegrityError(SecurityError):
    """A file's ciphertext, header, key or hash did not check out; nothing was written."""


class ScannerUnavailableError(SecurityError):
    """A scanner could not run, so the file cannot be called clean."""
