"""Several devices per account: list, link through a one-time code, revoke, export, import.

Linking: the existing device opens a slot and shows a code; the new device
sends its keys sealed under the code; the existing device answers with the
account key sealed likewise; the new device certifies itself and joins. The
server only pairs the two connections (see :mod:`bastion.crypto.linking`).
If asked, the existing device sends its history and the trust in its contacts
first, in pieces sealed likewise (:mod:`bastion.client.link_history`).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from bastion.client import device_list, link_history
from bastion.client._default import Client
from bastion.client._util import check_username, now_ms
from bastion.client.feature import ClientCore
from bastion.client.link_history import NO_HISTORY, HistoryChoice, HistorySummary
from bastion.client.profile import Profile
from bastion.client.records import DeviceEntry
from bastion.client.transport import ServerConnection, _Closed
from bastion.crypto import linking
from bastion.crypto.atrest import SALT_BYTES, KdfParams, SecretBox, derive_master_key
from bastion.crypto.device import device_id_for, sign_revocation
from bastion.crypto.olm import OlmDevice
from bastion.crypto.signing import AccountIdentity
from bastion.errors import (
    AuthenticationError,
    ProfileError,
    ServerRefusedError,
    StateError,
    UntrustedServerError,
)
from bastion.protocol import frames

LINK_WAIT_S = 600.0
EXPORT_AAD = b"bastion/v1/account-export"


LINK_ABANDONED = (
    "the device that showed this code is no longer waiting; "
    "run 'bastion devices link' again on it and use the new code"
)


@dataclass(frozen=True, slots=True)
class LinkedDevice:
    """The device that joined through a link, and what it was sent."""

    device_id: str
    history: HistorySummary = field(default_factory=HistorySummary)


async def list_devices(client: ClientCore) -> list[DeviceEntry]:
    """This account's certified devices, as the server lists them and the account key signs."""
    return await client.devices_of(client.account.username)


async def offer_link(
    client: ClientCore,
    show_code: Callable[[str], Awaitable[None] | None],
    *,
    history: HistoryChoice = NO_HISTORY,
    wait_s: float = LINK_WAIT_S,
) -> LinkedDevice:
    """Open a link slot, show the code, and hand the account key to the device that answers.

    With ``history`` (all, or the last N days) the 1:1 history and the trust in
    contacts go first, sealed under the code; by default nothing but the grant.
    ``client`` must be connected. Raises ValueError if the history is too large
    (before any code is shown), ServerRefusedError or TimeoutError.
    """
    # Gathered before the code exists, so a history too large to send is said at once.
    bundle, summary = link_history.build(client, history, now=now_ms())
    conn = client.connection()
    code = linking.new_code()
    slot, key = linking.slot_and_key(linking.parse_code(code))
    answered = conn.link_push(slot)  # a receive loop running meanwhile does not take it
    req = conn.next_req()
    await conn.request(frames.LinkOpen(req=req, slot=slot), req)
    shown = show_code(code)
    if shown is not None:
        await shown
    push = await asyncio.wait_for(answered, wait_s)
    request = linking.open_request(key, slot, push.blob)
    new_id = device_id_for(request.ed25519, request.curve25519)
    # The signed list names the new device before it joins, so no contact ever sees
    # it served without being listed; this device knows of it and will not warn.
    await device_list.update_own_list(client, add=[new_id])
    _remember_own_devices(
        client,
        add=DeviceEntry(
            device_id=new_id,
            ed25519=request.ed25519,
            curve25519=request.curve25519,
            created_at=request.created_at,
        ),
    )
    parts = link_history.pieces(bundle)
    for index, part in enumerate(parts):
        req = conn.next_req()
        sealed = linking.seal_piece(key, slot, index, len(parts), part)
        await conn.request(frames.LinkMore(req=req, slot=slot, blob=sealed), req)
    grant = linking.LinkGrant(
        username=client.account.username,
        identity_private=client.identity().private_bytes(),
        server_name=client.account.server_name,
        server_fingerprint=client.account.fingerprint,
        history_pieces=len(parts),
        history_sha256=link_history.digest(bundle) if parts else b"",
    )
    req = conn.next_req()
    await conn.request(
        frames.LinkAnswer(req=req, slot=slot, blob=linking.seal_grant(key, slot, grant)), req
    )
    return LinkedDevice(new_id, summary)


def is_link_code(text: str) -> bool:
    """Whether ``text`` reads as a link code (``bastion devices link``), not a username."""
    try:
        linking.parse_code(text)
    except ValueError:
        return False
    return True


