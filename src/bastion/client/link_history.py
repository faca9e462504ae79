"""History and trust handed to a new device while it links (see :mod:`bastion.client.devices`).

The existing device gathers its 1:1 history (all of it, or the messages of the
last N days) and the pinned keys of its contacts with their trust, as one
MessagePack *bundle*. It cuts the bundle into pieces of at most
:data:`PIECE_BYTES`, each sealed under the link code's key
(:func:`bastion.crypto.linking.seal_piece`) and relayed by the server before the
grant, which names their number and the bundle's SHA-256. The new device checks
all of it before it enrols, then stores the records sealed in its profile like
any others and applies the trust: a contact verified on the old device is
verified on the new one for the same pinned key only.

Group conversations are not sent: the new device reads a group from its own
join on, as every member's new device does (protocol.md §8.8).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

import msgspec

from bastion.client import contacts
from bastion.client._util import check_username, dm_conversation, is_dm_conversation
from bastion.client.feature import ClientCore
from bastion.client.records import ContactRecord, HistoryRecord
from bastion.errors import AuthenticationError

DAY_MS = 86_400_000
PIECE_BYTES = 60 * 1024
"""The most bundle bytes in one sealed piece (a ``link_more`` frame holds 64 KiB)."""
MAX_HISTORY_BYTES = 64 * 1024 * 1024
"""The largest bundle sent or accepted; past it the user is asked to send fewer days."""
MAX_DAYS = 36_500
MAX_TEXT_CHARS = 16_000
MAX_MILLIS = 2**53
_KEPT_STATES = frozenset({"sent", "delivered", "received", "failed"})
_REFUSED = "the history from the other device is malformed; nothing was linked"


@dataclass(frozen=True, slots=True)
class HistoryChoice:
    """What the existing device sends: nothing, everything, or the last ``days`` days."""

    send: bool
    days: int | None = None

    def describe(self) -> str:
        """``none``, ``all`` or the number of days, as the option takes it."""
        if not self.send:
            return "none"
        return "all" if self.days is None else str(self.days)


NO_HISTORY = HistoryChoice(send=False)
ALL_HISTORY = HistoryChoice(send=True)


def parse_choice(text: str) -> HistoryChoice:
    """``all``, ``none`` or a number of days (1 to 36,500); raises ValueError with a sentence."""
    word = text.strip().lower()
    if word == "all":
        return ALL_HISTORY
    if word == "none":
        return NO_HISTORY
    if word.isascii() and word.isdigit() and 1 <= int(word) <= MAX_DAYS:
        return HistoryChoice(send=True, days=int(word))
    raise ValueError(
        f"the history to send is 'all', 'none' or a number of days from 1 to {MAX_DAYS}"
    )


class TrustEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A contact's pinned account key and whether the user verified it."""

    user: str
    identity_key: bytes
    verified: bool


