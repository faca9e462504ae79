"""Unlocking the profile for the gateway: the usual passphrase, or the OS keyring when asked.

The keyring (through the ``keyring`` library: the Secret Service on Linux
desktops, the macOS Keychain, the Windows Credential Locker) is opt-in
(``bastion gateway --keyring``): the passphrase is then kept by the OS, unlocked
with the user's session, so the gateway can start at login without a prompt.
Whoever runs code as the user while the session is unlocked can read it there,
which is why it is not the default (docs/threat-model.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keyring
import keyring.errors

from bastion.errors import ConfigError

SERVICE = "bastion"


def _entry(profile_dir: Path) -> str:
    return f"profile:{profile_dir.resolve()}"


def passphrase_for(profile_dir: Path, *, use_keyring: bool, ask: Callable[[], str]) -> str:
    """The keyring's passphrase for the profile when asked for and kept there, else ``ask()``."""
    if use_keyring:
        try:
            kept = keyring.get_password(SERVICE, _entry(profile_dir))
        except keyring.errors.KeyringError as exc:
            raise ConfigError(f"the OS keyring cannot be read: {type(exc).__name__}") from None
        if kept:
            return kept
    return ask()


def remember(profile_dir: Path, secret: str) -> None:
    """Keep the passphrase (that just unlocked the profile) in the OS keyring."""
    try:
        keyring.set_password(SERVICE, _entry(profile_dir), secret)
    except keyring.errors.KeyringError as exc:
        raise ConfigError(
            f"the OS keyring cannot keep the passphrase: {type(exc).__name__}; "
            "run without --keyring"
        ) from None


def forget(profile_dir: Path) -> bool:
    """Remove the profile's passphrase from the keyring; False when none was kept."""
    try:
        keyring.delete_password(SERVICE, _entry(profile_dir))
    except keyring.errors.PasswordDeleteError:
        return False
    return True
