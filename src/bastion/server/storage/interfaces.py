"""The server's storage interface and the records that cross it.

The relay core depends only on :class:`Store`; SQLite (the embedded default)
and other databases implement it. The server stores public keys, signed key
stocks, and ciphertext queues: never a plaintext, a password or a private key.

Contract for implementations: ``submit_message`` calls from one sender device
take effect in call order (per-conversation order depends on it), and every
call (its future, for ``submit_message``) completes only once its effects are
durable.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec

from bastion.errors import StorageError

# The refusals of submit_message are decided in one place for every store (check_copies).
from bastion.server.core.messages import (
    DeviceMismatchError,
    NotContactsError,
    QueueFullError,
    UnknownRecipientError,
)

__all__ = [
    "AccountRecord",
    "ClaimedKeyRecord",
    "Copy",
    "DeviceMismatchError",
    "DeviceRecord",
    "DeviceRefusedError",
    "KeyRecord",
    "NotContactsError",
    "QueueFullError",
    "QueuedEnvelope",
    "RunningLoop",
    "Store",
    "StoredMessage",
    "UnknownRecipientError",
    "UsernameTakenError",
]


class UsernameTakenError(StorageError):
    """Registration named a username that already exists."""


@dataclass(frozen=True, slots=True)
class AccountRecord:
    """An account as the server knows it: a name and a public identity key."""

    username: str
    identity_key: bytes
    created_at: int
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A device's public keys and the account key's certificate over them."""

    username: str
    device_id: str
    ed25519: bytes
    curve25519: bytes
    created_at: int
    certificate: bytes


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A published Curve25519 key with its device signature."""

    key: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class ClaimedKeyRecord:
    """A key claimed from one device's stock."""

    device_id: str
    key: bytes
    signature: bytes
    fallback: bool


# The three records built for every relayed message are msgspec Structs: as immutable as
# frozen dataclasses, built in ~0.12 µs instead of ~0.8 µs (docs/benchmarks.md).
class Copy(msgspec.Struct, frozen=True, gc=False):
    """One ciphertext of a message, for one device."""

    user: str
    device_id: str
    kind: int
    body: bytes


class QueuedEnvelope(msgspec.Struct, frozen=True, gc=False):
    """A ciphertext waiting in a device's queue until the device acknowledges it."""

    seq: int
    user: str
    device_id: str
    sender: str
    sender_device: str
    server_ts: int
    kind: int
    body: bytes


class StoredMessage(msgspec.Struct, frozen=True):
    """The outcome of storing a message: when it was accepted and what was queued.

    ``envelopes`` is empty when the same client message id had already been stored
    (an idempotent retry); ``server_ts`` is then the original acceptance time.
    """

    server_ts: int
    envelopes: list[QueuedEnvelope]


class RunningLoop:
    """``asyncio.get_running_loop()`` for code called once per message.

    On Python 3.11 every ``get_running_loop()`` is a ``getpid()`` system call.
    The loop found last is kept with its thread: a loop that is running on the
    calling thread is the one that calls (a thread runs one loop at a time).
    """

    __slots__ = ("_loop", "_thread")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0

    def get(self) -> asyncio.AbstractEventLoop:
        """The running loop of the calling thread; RuntimeError if there is none."""
        loop = self._loop
        if loop is not None and self._thread == threading.get_ident() and loop.is_running():
            return loop
        loop = asyncio.get_running_loop()
        self._loop, self._thread = loop, threading.get_ident()
        return loop


class Store(Protocol):
    """Everything the relay keeps between restarts."""

    async def create_account(
        self,
        account: AccountRecord,
        device: DeviceRecord,
        one_time_keys: Sequence[KeyRecord],
        fallback_key: KeyRecord,
    ) -> None:
        """Create an account with its first device; raises :class:`UsernameTakenError`."""
        ...

    async def get_account(self, username: str) -> AccountRecord | None:
        """The account, or None."""
        ...

    async def get_device(self, username: str, device_id: str) -> DeviceRecord | None:
        """One device of an account, or None."""
        ...

    async def list_devices(self, username: str) -> list[DeviceRecord]:
        """All current devices of an account (empty if there is no such account)."""
        ...

    async def add_one_time_keys(
        self, username: str, device_id: str, keys: Sequence[KeyRecord], fallback: KeyRecord | None
    ) -> int:
        """Add keys to a device's stock (and replace its fallback key); returns the stock size."""
        ...

    async def count_one_time_keys(self, username: str, device_id: str) -> int:
        """How many one-time keys the device has in stock."""
        ...

    async def claim_keys(self, username: str) -> list[ClaimedKeyRecord]:
        """Atomically take one one-time key per device (the fallback key if none is left)."""
        ...

    def submit_message(
        self,
        *,
        sender: str,
        sender_device: str,
        client_msg_id: bytes,
        recipient: str,
        server_ts: int,
        copies: Sequence[Copy],
        queue_max: int | None = None,
        contacts_only: bool = False,
    ) -> asyncio.Future[StoredMessage]:
        """Queue one ciphertext per device, durably, once per (sender device, client id).

        Called from the running event loop; returns a future, so that the relay
        needs no task per message. A retry of a stored message resolves to the
        original outcome before any check below. Otherwise, in the transaction
        that stores it (so a change committed before it is always seen), nothing
        is stored and the future raises:

        * :class:`UnknownRecipientError` if the recipient does not exist;
        * :class:`NotContactsError` if ``contacts_only`` and the two accounts are
          not accepted contacts both ways (the caller then applies the full rules);
        * :class:`QueueFullError` if ``queue_max`` envelopes or more already wait
          for the recipient's devices;
        * :class:`DeviceMismatchError` unless ``copies`` name exactly the
          recipient's devices and the sender's other devices.
        """
        ...

    async def fetch_queue(
        self, username: str, device_id: str, after_seq: int, limit: int
    ) -> list[QueuedEnvelope]:
        """Queued envelopes of a device with ``seq > after_seq``, oldest first."""
        ...

    async def ack(self, username: str, device_id: str, seqs: Sequence[int]) -> int:
        """Delete acknowledged envelopes of that device; returns how many were deleted."""
        ...

    async def close(self) -> None:
        """Finish pending work and release the database."""
        ...

    async def add_device(
        self,
        device: DeviceRecord,
        one_time_keys: Sequence[KeyRecord],
        fallback_key: KeyRecord,
        *,
        max_devices: int,
    ) -> None:
        """Add a certified device to an existing account.

        Raises :class:`DeviceRefusedError` if the id was revoked, already exists,
        or the account has ``max_devices`` devices.
        """
        ...

    async def revoke_device(self, username: str, device_id: str) -> bool:
        """Remove a device with its keys and queue, and remember its id as revoked."""
        ...

    async def count_queued(self, username: str) -> int:
        """How many envelopes wait, over all devices of ``username`` (0 for no such user)."""
        ...


class DeviceRefusedError(StorageError):
    """A device could not be added (revoked before, already present, or too many)."""