class HistoryBundle(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Everything one link hands over besides the grant."""

    v: int
    messages: list[HistoryRecord]
    contacts: list[TrustEntry]

    def __repr__(self) -> str:
        return f"HistoryBundle({len(self.messages)} messages, {len(self.contacts)} contacts)"


@dataclass(frozen=True, slots=True)
class HistorySummary:
    """What a link handed over (shown by both devices); all zero when nothing was sent."""

    messages: int = 0
    conversations: int = 0
    verified: int = 0
    # The peer of each direct conversation sent, with its last message's time, so a
    # front end that keeps its own conversation list can list them.
    peers: tuple[tuple[str, int], ...] = field(default=(), compare=False)

    def describe(self) -> str:
        """One sentence for a person."""
        if not (self.messages or self.verified):
            return "no history was sent"
        return (
            f"{_count(self.messages, 'message')} in "
            f"{_count(self.conversations, 'conversation')} "
            f"and {_count(self.verified, 'verified contact')}"
        )


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def build(client: ClientCore, choice: HistoryChoice, *, now: int) -> tuple[bytes, HistorySummary]:
    """The bundle this device would send for ``choice``, encoded, and what it holds.

    Raises ValueError if it is larger than :data:`MAX_HISTORY_BYTES`.
    """
    if not choice.send:
        return b"", HistorySummary()
    since = 0 if choice.days is None else now - choice.days * DAY_MS
    messages = [
        record
        for record in client.profile.each_message(HistoryRecord)
        if is_dm_conversation(record.conversation)
        and record.state in _KEPT_STATES
        and record.sent_at >= since
    ]
    me = client.account.username
    users = {c.user for c in contacts.local_contacts(client)} | {r.peer for r in messages}
    trust = []
    for user in sorted(users - {me}):
        pinned = client.contact(user)
        if pinned is not None and pinned.trust != "self":
            trust.append(TrustEntry(user, pinned.identity_key, verified=pinned.trust == "verified"))
    raw = msgspec.msgpack.encode(HistoryBundle(v=1, messages=messages, contacts=trust))
    if len(raw) > MAX_HISTORY_BYTES:
        raise ValueError(
            f"the history is too large to send at once ({len(raw) // (1024 * 1024)} MB, "
            f"at most {MAX_HISTORY_BYTES // (1024 * 1024)} MB); send fewer days"
        )
    return raw, _summary(messages, trust)


def pieces(raw: bytes) -> list[bytes]:
    """The bundle cut into the pieces that are sealed one by one."""
    return [raw[i : i + PIECE_BYTES] for i in range(0, len(raw), PIECE_BYTES)]


def max_pieces() -> int:
    """The most pieces a bundle of :data:`MAX_HISTORY_BYTES` is cut into."""
    return -(-MAX_HISTORY_BYTES // PIECE_BYTES)


def digest(raw: bytes) -> bytes:
    """The SHA-256 the grant names for the bundle."""
    return hashlib.sha256(raw).digest()


def open_bundle(raw: bytes, expected_sha256: bytes, username: str) -> HistoryBundle:
    """Decode and check a received bundle for the account ``username``.

    Raises :class:`AuthenticationError` if it is not the one the grant names,
    or holds anything but this account's own 1:1 conversations and contacts.
    """
    if not hmac.compare_digest(digest(raw), expected_sha256):
        raise AuthenticationError("the history does not match what the other device sent")
    try:
        bundle = msgspec.msgpack.decode(raw, type=HistoryBundle)
    except msgspec.MsgspecError:
        raise AuthenticationError(_REFUSED) from None
    if bundle.v != 1:
        raise AuthenticationError(_REFUSED)
    try:
        for record in bundle.messages:
            _check_record(record, username)
        for entry in bundle.contacts:
            check_username(entry.user)
            if entry.user == username or len(entry.identity_key) != 32:
                raise ValueError(entry.user)
    except ValueError:
        raise AuthenticationError(_REFUSED) from None
    return bundle


def _check_record(record: HistoryRecord, me: str) -> None:
    """Raise ValueError unless ``record`` is a message of a 1:1 conversation of ``me``."""
    check_username(record.peer)
    outgoing = record.direction == "out"
    if (
        record.peer == me
        or record.conversation != dm_conversation(me, record.peer)
        or record.direction not in ("in", "out")
        or record.sender != (me if outgoing else record.peer)
        or record.state not in _KEPT_STATES
        or len(record.id) != 16
        or len(record.text) > MAX_TEXT_CHARS
        or not 0 <= record.sent_at <= MAX_MILLIS
    ):
        raise ValueError("record")


def store(client: ClientCore, bundle: HistoryBundle) -> HistorySummary:
    """Keep a checked bundle in this device's profile (one transaction); what was kept.

    Messages already held are left as they are. A contact is pinned to the sent
    key when this device has none for it yet, and marked verified only if the
    other device verified it and the key is the one pinned here.
    """
    kept: list[HistoryRecord] = []
    verified: list[TrustEntry] = []
    with client.profile.transaction():
        for entry in bundle.contacts:
            if _apply_trust(client, entry):
                verified.append(entry)
        for record in bundle.messages:
            if client.profile.add_message(record.conversation, record.id, record):
                kept.append(record)
    last: dict[str, int] = {}
    for record in bundle.messages:
        last[record.peer] = max(last.get(record.peer, 0), record.server_ts or record.sent_at)
    counts = _summary(kept, verified)
    return HistorySummary(
        messages=counts.messages,
        conversations=counts.conversations,
        verified=counts.verified,
        peers=tuple(sorted(last.items())),
    )


def _apply_trust(client: ClientCore, entry: TrustEntry) -> bool:
    """Pin or verify one contact (inside the caller's transaction); whether it is verified."""
    pinned = client.contact(entry.user)
    trust = "verified" if entry.verified else "unverified"
    if pinned is None:
        record = ContactRecord(user=entry.user, identity_key=entry.identity_key, trust=trust)
        client.profile.put("contact:" + entry.user, record)
        return entry.verified
    same_key = hmac.compare_digest(pinned.identity_key, entry.identity_key)
    if not (entry.verified and same_key and pinned.trust in ("unverified", "verified")):
        return False
    client.profile.put("contact:" + entry.user, msgspec.structs.replace(pinned, trust="verified"))
    return True


def _summary(messages: list[HistoryRecord], trust: list[TrustEntry]) -> HistorySummary:
    return HistorySummary(
        messages=len(messages),
        conversations=len({r.conversation for r in messages}),
        verified=sum(1 for t in trust if t.verified),
    )
