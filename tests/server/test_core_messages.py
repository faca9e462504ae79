"""The rule every store applies to a message before storing it, without a store.

The contract suite (test_store_contract.py) runs the same cases through SQLite and
PostgreSQL; this table pins the order of the refusals and what each check needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from bastion.errors import StorageError
from bastion.server.core.messages import (
    DeviceMismatchError,
    NotContactsError,
    QueueFullError,
    UnknownRecipientError,
    check_copies,
)
from bastion.server.storage import interfaces


@dataclass(frozen=True)
class To:
    user: str
    device_id: str


ALICE_PHONE = To("alice", "phone")  # the sender's device
ALICE_LAPTOP = To("alice", "laptop")
BOB_PHONE = To("bob", "phone")
BOB_LAPTOP = To("bob", "laptop")
RIGHT = (BOB_PHONE, BOB_LAPTOP, ALICE_LAPTOP)


@dataclass(frozen=True)
class Facts:
    """What the store's transaction sees, with the defaults of a message that passes."""

    copies: tuple[To, ...] = RIGHT
    recipient_devices: tuple[str, ...] = ("laptop", "phone")
    contacts_only: bool = True
    contacts: bool = True
    queue_max: int | None = 10
    queued: int = 9


def check(facts: Facts) -> tuple[StorageError | None, list[str]]:
    """The refusal, and which of the costly facts the rule asked for."""
    asked: list[str] = []

    def are_contacts() -> bool:
        asked.append("contacts")
        return facts.contacts

    def queued() -> int:
        asked.append("queued")
        return facts.queued

    refusal = check_copies(
        facts.copies,
        sender="alice",
        sender_device="phone",
        sender_devices=("laptop", "phone"),
        recipient="bob",
        recipient_devices=facts.recipient_devices,
        contacts_only=facts.contacts_only,
        are_contacts=are_contacts,
        queue_max=facts.queue_max,
        queued=queued,
    )
    return refusal, asked


CASES: list[tuple[str, Facts, type[StorageError] | None, list[str]]] = [
    ("one copy per device passes", Facts(), None, ["contacts", "queued"]),
    ("without contacts_only the pair is not asked", Facts(contacts_only=False), None, ["queued"]),
    ("without a queue limit the queue is not counted", Facts(queue_max=None), None, ["contacts"]),
    ("copies in another order pass", Facts(copies=RIGHT[::-1]), None, ["contacts", "queued"]),
    (
        "an unknown recipient comes first and asks nothing",
        Facts(recipient_devices=(), contacts=False, copies=(), queued=99),
        UnknownRecipientError,
        [],
    ),
    (
        "not contacts comes before the devices: a stranger learns nothing of them",
        Facts(contacts=False, copies=(BOB_PHONE,), queued=99),
        NotContactsError,
        ["contacts"],
    ),
    (
        "a missing device of the recipient",
        Facts(copies=(BOB_PHONE, ALICE_LAPTOP)),
        DeviceMismatchError,
        ["contacts"],
    ),
    (
        "a missing other device of the sender",
        Facts(copies=(BOB_PHONE, BOB_LAPTOP)),
        DeviceMismatchError,
        ["contacts"],
    ),
    (
        "a copy to the sending device itself is extra",
        Facts(copies=(*RIGHT, ALICE_PHONE)),
        DeviceMismatchError,
        ["contacts"],
    ),
    (
        "a device twice is refused even when the set is right",
        Facts(copies=(*RIGHT, BOB_PHONE)),
        DeviceMismatchError,
        ["contacts"],
    ),
    (
        "the device check comes before the queue",
        Facts(copies=(BOB_PHONE,), queued=10),
        DeviceMismatchError,
        ["contacts"],
    ),
    ("a full queue comes last", Facts(queued=10), QueueFullError, ["contacts", "queued"]),
    ("a queue over its limit is full", Facts(queued=11), QueueFullError, ["contacts", "queued"]),
]


@pytest.mark.parametrize(
    ("facts", "refusal", "asked"), [pytest.param(*case[1:], id=case[0]) for case in CASES]
)
def test_case(facts: Facts, refusal: type[StorageError] | None, asked: list[str]) -> None:
    got, asked_for = check(facts)
    assert (type(got) if got is not None else None, asked_for) == (refusal, asked)


def test_a_mismatch_names_the_missing_and_the_extra_devices() -> None:
    refusal, _ = check(Facts(copies=(BOB_PHONE, To("bob", "tablet"), ALICE_PHONE)))
    assert isinstance(refusal, DeviceMismatchError)
    assert (refusal.missing, refusal.extra) == (
        ["alice/laptop", "bob/laptop"],
        ["alice/phone", "bob/tablet"],
    )


def test_the_refusals_are_the_ones_the_storage_interface_names() -> None:
    # Code that catches them through the storage interface keeps working.
    assert interfaces.DeviceMismatchError is DeviceMismatchError
    assert interfaces.NotContactsError is NotContactsError
    assert interfaces.QueueFullError is QueueFullError
    assert interfaces.UnknownRecipientError is UnknownRecipientError
