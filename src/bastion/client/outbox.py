"""Messages kept until the server confirms them, and what a front end asks about them.

Every outgoing message is written to the profile's outbox before it is sent and
removed once the server answers: ``sent`` (stored on the server) or a refusal
(marked failed in the history, never resent). When the connection drops before
the answer, the message stays kept and :meth:`Client.connect` sends it again
with the same id, which the server stores once.
"""

from __future__ import annotations

import msgspec

from bastion.client.client import Client
from bastion.client.records import HistoryRecord
from bastion.protocol import frames


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
