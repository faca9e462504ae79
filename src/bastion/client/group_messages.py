"""Group messages on the client: room keys over Olm, Megolm messages, and what receivers check.

A room key goes over Olm to exactly the devices checked against the verified
chain (:func:`send_body`). Every message and room key names the sender's chain
head; a receiver that is behind fetches and verifies before it accepts, and a
fork or a head it cannot reach is refused and stops sending to the group
(DESIGN §5, :mod:`bastion.client.group_heads`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import msgspec

from bastion.client import group_heads, group_keys
from bastion.client._util import TRANSIENT_ERRORS, now_ms
from bastion.client.device_list import certified_device
from bastion.client.events import DevicesChangedEvent, Event, MessageEvent, WarningEvent
from bastion.client.feature import ClientCore, FeatureSpec, Hooks
from bastion.client.group_state import (
    MAX_INBOUND_PER_DEVICE,
    MAX_UNKNOWN_GROUP_KEYS,
    MAX_UNKNOWN_GROUP_KEYS_PER_SENDER,
    UNKNOWN_KEYS,
    GroupWarningEvent,
    InboundSessions,
    _compare_members,
    _inbound_name,
    _record_fork,
    _warning,
    chain_hashes,
    conversation,
    settle_fork,
    state_of,
    sync,
)
from bastion.client.records import ContactRecord, DeviceEntry, HistoryRecord
from bastion.crypto.payload import Payload
from bastion.errors import FrameError, RejectedMessageError, ServerRefusedError, StateError
from bastion.groups import chain
from bastion.protocol import frames


async def _member_devices(
    client: ClientCore, group_id: bytes, user: str, key: bytes
) -> tuple[list[DeviceEntry], list[Event]]:
    """``user``'s devices certified by ``key`` (the verified state's key), and warnings."""
    reply = await client.request(frames.QueryKeys(req=0, user=user))
    if not isinstance(reply, frames.KeysResult) or reply.user != user:
        raise RejectedMessageError("the server answered a key query for someone else")
    contact = client.contact(user)
    if contact is None:
        # First sight of this member: pin the key the verified chain names, never the server's.
        contact = ContactRecord(user=user, identity_key=key)
        with client.profile.transaction():
            client.profile.put("contact:" + user, contact)
    if not hmac.compare_digest(contact.identity_key, key):
        return [], [_warning(group_id, f"{user}'s account key is not the group's; no key shared")]
    if not hmac.compare_digest(reply.identity_key, key):
        if user != client.account.username and contact.trust != "changed":
            changed = msgspec.structs.replace(
                contact, trust="changed", pending_key=reply.identity_key
            )
            with client.profile.transaction():
                client.profile.put("contact:" + user, changed)
        return [], [
            _warning(
                group_id,
                f"the server shows another account key for {user} than the group's; no key shared",
            )
        ]
    if contact.trust == "changed":
        return [], [_warning(group_id, f"{user}'s account key changed; no key shared")]
    devices: list[DeviceEntry] = []
    events: list[Event] = []
    for d in reply.devices:
        entry = certified_device(user, key, d)
        if entry is None:
            events.append(
                _warning(
                    group_id,
                    f"device {d.device_id} listed for {user} has no valid certificate;"
                    " no key shared with it",
                )
            )
        else:
            devices.append(entry)
    if devices != contact.devices:
        before = {d.device_id for d in contact.devices}
        after = {d.device_id for d in devices}
        if contact.devices and before != after:
            client.notify(
                DevicesChangedEvent(
                    user=user,
                    added=tuple(sorted(after - before)),
                    removed=tuple(sorted(before - after)),
                    at=now_ms(),
                )
            )
        with client.profile.transaction():
            client.profile.put("contact:" + user, msgspec.structs.replace(contact, devices=devices))
    return devices, events


def _outbound_name(group_id: bytes) -> str:
    return "group-out:" + group_id.hex()


async def send_text(
    client: ClientCore,
    group: chain.GroupState,
    text: str,
    *,
    now: int | None = None,
    rotate_after_messages: int = group_keys.ROTATE_AFTER_MESSAGES,
) -> HistoryRecord:
    """Encrypt ``text`` once for the group and post it (see :func:`send_body`)."""
    return await send_body(
        client, group, text, now=now, rotate_after_messages=rotate_after_messages
    )


async def send_body(
    client: ClientCore,
    group: chain.GroupState,
    text: str,
    *,
    kind: str = "text",
    now: int | None = None,
    rotate_after_messages: int = group_keys.ROTATE_AFTER_MESSAGES,
) -> HistoryRecord:
    """Encrypt ``text`` once for the group and post it; the server fans it out.

    The room key goes over Olm to every certified device of every member of the
    verified state that lacks it, encrypted to exactly the devices checked
    against the chain (no second key-directory lookup); the session is replaced
    first when a member or device is gone, or after ``rotate_after_messages``
    messages or 7 days. The message and the room key name this client's chain
    head. Warnings about the server's member list or uncertified devices go to
    the client's notices. Raises ValueError, StateError (not a member; or the chain
    is forked, or could not be verified to the head announced: sending stops,
    fail closed), ServerRefusedError.
    """
    if not text or len(text) > 16_000:
        raise ValueError("a message has 1 to 16,000 characters")
    group_id = group.group_id
    client.notify(*await sync(client, group_id))
    client.notify(*await settle_fork(client, group_id))
    state = state_of(client, group_id)
    me = client.account.username
    if state is None or me not in state.members:
        raise StateError("you are not a member of this group")
    blocked = group_heads.send_blocker(
        group_heads.status_of(client, group_id), state.seq, state.members
    )
    if blocked is not None:
        raise StateError(blocked)
    at = now_ms() if now is None else now
    checked: dict[str, list[DeviceEntry]] = {}
    for user in sorted(state.members):
        devices, warnings = await _member_devices(client, group_id, user, state.members[user])
        client.notify(*warnings)
        found = [d for d in devices if d.device_id != client.account.device_id]
        if found:
            checked[user] = found
    targets = {user: [d.device_id for d in found] for user, found in checked.items()}
    key = client.profile.pickle_key
    out = client.profile.get(_outbound_name(group_id), group_keys.OutboundSession)
    gone = out is not None and any(
        device not in targets.get(user, []) for user, ids in out.shared.items() for device in ids
    )
    if (
        out is None
        or gone
        or group_keys.needs_rotation(out, at, max_messages=rotate_after_messages)
    ):
        out = group_keys.new_outbound(group_id, key, at)
    room_key = group_keys.room_key(out, key, chain_seq=state.seq, chain_hash=state.state_hash)
    await _share_room_key(client, group_id, out, checked, msgspec.json.encode(room_key).decode())
    message_id = secrets.token_bytes(16)
    plaintext = group_keys.GroupPlaintext(
        group_id=group_id,
        sender=me,
        sender_device=client.account.device_id,
        message_id=message_id,
        sent_at=at,
        body=text,
        kind=kind,
        chain_seq=state.seq,
        chain_hash=state.state_hash,
    )
    with client.profile.transaction():
        device = client.device()  # the device key signs the plaintext
        out, ciphertext = group_keys.encrypt(out, plaintext, device.sign, key)
        client.profile.put(_outbound_name(group_id), out)  # index used: never again
    reply = await client.request(
        frames.GroupSend(req=0, group_id=group_id, client_msg_id=message_id, ciphertext=ciphertext),
    )
    server_ts = reply.server_ts if isinstance(reply, frames.GroupSent) else at
    if isinstance(reply, frames.GroupSent):
        client.notify(*_compare_members(group_id, state, reply.members, reply.invited))
    record = HistoryRecord(
        id=message_id,
        sender=me,
        device=client.account.device_id,
        peer=conversation(group_id),
        conversation=conversation(group_id),
        text=text,
        sent_at=at,
        server_ts=server_ts,
        direction="out",
        state="sent",
    )
    if kind == "text":
        with client.profile.transaction():
            client.profile.add_message(record.conversation, message_id, record)
    client.extensions["groups.last_ciphertext"] = ciphertext
    return record


async def _share_room_key(
    client: ClientCore,
    group_id: bytes,
    out: group_keys.OutboundSession,
    checked: dict[str, list[DeviceEntry]],
    room_key: str,
) -> None:
    """Send ``room_key`` over Olm to exactly the ``checked`` devices that lack it.

    Each send goes to one member's checked devices and carries a copy for each of
    our own checked other devices (the server wants every send to reach them),
    so a newly linked device of ours gets the key with the next send; when only
    our own devices lack it, one member who has it already is sent it again.
    Records in ``out.shared`` who got it; a refused send leaves a warning and
    that member without the key (they are asked again with the next message).
    """
    me = client.account.username
    mine = checked.get(me, [])
    ids = {user: [d.device_id for d in found] for user, found in checked.items()}
    lacking = [
        user
        for user in sorted(checked)
        if user != me and not set(ids[user]) <= set(out.shared.get(user, []))
    ]
    if not lacking and not set(ids.get(me, [])) <= set(out.shared.get(me, [])):
        lacking = [user for user in sorted(checked) if user != me][:1]
    for user in lacking:
        try:
            await client.send_payload_to_devices(
                user, checked[user], mine, group_keys.ROOM_KEY_KIND, room_key, group_id=group_id
            )
        except ServerRefusedError as exc:
            if exc.code in TRANSIENT_ERRORS:
                raise
            if exc.code == "not_joined":
                continue  # invited, not joined yet: gets the key with a message after joining
            client.notify(
                _warning(group_id, f"the room key could not be shared with {user}: {exc.code}")
            )
            continue
        out.shared[user] = ids[user]
        if mine:
            out.shared[me] = ids[me]


def history(
    client: ClientCore, group: chain.GroupState, *, limit: int = 1000
) -> list[HistoryRecord]:
    """The group's conversation from the local encrypted store, oldest first."""
    return client.profile.history(conversation(group.group_id), HistoryRecord, limit=limit)


