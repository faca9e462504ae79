"""Trust in contacts: safety numbers, marking verified, accepting a changed key.

States: ``unverified`` (trust on first use), ``verified`` (the user compared
safety numbers or completed a verification), ``changed`` (the server shows an
account key other than the pinned one: sending is refused and their messages
wait until the user accepts the new key, which makes the contact unverified).
While a change waits, the safety number made with the new key is shown, and
accepting takes that number (or the key's short fingerprint): exactly the key
the user compared is pinned, never whatever the server shows by then.
"""

from __future__ import annotations

import hashlib
import hmac

import msgspec

from bastion.client.feature import ClientCore
from bastion.client.records import ContactRecord
from bastion.crypto.safety import SafetyNumber, safety_number
from bastion.crypto.signing import signing_input
from bastion.errors import KeyChangedError, StateError

KEY_FINGERPRINT_CONTEXT = "bastion/v1/account-key-fingerprint"


async def pinned_contact(client: ClientCore, user: str) -> ContactRecord:
    """The contact record, fetching and pinning the key on first sight."""
    contact = client.contact(user)
    if contact is None:
        await client.devices_of(user)
        contact = client.contact(user)
    if contact is None:
        raise StateError(f"no key is known for {user}")
    return contact


async def safety_number_with(client: ClientCore, user: str) -> SafetyNumber:
    """The safety number of this account and ``user``'s pinned key.

    Raises :class:`KeyChangedError` while a changed key waits for a decision.
    """
    contact = await pinned_contact(client, user)
    if contact.trust == "changed":
        raise KeyChangedError(user)
    me = client.account.username
    return safety_number(me, client.identity().public_bytes, user, contact.identity_key)


def mark_verified(client: ClientCore, user: str, number: SafetyNumber) -> None:
    """Mark ``user`` verified, bound to the key the compared ``number`` was made from.

    Raises :class:`StateError` if the pinned key changed since the number was shown.
    """
    contact = client.contact(user)
    if contact is None or contact.trust in ("changed", "self"):
        raise StateError(f"{user} cannot be marked verified now")
    current = safety_number(
        client.account.username, client.identity().public_bytes, user, contact.identity_key
    )
    if current != number:
        raise StateError("the key changed since the safety number was shown; compare again")
    with client.profile.transaction():
        client.profile.put("contact:" + user, msgspec.structs.replace(contact, trust="verified"))


def key_fingerprint(identity_key: bytes) -> str:
    """A short fingerprint of an account key: 5 groups of 4 hex digits (80 bits)."""
    digest = hashlib.sha256(signing_input(KEY_FINGERPRINT_CONTEXT, [identity_key])).hexdigest()
    return "-".join(digest[i : i + 4] for i in range(0, 20, 4))


def pending_safety_number(client: ClientCore, user: str) -> SafetyNumber:
    """The safety number with the *new* key ``user`` shows, to compare before accepting it.

    Raises :class:`StateError` if no key change is waiting.
    """
    contact = client.contact(user)
    if contact is None or contact.trust != "changed" or contact.pending_key is None:
        raise StateError(f"no key change is waiting for {user}")
    me = client.account.username
    return safety_number(me, client.identity().public_bytes, user, contact.pending_key)


def _digits(text: str) -> str:
    return "".join(ch for ch in text if not ch.isspace() and ch != "-")


def accept_new_key(client: ClientCore, user: str, shown: str) -> ContactRecord:
    """Pin the new account key of ``user`` if it is the one ``shown`` stands for.

    ``shown`` is the safety number made with the new key (60 digits, spaces
    allowed) or the new key's short fingerprint (:func:`key_fingerprint`), as
    displayed to the user. The contact becomes unverified. Raises
    :class:`StateError` if no key change is pending or if ``shown`` does not
    match the key that would be pinned (the server showed another key since).
    """
    number = pending_safety_number(client, user)
    contact = client.contact(user)
    if contact is None or contact.pending_key is None:
        raise StateError(f"no key change is waiting for {user}")
    given = _digits(shown).lower()
    expected = (number.digits, _digits(key_fingerprint(contact.pending_key)))
    if not any(hmac.compare_digest(given, e) for e in expected):
        raise StateError(
            f"that is not the safety number (60 digits) or fingerprint (20 characters) of "
            f"the key {user} shows now; nothing was accepted. Run 'bastion verify {user}' "
            "to see the current one and compare it again"
        )
    updated = ContactRecord(user=user, identity_key=contact.pending_key, trust="unverified")
    with client.profile.transaction():
        client.profile.put("contact:" + user, updated)
    return updated
