"""The one exception tree of Bastion.

Every error Bastion raises on purpose is a :class:`BastionError`. Anything else
escaping the package is a bug.

::

    BastionError
    ├── ProtocolError            their fault: a peer sent something we refuse
    │   ├── FrameError           undecodable, unknown, oversize or ill-typed frame
    │   └── AuthenticationError  a signature, certificate or challenge did not check out
    ├── SecurityError            a protection tripped; never shown as success
    │   ├── UntrustedServerError the server certificate or name is not the pinned one
    │   ├── KeyChangedError      a contact's pinned account key changed
    │   ├── DeviceListError      the signed device list is missing, older, or omits a device
    │   └── RejectedMessageError a received message failed a check and was dropped
    ├── ServerRefusedError       the server answered a request with an error frame
    ├── StateError               our state: missing profile, wrong passphrase, corrupt store
    │   ├── ProfileError
    │   └── StorageError
    └── ConfigError              an operator or user setting is invalid

"Their fault" (``ProtocolError``) is kept apart from "our state" (``StateError``):
the first is answered with an error frame and counted, the second stops the
operation and is reported to the local user.
"""

from __future__ import annotations

from bastion.protocol.codes import ErrorCode


class BastionError(Exception):
    """Root of every error Bastion raises on purpose."""


class ProtocolError(BastionError):
    """A peer sent something that breaks the protocol."""

    code: ErrorCode = ErrorCode.PROTOCOL


class FrameError(ProtocolError):
    """A frame could not be decoded against its schema."""

    code: ErrorCode = ErrorCode.BAD_FRAME


class AuthenticationError(ProtocolError):
    """A signature, certificate or challenge failed verification."""

    code: ErrorCode = ErrorCode.AUTH_FAILED


class SecurityError(BastionError):
    """A security check refused to go on."""


class UntrustedServerError(SecurityError):
    """The server presented a certificate or name other than the pinned one."""


class KeyChangedError(SecurityError):
    """A contact's account identity key differs from the pinned one."""

    def __init__(self, user: str) -> None:
        super().__init__(
            f"{user}'s account key has changed. This can mean they reinstalled, or that "
            f"someone is impersonating them. Compare safety numbers before you trust it."
        )
        self.user = user


class DeviceListError(SecurityError):
    """The server's answer about an account's devices fails the signed device list."""


class RejectedMessageError(SecurityError):
    """A received message failed a check; it is dropped and reported."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ServerRefusedError(BastionError):
    """The server refused a request; ``code`` is the machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StateError(BastionError):
    """Local state is missing, locked or inconsistent."""


class ProfileError(StateError):
    """The client profile is missing, locked with another passphrase, or damaged."""


class StorageError(StateError):
    """A store could not complete an operation."""


class ConfigError(BastionError):
    """A setting is invalid."""
