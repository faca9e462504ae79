"""Where a profile's gateway keeps its socket, token and lock, and who may use them.

All of them live in the profile folder, which only its owner may enter (0700):
the socket is made 0600 and the token file 0600, so only the owning OS user can
reach the doors (DESIGN §1: the gateway secures what leaves the machine; the
machine's other users are outside the circle).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from bastion.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

SOCKET_FILE = "gateway.sock"
TOKEN_FILE = "gateway.token"  # noqa: S105 - the file name, not a token
LOCK_FILE = "gateway.lock"
SUN_PATH_MAX = 104  # sockaddr_un.sun_path: 108 on Linux, 104 on macOS and the BSDs
TOKEN_BYTES = 32


def gateway_running(profile_dir: Path) -> bool:
    """Whether a gateway holds this profile's lock right now.

    Here rather than with the gateway itself, so the commands that ask need not
    load the gateway (whose methods use the commands' output functions).
    """
    if fcntl is None or not (profile_dir / LOCK_FILE).exists():
        return False
    fd = os.open(profile_dir / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def socket_path(profile_dir: Path) -> Path:
    """The gateway's Unix socket in ``profile_dir``; raises ConfigError if the path is too long."""
    path = profile_dir.absolute() / SOCKET_FILE
    if len(os.fsencode(path)) >= SUN_PATH_MAX:
        raise ConfigError(
            f"the profile folder's path is too long for a Unix socket ({len(str(path))} "
            f"characters; at most {SUN_PATH_MAX - 1}): move the profile to a shorter path"
        )
    return path


def check_private_folder(profile_dir: Path) -> None:
    """Refuse a profile folder that others may enter or that another user owns."""
    info = profile_dir.stat()
    if info.st_uid != os.getuid():
        raise ConfigError(f"the profile folder {profile_dir} belongs to another user")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError(
            f"the profile folder {profile_dir} is open to other users "
            f"(mode {stat.S_IMODE(info.st_mode):o}); run 'chmod 700' on it"
        )


def fresh_token() -> str:
    """A new random token (a new one each time the gateway starts)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def new_token(profile_dir: Path, token: str | None = None) -> str:
    """Write ``token`` (default: a fresh one) to the profile's token file (0600); returns it.

    A new token each time the gateway starts: one read from an old file is void.
    """
    token = token if token is not None else fresh_token()
    path = profile_dir / TOKEN_FILE
    tmp = path.with_name(TOKEN_FILE + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, token.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    return token


def read_token(profile_dir: Path) -> str:
    """The running gateway's token; raises ConfigError when there is none."""
    try:
        return (profile_dir / TOKEN_FILE).read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"no gateway token in {profile_dir}: is the gateway running?") from None


def token_matches(given: str | bytes | None, token: str) -> bool:
    """Whether ``given`` is the token, compared in constant time."""
    if given is None:
        return False
    raw = given.encode() if isinstance(given, str) else given
    return secrets.compare_digest(raw, token.encode())


def hold_lock(profile_dir: Path) -> int | None:
    """Take the profile's gateway lock; raises ConfigError when another gateway holds it."""
    if fcntl is None:
        return None
    fd = os.open(profile_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError("a gateway is already running for this profile") from None
    return fd
