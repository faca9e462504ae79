"""Delivery receipts: "delivered" once the recipient's device has stored a message.

A receipt is an ordinary signed, end-to-end encrypted payload (kind
``receipt.delivered``) listing message ids, sent back by the receiving device
after a batch of messages; the server cannot tell it from a message. Only the
user a message was sent to can mark it delivered. Front ends turn receipts on
with :func:`enable` (the library alone sends none).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

import msgspec

from bastion.client._util import is_dm_conversation, now_ms
from bastion.client.events import Event, FeatureEvent, MessageEvent
from bastion.client.feature import ClientCore, FeatureSpec, Hooks
from bastion.client.records import DeviceEntry, HistoryRecord
from bastion.crypto.payload import Payload
from bastion.errors import BastionError, RejectedMessageError
from bastion.protocol import frames

KIND = "receipt.delivered"
ENABLED = "receipts.enabled"  # set in client.extensions by enable()
MAX_IDS = 256
log = logging.getLogger("bastion.client")


@dataclass(frozen=True)
class DeliveredEvent(FeatureEvent):
    """Messages this account sent were stored by the recipient's device."""

    peer: str
    ids: tuple[str, ...]
    at: int

    def to_json(self) -> dict[str, Any]:
        return {"type": "delivered", "from": self.peer, "ids": list(self.ids), "at": self.at}

    def describe(self) -> str:
        count = len(self.ids)
        return f"{self.peer} received {count} message{'s' if count != 1 else ''}"


class ReceiptBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The JSON body of a receipt."""

    ids: list[str]


def install(client: ClientCore, hooks: Hooks) -> None:
    """Understand receipts (always); sending them waits for :func:`enable`."""
    hooks.payloads.add(KIND, functools.partial(_on_receipt, client))

    async def after_batch(events: list[Event]) -> None:
        if client.extensions.get(ENABLED):
            await _send_receipts(client, events)

    hooks.on_batch.append(after_batch)


FEATURE = FeatureSpec("receipts", install)


def enable(client: ClientCore) -> None:
    """Send a receipt for each batch of direct messages this client receives."""
    client.extensions[ENABLED] = True


async def _send_receipts(client: ClientCore, events: list[Event]) -> None:
    by_sender: dict[str, list[str]] = {}
    for event in events:
        if not isinstance(event, MessageEvent):
            continue
        record = event.record
        if record.direction == "in" and is_dm_conversation(record.conversation):
            by_sender.setdefault(record.sender, []).append(record.id.hex())
    for sender, ids in by_sender.items():
        for start in range(0, len(ids), MAX_IDS):
            body = json.dumps({"ids": ids[start : start + MAX_IDS]})
            try:
                await client.send_payload(sender, KIND, body, history=False)
            except (BastionError, ValueError) as exc:
                # A receipt is a courtesy: its failure never stops receiving.
                log.info("receipt.not_sent", extra={"error": type(exc).__name__})


def _on_receipt(
    client: ClientCore, payload: Payload, sender: DeviceEntry, deliver: frames.Deliver
) -> Event | None:
    del sender, deliver
    if payload.sender == client.account.username:
        return None  # our own receipt, copied to our other devices
    try:
        body = msgspec.json.decode(payload.body, type=ReceiptBody)
    except msgspec.MsgspecError:
        raise RejectedMessageError("malformed receipt") from None
    if len(body.ids) > MAX_IDS:
        raise RejectedMessageError("malformed receipt")
    marked = []
    for hex_id in body.ids:
        try:
            message_id = bytes.fromhex(hex_id)
        except ValueError:
            raise RejectedMessageError("malformed receipt") from None
        record = client.profile.message(message_id, HistoryRecord)
        # Only the user a message went to can say it arrived.
        if record is None or record.direction != "out" or record.peer != payload.sender:
            continue
        if record.state == "sent":
            client.profile.update_message(
                message_id, msgspec.structs.replace(record, state="delivered")
            )
            marked.append(hex_id)
    if not marked:
        return None
    return DeliveredEvent(peer=payload.sender, ids=tuple(marked), at=now_ms())
