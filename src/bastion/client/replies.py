"""Replies: a message that quotes an earlier one of the same conversation by its id.

A reply travels as a signed payload of kind ``reply`` whose body is the JSON
``{"reply_to": "<hex id>", "text": "..."}``; it goes into the history like a
text, with :attr:`~bastion.client.records.HistoryRecord.reply_to` set. Only the
id is carried and kept, never the quoted text: a front end looks the quoted
message up when it shows the reply, so a quote never outlives a deletion.
"""

from __future__ import annotations

import json
from typing import Annotated

import msgspec
from msgspec import Meta

from bastion.errors import RejectedMessageError

KIND = "reply"
MAX_TEXT_CHARS = 16_000

_HexId = Annotated[str, Meta(pattern=r"^[0-9a-f]{32}\Z")]


class ReplyBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The JSON body of a reply."""

    reply_to: _HexId
    text: Annotated[str, Meta(min_length=1, max_length=MAX_TEXT_CHARS)]


def encode(text: str, reply_to: bytes) -> str:
    """The payload body of a reply of ``text`` to the message ``reply_to``.

    Raises ValueError if it does not fit in a payload (the text's JSON escapes count).
    """
    body = json.dumps({"reply_to": reply_to.hex(), "text": text})
    if len(body) > MAX_TEXT_CHARS:
        raise ValueError("the reply is too long to send; shorten it")
    return body


def decode(body: str) -> tuple[str, bytes]:
    """(text, quoted id) of a reply's body; raises RejectedMessageError if malformed."""
    try:
        reply = msgspec.json.decode(body, type=ReplyBody)
    except msgspec.MsgspecError:
        raise RejectedMessageError("malformed reply") from None
    return reply.text, bytes.fromhex(reply.reply_to)


def parse_id(hex_id: str) -> bytes:
    """A message id given as 32 hexadecimal digits; raises ValueError saying so."""
    try:
        raw = bytes.fromhex(hex_id)
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise ValueError("a message id is 32 hexadecimal digits (see 'bastion history --json')")
    return raw
