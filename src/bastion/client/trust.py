"""Trust in contacts: safety numbers, marking verified, accepting a changed key.

States: ``unverified`` (trust on first use), ``verified`` (the user compared
safety numbers or completed a verification), ``changed`` (the server shows an
account key other than the pinned one: sending is refused and their messages
wait until the user accepts the new key, which makes the contact unverified).
"""

from __future__ import annotations

import msgspec

from bastion.client.client import Client
from bastion.client.records import ContactRecord
from bastion.crypto.safety import SafetyNumber, safety_number
from bastion.errors import KeyChangedError, StateError


async def pinned_contact(client: Client, user: str) -> ContactRecord:
    """The contact record, fetching and pinning the key on first sight."""
    contact = client.contact(user)
    if contact is None:
        await client.devices_of(user)
        contact = client.contact(user)
    if contact is None:
        raise StateError(f"no key is known for {user}")
    return contact


async def safety_number_with(client: Client, user: str) -> SafetyNumber:
    """The safety number of this account and ``user``'s pinned key.

    Raises :class:`KeyChangedError` while a changed key waits for a decision.
    """
    contact = await pinned_contact(client, user)
    if contact.trust == "changed":
        raise KeyChangedError(user)
    me = client.account.username
    return safety_number(me, client.identity().public_bytes, user, contact.identity_key)


def mark_verified(client: Client, user: str, number: SafetyNumber) -> None:
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


def accept_new_key(client: Client, user: str) -> ContactRecord:
    """Pin the new account key a contact now shows; the contact becomes unverified.

    Raises :class:`StateError` if no key change is pending.
    """
    contact = client.contact(user)
    if contact is None or contact.trust != "changed" or contact.pending_key is None:
        raise StateError(f"no key change is waiting for {user}")
    updated = ContactRecord(user=user, identity_key=contact.pending_key, trust="unverified")
    with client.profile.transaction():
        client.profile.put("contact:" + user, updated)
    return updated