def _remember_own_devices(
    client: ClientCore, *, add: DeviceEntry | None = None, remove: str | None = None
) -> None:
    """Record a change this device made itself, so it is not reported back to it as news."""
    me = client.account.username
    with client.profile.transaction():
        record = client.contact(me)
        if record is None:
            return
        kept = [d for d in record.devices if d.device_id != remove]
        if add is not None and all(d.device_id != add.device_id for d in kept):
            kept.append(add)
        client.profile.put("contact:" + me, msgspec.structs.replace(record, devices=kept))


async def _next_link_push(conn: ServerConnection, slot: bytes) -> frames.LinkPush:
    while True:
        item = await conn.incoming.get()
        if isinstance(item, _Closed):
            raise ServerRefusedError("disconnected", item.reason)
        if isinstance(item, frames.LinkPush) and item.slot == slot:
            return item


async def join_with_code(
    path: Path,
    passphrase: str,
    *,
    code: str,
    server_url: str,
    fingerprint: str | None = None,
    wait_s: float = 60.0,
    on_history: Callable[[HistorySummary], None] | None = None,
) -> Client:
    """Link this machine as a new device of the account that shows ``code``.

    History and trust the other device sends are checked whole before this
    device enrols, then stored in its profile; ``on_history`` is told what was
    kept. Raises ValueError for a mistyped code, ServerRefusedError if the code
    is unknown or expired, AuthenticationError if the answer or a piece of the
    history was not sealed with it, or the history arrived altered or incomplete
    (then nothing is linked).
    """
    slot, key = linking.slot_and_key(linking.parse_code(code))
    device = OlmDevice.create()
    conn = await ServerConnection.open(server_url, pin=fingerprint, pin_given=True)
    try:
        blob = linking.seal_request(
            key,
            slot,
            linking.LinkRequest(
                ed25519=device.ed25519, curve25519=device.curve25519, created_at=now_ms()
            ),
        )
        req = conn.next_req()
        await conn.request(frames.LinkJoin(req=req, slot=slot, blob=blob), req)
        grant, received = await _receive_grant(conn, slot, key, wait_s)
        check_username(grant.username)
        bundle = None
        if grant.history_pieces != len(received):
            raise AuthenticationError(
                "the history from the other device arrived incomplete; nothing was linked"
            )
        if received:
            bundle = link_history.open_bundle(
                b"".join(received), grant.history_sha256, grant.username
            )
        _check_same_server(conn, grant, fingerprint)
        challenge = conn.challenge
        if grant.server_name != challenge.server_name:
            raise AuthenticationError("the other device belongs to another server")
        with Profile.provisional(path, passphrase) as profile:
            client = await Client.enroll(
                conn,
                profile,
                identity=AccountIdentity.from_private_bytes(grant.identity_private),
                device=device,
                username=grant.username,
                server_url=server_url,
                challenge=challenge,
                new_account=False,
            )
            summary = HistorySummary() if bundle is None else link_history.store(client, bundle)
        if on_history is not None:
            on_history(summary)
        return client
    finally:
        await conn.aclose()


async def _receive_grant(
    conn: ServerConnection, slot: bytes, key: bytes, wait_s: float
) -> tuple[linking.LinkGrant, list[bytes]]:
    """The grant, and the pieces of history that came before it, each opened in its place.

    Raises AuthenticationError for a piece not sealed for its place on this
    link, or more pieces than announced or allowed; ServerRefusedError
    ``link_abandoned`` if the other device stops answering.
    """
    received: list[bytes] = []
    total: int | None = None
    while True:
        try:
            push = await asyncio.wait_for(_next_link_push(conn, slot), wait_s)
        except (TimeoutError, ServerRefusedError) as exc:
            if isinstance(exc, ServerRefusedError) and exc.code != "disconnected":
                raise
            # The slot took our request but nobody answered: the showing device is gone.
            raise ServerRefusedError("link_abandoned", LINK_ABANDONED) from None
        try:
            return linking.open_grant(key, slot, push.blob), received
        except AuthenticationError:
            pass  # not the grant: it must be the next piece of the history
        piece = linking.open_piece(key, slot, len(received), push.blob)
        if total is None:
            total = piece.total
        if piece.total != total or not 0 < total <= link_history.max_pieces():
            raise AuthenticationError(
                "the history from the other device is out of bounds; nothing was linked"
            )
        if len(received) >= total:
            raise AuthenticationError("the other device sent more history than it announced")
        received.append(piece.data)