def on_room_key(
    client: ClientCore, payload: Payload, sender: DeviceEntry, deliver: frames.Deliver
) -> Event | None:
    """Store a room key received over Olm, filed under the device that sent it.

    The key names the sharer's chain head: a head ahead of ours is remembered
    (sending stops until this client verifies that far), another hash at a
    position we hold is a fork (reported; sending stops). Keys for groups this
    device does not know yet are capped in number, overall and per sender.
    """
    del sender, deliver
    try:
        key = msgspec.json.decode(payload.body, type=group_keys.RoomKey)
        group_id = bytes.fromhex(key.group_id)
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError):
        raise RejectedMessageError("malformed room key") from None
    if len(group_id) != chain.GROUP_ID_BYTES:
        raise RejectedMessageError("malformed room key")
    name = _inbound_name(group_id, payload.sender, payload.sender_device)
    held = client.profile.get(name, InboundSessions) or InboundSessions(sessions=[])
    if any(s.session_id == key.session_id for s in held.sessions):
        return None  # already held: never reset what was seen of it
    event: Event | None = None
    hashes = chain_hashes(client, group_id)
    if not hashes:
        _hold_unknown_key(client, name, payload.sender)
    elif group_heads.mismatch(hashes, key.chain_seq, bytes.fromhex(key.chain_hash)):
        event = _record_fork(
            client, group_id, key.chain_seq, bytes.fromhex(key.chain_hash), payload.sender
        )
    elif key.chain_seq >= len(hashes):
        group_heads.announce(client, group_id, payload.sender, key.chain_seq)
    else:
        event = _converged(client, group_id, payload.sender, key.chain_seq)
    inbound = group_keys.import_room_key(
        key,
        group_id=group_id,
        sender=payload.sender,
        sender_device=payload.sender_device,
        pickle_key=client.profile.pickle_key,
    )
    sessions = [*held.sessions, inbound][-MAX_INBOUND_PER_DEVICE:]
    client.profile.put(name, InboundSessions(sessions=sessions))
    return event


