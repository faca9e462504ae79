"""Whether a message may be stored as sent: the one copy of the rule every store calls.

A ``send`` carries one ciphertext per device: each current device of the
recipient, and each other device of the sender (so that the sender's own
devices keep the conversation). Both store adapters check that in the
transaction that stores the message, with the facts as that transaction sees
them, and refuse in one order (:func:`check_copies`):

1. an unknown recipient;
2. not accepted contacts, when the send asked for contacts only (before the
   devices: a stranger learns nothing of them);
3. copies that are not exactly one per expected device;
4. a full queue of the recipient.

No I/O here: the adapter passes the facts in, and the two facts that cost a
query on the way to a refusal (the contact pair and the queue count) as
functions called only when their check is reached.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol

from bastion.errors import StorageError


class UnknownRecipientError(StorageError):
    """A message named a user who does not exist."""


class NotContactsError(StorageError):
    """A message asked to be stored only between accepted contacts, and they are not."""


class QueueFullError(StorageError):
    """Too many envelopes already wait for the recipient."""


class DeviceMismatchError(StorageError):
    """A message did not carry exactly one ciphertext per current device."""

    def __init__(self, missing: Sequence[str], extra: Sequence[str]) -> None:
        super().__init__("the message does not match the recipients' current devices")
        self.missing = list(missing)
        self.extra = list(extra)


class Addressed(Protocol):
    """A copy of a message, as far as the rule looks at it: the device it is for."""

    @property
    def user(self) -> str: ...

    @property
    def device_id(self) -> str: ...


def check_copies(
    copies: Sequence[Addressed],
    *,
    sender: str,
    sender_device: str,
    sender_devices: Iterable[str],
    recipient: str,
    recipient_devices: Collection[str],
    contacts_only: bool,
    are_contacts: Callable[[], bool],
    queue_max: int | None,
    queued: Callable[[], int],
) -> StorageError | None:
    """The refusal of a message, or None if it may be stored (order: module docstring).

    ``sender_devices`` and ``recipient_devices`` are the accounts' current device
    ids (none for a user who does not exist). ``are_contacts`` is called only when
    ``contacts_only`` and the recipient exists; ``queued`` (the envelopes waiting
    for the recipient, or an upper bound exact from ``queue_max`` on) only when
    ``queue_max`` is set and every other check passed.
    """
    if not recipient_devices:
        return UnknownRecipientError(f"there is no user named {recipient}")
    if contacts_only and not are_contacts():
        return NotContactsError(f"{sender} and {recipient} are not contacts")
    expected = {(recipient, d) for d in recipient_devices}
    expected.update((sender, d) for d in sender_devices if d != sender_device)
    given = {(c.user, c.device_id) for c in copies}
    if len(given) != len(copies) or given != expected:
        missing = sorted(f"{u}/{d}" for u, d in expected - given)
        extra = sorted(f"{u}/{d}" for u, d in given - expected)
        return DeviceMismatchError(missing, extra)
    if queue_max is not None and queued() >= queue_max:
        return QueueFullError(f"{recipient} has too many undelivered messages")
    return None