def _check_same_server(
    conn: ServerConnection, grant: linking.LinkGrant, fingerprint: str | None
) -> None:
    """Refuse unless this connection reached the server the existing device has pinned.

    The grant (sealed under the code) names that server's certificate, so no
    ``--fingerprint`` is needed; a grant from an older version names none, and
    then only an explicit fingerprint will do.
    """
    if not grant.server_fingerprint:
        if fingerprint is None:
            raise UntrustedServerError(
                "the other device did not say which server certificate it trusts; "
                "run bastion link again with --fingerprint (bastion server-info on the "
                "other device shows it)"
            )
        return
    seen = conn.fingerprint or ""
    if not hmac.compare_digest(seen.lower(), grant.server_fingerprint.lower()):
        raise UntrustedServerError(
            f"the server reached here presents certificate {seen}, but your other device "
            f"uses {grant.server_fingerprint}: someone may be intercepting this connection. "
            "Nothing was linked."
        )


async def revoke_device(client: ClientCore, device_id: str) -> None:
    """Revoke another device of this account with the account key's signature."""
    if device_id == client.account.device_id:
        raise StateError("revoke this device from another device of the account")
    conn = client.connection()
    revoked_at = now_ms()
    signature = sign_revocation(client.identity(), client.account.username, device_id, revoked_at)
    req = conn.next_req()
    await conn.request(
        frames.RevokeDevice(
            req=req, device_id=device_id, revoked_at=revoked_at, signature=signature
        ),
        req,
    )
    _remember_own_devices(client, remove=device_id)
    # Contacts refuse a device the signed list no longer names, even if a server keeps it.
    await device_list.update_own_list(client, remove=[device_id])


class AccountExport(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What an export file carries (sealed): the account and how to reach its server."""

    username: str
    identity_private: bytes
    server_url: str
    fingerprint: str
    server_name: str

    def __repr__(self) -> str:
        return f"AccountExport({self.username}, <redacted>)"


def export_account(client: ClientCore, file: Path, passphrase: str) -> None:
    """Write the account key and server pins to ``file``, sealed under ``passphrase``.

    The file is created with mode 0600 and never overwrites an existing one.
    """
    if not passphrase:
        raise ProfileError("an export needs a passphrase")
    params = KdfParams()
    salt = os.urandom(SALT_BYTES)
    box = SecretBox(derive_master_key(passphrase, salt, params))
    account = client.account
    sealed = box.seal(
        msgspec.msgpack.encode(
            AccountExport(
                username=account.username,
                identity_private=client.identity().private_bytes(),
                server_url=account.server_url,
                fingerprint=account.fingerprint,
                server_name=account.server_name,
            )
        ),
        EXPORT_AAD,
    )
    document = {
        "bastion_account_export": 1,
        "kdf": {
            "algorithm": "argon2id",
            "memory_kib": params.memory_kib,
            "iterations": params.iterations,
            "lanes": params.lanes,
        },
        "salt": base64.b64encode(salt).decode(),
        "sealed": base64.b64encode(sealed).decode(),
    }
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(document, f, indent=2)


def read_export(file: Path, passphrase: str) -> AccountExport:
    """Open an export file; raises :class:`ProfileError` if damaged or the passphrase is wrong."""
    try:
        document = json.loads(file.read_text())
        if document.get("bastion_account_export") != 1:
            raise ProfileError(f"{file} is not an account export")
        kdf = document["kdf"]
        params = KdfParams(
            memory_kib=int(kdf["memory_kib"]),
            iterations=int(kdf["iterations"]),
            lanes=int(kdf["lanes"]),
        )
        salt = base64.b64decode(document["salt"])
        sealed = base64.b64decode(document["sealed"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ProfileError(f"{file} is not a readable account export") from None
    box = SecretBox(derive_master_key(passphrase, salt, params))
    try:
        raw = box.open(sealed, EXPORT_AAD)
    except ProfileError:
        raise ProfileError("wrong passphrase for this export, or the file was altered") from None
    return msgspec.msgpack.decode(raw, type=AccountExport)


async def import_account(file: Path, export_passphrase: str, path: Path, passphrase: str) -> Client:
    """Restore an account from an export onto this machine, as a new device."""
    exported = read_export(file, export_passphrase)
    conn = await ServerConnection.open(exported.server_url, pin=exported.fingerprint)
    try:
        challenge = conn.challenge
        if challenge.server_name != exported.server_name:
            raise AuthenticationError("the server's name differs from the exported one")
        with Profile.provisional(path, passphrase) as profile:
            return await Client.enroll(
                conn,
                profile,
                identity=AccountIdentity.from_private_bytes(exported.identity_private),
                device=OlmDevice.create(),
                username=exported.username,
                server_url=exported.server_url,
                challenge=challenge,
                new_account=False,
            )
    finally:
        await conn.aclose()