def _hold_unknown_key(client: ClientCore, name: str, sender: str) -> None:
    """Count a room-key record for a group not known yet; raise when the caps are reached."""
    held = client.profile.get(UNKNOWN_KEYS, list[str]) or []
    if name in held:
        return
    from_sender = sum(1 for n in held if n.split(":")[2] == sender)
    if len(held) >= MAX_UNKNOWN_GROUP_KEYS or from_sender >= MAX_UNKNOWN_GROUP_KEYS_PER_SENDER:
        raise RejectedMessageError("too many room keys for groups this device does not know")
    client.profile.put(UNKNOWN_KEYS, [*held, name])


async def on_deliver(client: ClientCore, hooks: Hooks, deliver: frames.Deliver) -> Event | None:
    """Handle a group envelope: a chain notice (sync), a message (decrypt and check), or
    another item for the feature that registered it in ``hooks`` (an invitation)."""
    seen = f"{deliver.seq}:{hashlib.sha256(deliver.body).hexdigest()[:32]}"
    if client.profile.seen("group-env", seen):
        return None
    try:
        item = frames.decode_item(deliver.body)
    except FrameError:
        event: Event | None = WarningEvent(
            "malformed group envelope", deliver.sender, deliver.sender_device, deliver.server_ts
        )
    else:
        if isinstance(item, frames.GroupChangeItem):
            try:
                if state_of(client, item.group_id) is not None:
                    group_heads.announce(client, item.group_id, group_heads.SERVER, item.seq)
                client.notify(*await _sync_or_reject(client, item.group_id))
                event = None
            except RejectedMessageError as exc:
                event = _warning(item.group_id, exc.reason)
        elif isinstance(item, frames.GroupMessageItem):
            event = await _receive_message(client, hooks, deliver, item)
        else:
            handler = hooks.group_items.get(type(item))
            event = (
                handler(deliver, item)
                if handler is not None
                else WarningEvent(
                    "group envelope of a kind this client does not handle",
                    deliver.sender,
                    deliver.sender_device,
                    deliver.server_ts,
                )
            )
    with client.profile.transaction():
        client.profile.mark_seen("group-env", seen)
    return event


