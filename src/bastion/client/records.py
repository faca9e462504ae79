"""What a profile stores, as typed records (sealed at rest by :mod:`bastion.client.profile`)."""

from __future__ import annotations

import msgspec


class AccountInfo(msgspec.Struct, frozen=True, kw_only=True):
    """This device's account, server and pins."""

    username: str
    server_url: str
    fingerprint: str
    server_name: str
    device_id: str
    created_at: int


class DeviceEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A contact's device whose certificate checked out under the pinned account key."""

    device_id: str
    ed25519: bytes
    curve25519: bytes
    created_at: int


class ContactRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A pinned account key (trust on first use until verified) and known devices.

    ``device_list_version`` is the highest signed device list version seen under
    ``identity_key`` (0: the account never showed one), ``listed_devices`` its ids.
    """

    user: str
    identity_key: bytes
    trust: str = "unverified"  # unverified | verified | changed
    devices: list[DeviceEntry] = msgspec.field(default_factory=list)
    pending_key: bytes | None = None
    device_list_version: int = 0
    listed_devices: list[str] = msgspec.field(default_factory=list)


class Edit(msgspec.Struct, frozen=True, kw_only=True):
    """A text a message showed before an edit, and when it was replaced."""

    text: str
    replaced_at: int


class HistoryRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One message in the local history.

    ``reply_to`` is the id of the message it quotes (only the id is kept: the quote
    is looked up when shown, so deleting the quoted message removes it here too).
    ``reactions`` maps each member who reacted to their one emoji. ``edits`` is the
    trail of earlier texts, oldest first, and ``edited_at`` the time of the last
    edit (0: never edited). ``deleted_at`` is when the sender deleted it for
    everyone (0: not deleted); a deleted message keeps no text, trail or reactions.
    """

    id: bytes
    sender: str
    device: str
    peer: str
    conversation: str
    text: str
    sent_at: int
    server_ts: int
    direction: str  # in | out
    state: str  # queued | pending | sent | delivered | received | failed
    reason: str = ""  # why a failed message was refused (the server's words)
    reply_to: bytes | None = None
    reactions: dict[str, str] = msgspec.field(default_factory=dict)
    edits: list[Edit] = msgspec.field(default_factory=list)
    edited_at: int = 0
    deleted_at: int = 0


class Stats(msgspec.Struct, frozen=True, kw_only=True):
    """Counters kept with the profile."""

    rejected: int = 0
