"""Messages kept until the server confirms them, and what a front end asks about them.

Every outgoing message is written to the profile's outbox before it is sent and
removed once the server answers: ``sent`` (stored on the server) or a refusal
(marked failed in the history, never resent). When the connection drops before
the answer, the message stays kept and :meth:`Client.connect` sends it again
with the same id, which the server stores once.

A text written while the server cannot be reached is **queued**
(:func:`queue_text`): it is in the history as ``queued``, encrypted at rest like
the rest of the profile, and not yet encrypted to anyone. :func:`send_queued`
(which ``stay_connected`` runs on every connection) encrypts and sends the
queued texts in the order they were written, to the devices the recipient has
then; one that cannot go out for good (refused, the recipient's key changed)
is marked failed, never sent to a key nobody reviewed.
"""

from __future__ import annotations

import secrets

import msgspec

from bastion.client._util import TRANSIENT_ERRORS, UNANSWERED, check_username, now_ms
from bastion.client.client import Client, SendRefusedError, check_text
from bastion.client.records import HistoryRecord
from bastion.crypto.payload import direct_conversation
from bastion.errors import KeyChangedError, SecurityError, ServerRefusedError
from bastion.protocol import frames

QUEUE = "outbox:queued"  # profile record: the queued messages, oldest first


class Queued(msgspec.Struct, frozen=True):
    """A message written while offline: its history id and recipient."""

    id: bytes
    to: str


def kept_messages(client: Client) -> list[HistoryRecord]:
    """Messages waiting for the server's confirmation, oldest first."""
    out = []
    for raw in client.profile.outgoing():
        frame = msgspec.msgpack.decode(raw, type=frames.Send)
        record = client.profile.message(frame.client_msg_id, HistoryRecord)
        if record is not None:
            out.append(record)
    return out


def is_kept(client: Client, message_id: bytes) -> bool:
    """Whether the message is still waiting for the server's confirmation."""
    return any(record.id == message_id for record in kept_messages(client))


def take_flushed(client: Client, to: str, text: str) -> HistoryRecord | None:
    """The kept copy of this very message that connecting just handed to the server.

    Someone whose ``send`` lost its connection runs the same command again; the
    kept copy went out when this connection opened, so sending a new one too
    would show the message twice at the receiver.
    """
    for record in client.flushed:
        if record.peer == to and record.text == text and record.state == "sent":
            client.flushed.remove(record)
            return record
    return None


def queue_text(
    client: Client, to: str, text: str, *, reply_to: bytes | None = None
) -> HistoryRecord:
    """Queue ``text`` for ``to`` while the server cannot be reached; returns its ``queued`` entry.

    ``reply_to`` quotes a message of the conversation (see :meth:`Client.send_text`).
    Raises ValueError for bad input (as :meth:`Client.send_text` does) and
    KeyChangedError if ``to``'s account key changed and was not reviewed.
    """
    check_username(to)
    check_text(text)
    me = client.account.username
    if to == me:
        raise ValueError("you cannot send a message to yourself")
    contact = client.contact(to)
    if contact is not None and contact.trust == "changed":
        raise KeyChangedError(to)
    if reply_to is not None:
        quoted = client.message(reply_to)
        if quoted is None or quoted.conversation != direct_conversation(me, to):
            raise ValueError(f"no message with this id in the conversation with {to}")
    record = HistoryRecord(
        id=secrets.token_bytes(16),
        sender=me,
        device=client.account.device_id,
        peer=to,
        conversation=direct_conversation(me, to),
        text=text,
        sent_at=now_ms(),
        server_ts=0,
        direction="out",
        state="queued",
        reply_to=reply_to,
    )
    with client.profile.transaction():
        client.profile.add_message(record.conversation, record.id, record)
        client.profile.put(QUEUE, [*_queue(client), Queued(id=record.id, to=to)])
    return record


def queued_messages(client: Client) -> list[HistoryRecord]:
    """Messages queued while offline and not sent yet, oldest first."""
    out = []
    for item in _queue(client):
        record = client.message(item.id)
        if record is not None:
            out.append(record)
    return out


async def send_queued(client: Client) -> tuple[list[HistoryRecord], list[HistoryRecord]]:
    """Encrypt and send the queued messages in order; returns (sent, failed).

    Stops at the first one that cannot go out for now (a transient refusal: the
    connection dropped, the server is busy): it and the rest stay queued for the next connection,
    except one whose answer was lost, which is kept in the outbox and goes out
    from there (once). Raises what sending raises beyond those (ProfileError...).
    """
    sent: list[HistoryRecord] = []
    failed: list[HistoryRecord] = []
    for item in _queue(client):
        record = client.message(item.id)
        if record is None:
            _dequeue(client, item.id)
            continue
        try:
            sent.append(
                await client.send_text(
                    item.to, record.text, message_id=item.id, reply_to=record.reply_to
                )
            )
        except SendRefusedError as exc:
            failed.append(exc.record)  # refused for good, and marked so
        except ServerRefusedError as exc:
            if exc.code in TRANSIENT_ERRORS:
                if exc.code in UNANSWERED and is_kept(client, item.id):
                    _dequeue(client, item.id)  # encrypted and kept: the outbox sends it
                return sent, failed
            failed.append(_mark_failed(client, record, exc.message))  # no such user, say
        except (SecurityError, ValueError) as exc:
            failed.append(_mark_failed(client, record, str(exc)))
        _dequeue(client, item.id)
    return sent, failed


def _queue(client: Client) -> list[Queued]:
    return client.profile.get(QUEUE, list[Queued]) or []


def _dequeue(client: Client, message_id: bytes) -> None:
    with client.profile.transaction():
        client.profile.put(QUEUE, [q for q in _queue(client) if q.id != message_id])


def _mark_failed(client: Client, record: HistoryRecord, reason: str) -> HistoryRecord:
    failed = msgspec.structs.replace(record, state="failed", reason=reason)
    with client.profile.transaction():
        client.profile.update_message(record.id, failed)
    return failed