async def _sync_or_reject(client: ClientCore, group_id: bytes) -> list[Event]:
    try:
        return await sync(client, group_id)
    except ServerRefusedError as exc:
        if exc.code in TRANSIENT_ERRORS:
            raise  # not acknowledged: delivered again on the next connection
        raise RejectedMessageError(f"the server refused the group's chain: {exc.code}") from None


async def _receive_message(
    client: ClientCore, hooks: Hooks, deliver: frames.Deliver, item: frames.GroupMessageItem
) -> Event | None:
    group_id = item.group_id
    try:
        state = state_of(client, group_id)
        if state is None or deliver.sender not in state.members:
            client.notify(*await _sync_or_reject(client, group_id))
            state = state_of(client, group_id)
        if state is None or deliver.sender not in state.members:
            raise RejectedMessageError("group message from someone who is not a member")
        devices, _ = await _member_devices(
            client, group_id, deliver.sender, state.members[deliver.sender]
        )
        sender = next((d for d in devices if d.device_id == deliver.sender_device), None)
        if sender is None:
            raise RejectedMessageError("sender device has no valid certificate")
        name = _inbound_name(item.group_id, deliver.sender, deliver.sender_device)
        held = client.profile.get(name, InboundSessions)
        if held is None or not held.sessions:
            raise RejectedMessageError("no room key from that device for this group")
        position, advanced, plaintext = _decrypt_any(held, deliver, item, sender, client)
        await _check_head(client, group_id, plaintext)
        state = state_of(client, group_id)
        if state is None or plaintext.sender not in state.members:
            raise RejectedMessageError("group message from someone who is not a member")
        return _accept(
            client,
            hooks,
            deliver,
            item,
            held=held,
            position=position,
            advanced=advanced,
            plaintext=plaintext,
        )
    except RejectedMessageError as exc:
        return WarningEvent(exc.reason, deliver.sender, deliver.sender_device, deliver.server_ts)


async def _check_head(
    client: ClientCore, group_id: bytes, plaintext: group_keys.GroupPlaintext
) -> None:
    """Accept a message only from a chain head this client verified; raises RejectedMessageError.

    A head ahead of ours makes this client fetch and verify first; a head it
    cannot reach, or another hash at a position it holds (a fork, reported), is
    refused, and sending to the group stops until that is resolved.
    """
    who, seq = plaintext.sender, plaintext.chain_seq
    if seq >= len(chain_hashes(client, group_id)):
        group_heads.announce(client, group_id, who, seq)
        client.notify(*await _sync_or_reject(client, group_id))
    hashes = chain_hashes(client, group_id)
    if seq >= len(hashes):
        raise RejectedMessageError(
            f"{who} wrote from position {seq} of the group's chain, which this client could"
            f" not verify (it holds {len(hashes) - 1}); sending to the group is stopped"
        )
    if group_heads.mismatch(hashes, seq, plaintext.chain_hash):
        client.notify(_record_fork(client, group_id, seq, plaintext.chain_hash, who))
        client.notify(*await settle_fork(client, group_id))
        if group_heads.mismatch(chain_hashes(client, group_id), seq, plaintext.chain_hash):
            raise RejectedMessageError(
                f"{who} wrote from another branch of the group's chain (a fork at position"
                f" {seq}); the message is refused"
            )
    else:
        settled = _converged(client, group_id, who, seq)
        if settled is not None:
            client.notify(settled)


