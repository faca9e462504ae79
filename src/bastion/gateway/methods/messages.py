"""Messages and the gateway itself: send, history, search, outbox, whoami, status, subscribe."""

from __future__ import annotations

from typing import Any

from bastion.cli._common import OFFLINE_CODES, found_json, message_json, refusal_json, sent_json
from bastion.client import HistoryRecord, SendRefusedError, outbox, search
from bastion.errors import ServerRefusedError
from bastion.gateway.context import GatewayContext
from bastion.gateway.methods._base import ContextMethod
from bastion.gateway.rpc import MethodError, Session


def refused(record: HistoryRecord) -> MethodError:
    """The error of a send the server refused; the message shows as not sent in history."""
    refusal = refusal_json(record)
    return MethodError("refused", f"not sent: the server refused it: {refusal['reason']}", refusal)


async def send(ctx: GatewayContext, session: Session, params: dict[str, Any]) -> dict[str, Any]:
    """Send a text to a user: stored on the server now, or queued while it cannot be reached.

    Sends go out in the order they were made: while anything is queued, a new
    one is queued behind it and the queue is sent (when online) before answering.
    """
    client = ctx.client
    to, text = params["to"], params["text"]
    async with ctx.send_lock:
        if not ctx.online or outbox.queued_messages(client):
            record = outbox.queue_text(client, to, text)
            if not ctx.online:
                return sent_json(record)
            await outbox.send_queued(client)
            record = client.message(record.id) or record
        else:
            try:
                record = await client.send_text(to, text)
            except SendRefusedError as exc:
                raise refused(exc.record) from exc
            except ServerRefusedError as exc:
                if exc.code not in OFFLINE_CODES:
                    raise
                kept = [r for r in outbox.kept_messages(client) if r.peer == to and r.text == text]
                # Kept (encrypted, the answer lost): it goes out again on reconnect, once.
                record = kept[-1] if kept else outbox.queue_text(client, to, text)
    if record.state == "failed":
        raise refused(record)
    return sent_json(record)


async def history(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """A direct conversation from the encrypted local store, oldest first."""
    client = ctx.client
    user = params["user"]
    contact = client.contact(user)
    verified = contact is not None and contact.trust == "verified"
    records = client.history(user, limit=params.get("limit", 1000))
    return [message_json(r, verified) for r in records]


async def search_messages(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """Messages of every conversation whose text holds ``text`` (ignoring case), newest first.

    Searched in the encrypted local store of this device only; each message
    names its conversation. At most ``limit`` (default 50).
    """
    client = ctx.client
    records = search.messages(
        client, params["text"], limit=params.get("limit", search.DEFAULT_LIMIT)
    )
    return [found_json(client, r) for r in records]


async def outbox_list(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """Messages kept until the server confirms them, then those queued while offline."""
    client = ctx.client
    records = [*outbox.kept_messages(client), *outbox.queued_messages(client)]
    return [message_json(r, verified=False) for r in records]


async def message(ctx: GatewayContext, session: Session, params: dict[str, Any]) -> dict[str, Any]:
    """One message of the local history by id, in its latest state (queued, sent, delivered...)."""
    try:
        message_id = bytes.fromhex(params["id"])
    except ValueError:
        raise ValueError("the id is 32 hexadecimal digits") from None
    record = ctx.client.message(message_id)
    if record is None:
        raise MethodError("not_found", "no message with this id on this device")
    return message_json(record, verified=False)


async def whoami(ctx: GatewayContext, session: Session, params: dict[str, Any]) -> dict[str, Any]:
    """This profile's account, as ``bastion whoami --json``."""
    client = ctx.client
    a = client.account
    return {
        "type": "whoami",
        "user": a.username,
        "device": a.device_id,
        "server": a.server_url,
        "fingerprint": a.fingerprint,
        "rejected_messages": client.stats().rejected,
    }


async def status(ctx: GatewayContext, session: Session, params: dict[str, Any]) -> dict[str, Any]:
    """The gateway's state: account, connection, queue lengths, subscribers."""
    return ctx.status()


async def subscribe(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Send live events to this front end as ``event`` notifications from now on."""
    session.subscribe(True)
    return {"type": "subscribed", "connection": ctx.connection}


async def unsubscribe(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Stop the live events."""
    session.subscribe(False)
    return {"type": "unsubscribed"}


METHODS: dict[str, ContextMethod] = {
    "send": send,
    "history": history,
    "search": search_messages,
    "outbox": outbox_list,
    "message": message,
    "whoami": whoami,
    "status": status,
    "subscribe": subscribe,
    "unsubscribe": unsubscribe,
}
