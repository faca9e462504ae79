"""A keyring backend that keeps passwords in a JSON file named by ``TEST_KEYRING_FILE``.

Loaded by the ``keyring`` library itself through ``PYTHON_KEYRING_BACKEND``, the
way a user picks a backend, so the gateway's keyring path runs unchanged; on a
desktop the Secret Service or Keychain stands where this file stands.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from keyring.backend import KeyringBackend
from keyring.errors import PasswordDeleteError


class FileKeyring(KeyringBackend):
    priority = 1

    def _path(self) -> Path:
        return Path(os.environ["TEST_KEYRING_FILE"])

    def _load(self) -> dict[str, str]:
        path = self._path()
        return json.loads(path.read_text()) if path.exists() else {}

    def get_password(self, service: str, username: str) -> str | None:
        return self._load().get(f"{service}\n{username}")

    def set_password(self, service: str, username: str, password: str) -> None:
        data = self._load()
        data[f"{service}\n{username}"] = password
        self._path().write_text(json.dumps(data))

    def delete_password(self, service: str, username: str) -> None:
        data = self._load()
        if data.pop(f"{service}\n{username}", None) is None:
            raise PasswordDeleteError("not kept")
        self._path().write_text(json.dumps(data))