def _converged(client: ClientCore, group_id: bytes, who: str, seq: int) -> GroupWarningEvent | None:
    """Clear a fork once the member who named the other branch names ours at or past it."""
    status = group_heads.status_of(client, group_id)
    if status.fork is None or status.fork.by != who or seq < status.fork.seq:
        return None
    status.fork = None
    group_heads.save_status(client, group_id, status)
    return _warning(group_id, f"fork settled: {who} now follows the same chain as this client")


def _accept(
    client: ClientCore,
    hooks: Hooks,
    deliver: frames.Deliver,
    item: frames.GroupMessageItem,
    *,
    held: InboundSessions,
    position: int,
    advanced: group_keys.InboundSession,
    plaintext: group_keys.GroupPlaintext,
) -> Event | None:
    name = _inbound_name(item.group_id, deliver.sender, deliver.sender_device)
    replay_key = plaintext.sender + "\0" + plaintext.message_id.hex()
    if client.profile.seen("group-msg", replay_key):
        raise RejectedMessageError("replayed group message")
    handler = None
    if plaintext.kind != "text":
        handler = hooks.group_payloads.get(plaintext.kind)
        if handler is None:
            raise RejectedMessageError(f"unknown group message kind {plaintext.kind!r}")
    record = HistoryRecord(
        id=plaintext.message_id,
        sender=plaintext.sender,
        device=plaintext.sender_device,
        peer=conversation(item.group_id),
        conversation=conversation(item.group_id),
        text=plaintext.body,
        sent_at=plaintext.sent_at,
        server_ts=deliver.server_ts,
        direction="out" if plaintext.sender == client.account.username else "in",
        state="received",
    )
    sessions = list(held.sessions)
    sessions[position] = advanced
    with client.profile.transaction():
        client.profile.put(name, InboundSessions(sessions=sessions))
        client.profile.mark_seen("group-msg", replay_key)
        if handler is not None:
            # Everything was checked; the handler may write to the profile (same transaction).
            return handler(plaintext, deliver)
        client.profile.add_message(record.conversation, record.id, record)
    contact = client.contact(plaintext.sender)
    return MessageEvent(record=record, verified=contact is not None and contact.trust == "verified")


def _decrypt_any(
    held: InboundSessions,
    deliver: frames.Deliver,
    item: frames.GroupMessageItem,
    sender: DeviceEntry,
    client: ClientCore,
) -> tuple[int, group_keys.InboundSession, group_keys.GroupPlaintext]:
    undecryptable = "group message could not be decrypted"
    error = RejectedMessageError(undecryptable)
    for position, inbound in enumerate(held.sessions):
        try:
            advanced, plaintext = group_keys.decrypt(
                inbound,
                item.ciphertext,
                group_id=item.group_id,
                sender=deliver.sender,
                sender_device=deliver.sender_device,
                sender_ed25519=sender.ed25519,
                pickle_key=client.profile.pickle_key,
            )
        except RejectedMessageError as exc:
            if exc.reason != undecryptable:
                error = exc
            continue
        return position, advanced, plaintext
    raise error


def install(client: ClientCore, hooks: Hooks) -> None:
    """Register the group handlers for ``client``: room keys over Olm, group envelopes."""
    hooks.payloads.add(group_keys.ROOM_KEY_KIND, lambda p, s, d: on_room_key(client, p, s, d))

    async def deliver(frame: frames.Deliver) -> Event | None:
        return await on_deliver(client, hooks, frame)

    hooks.envelopes.add(frames.GROUP_KIND, deliver)


FEATURE = FeatureSpec("groups", install)
