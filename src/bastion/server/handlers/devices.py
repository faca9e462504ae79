"""Server side of multi-device accounts: linking, adding and revoking devices.

The server can never add a device on its own: every device needs a
certificate from the account identity key, which the server does not hold.
Link slots only pair two connections; what passes through them is sealed
under a code the server never sees (see :mod:`bastion.crypto.linking`).
Slots are kept by the bus (:mod:`bastion.server.core.link_slots`), so in a cluster
the two connections may be on different nodes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from bastion.crypto.device import DeviceCertificate, verify_published_key, verify_revocation
from bastion.crypto.signing import verify_ed25519
from bastion.errors import AuthenticationError
from bastion.protocol import frames
from bastion.protocol.auth import register_message
from bastion.server.cluster.local import Kick
from bastion.server.core.link_slots import LinkDeliver, LinkError
from bastion.server.storage.interfaces import DeviceRecord, DeviceRefusedError, KeyRecord

if TYPE_CHECKING:
    from bastion.server.net.connection import ClientConnection

REVOCATION_SKEW_MS = 86_400_000


def verify_new_device(
    *,
    server_name: str,
    nonce: bytes,
    username: str,
    identity_key: bytes,
    device: frames.DeviceKeys,
    signature: bytes,
    one_time_keys: list[frames.SignedKey],
    fallback_key: frames.SignedKey,
) -> DeviceRecord:
    """Check a new device's certificate, proof of possession and published keys.

    Raises :class:`AuthenticationError` on any failure.
    """
    DeviceCertificate(
        username=username,
        device_id=device.device_id,
        ed25519=device.ed25519,
        curve25519=device.curve25519,
        created_at=device.created_at,
        signature=device.certificate,
    ).verify(identity_key)
    verify_ed25519(
        device.ed25519,
        signature,
        register_message(server_name, nonce, username, device.device_id),
    )
    for key in one_time_keys:
        verify_published_key(
            device.ed25519, device.device_id, key.key, key.signature, fallback=False
        )
    verify_published_key(
        device.ed25519,
        device.device_id,
        fallback_key.key,
        fallback_key.signature,
        fallback=True,
    )
    return DeviceRecord(
        username,
        device.device_id,
        device.ed25519,
        device.curve25519,
        device.created_at,
        device.certificate,
    )


def _pushes_to(conn: ClientConnection, slot: bytes) -> LinkDeliver:
    """How a blob for ``slot`` reaches ``conn``: a ``link_push`` frame."""

    def deliver(blob: bytes) -> None:
        conn.send_frame(frames.LinkPush(slot=slot, blob=blob))

    return deliver


async def link_open(conn: ClientConnection, frame: frames.LinkOpen) -> None:
    """A signed-in device offers a link slot."""
    owner = conn.session.require_signed_in()
    await conn.server.bus.link_open(frame.slot, owner, _pushes_to(conn, frame.slot))
    conn.send_frame(frames.Ok(req=frame.req))


async def link_join(conn: ClientConnection, frame: frames.LinkJoin) -> None:
    """A new device (not signed in) hands its sealed keys to the slot's owner."""
    if conn.session.username is not None:
        raise LinkError("this connection is already signed in")
    await conn.server.bus.link_join(frame.slot, frame.blob, _pushes_to(conn, frame.slot))
    conn.send_frame(frames.Ok(req=frame.req))


async def link_answer(conn: ClientConnection, frame: frames.LinkAnswer) -> None:
    """The owner hands its sealed grant to the joining device."""
    owner = conn.session.require_signed_in()
    await conn.server.bus.link_answer(frame.slot, owner, frame.blob)
    conn.send_frame(frames.Ok(req=frame.req))


async def add_device(conn: ClientConnection, frame: frames.AddDevice) -> None:
    """A device certified by the account key joins the account and is signed in."""
    nonce = conn.session.take_nonce(time.monotonic())
    account = await conn.server.store.get_account(frame.username)
    if account is None or account.disabled:
        raise AuthenticationError("unknown or disabled account")
    record = verify_new_device(
        server_name=conn.session.server_name,
        nonce=nonce,
        username=frame.username,
        identity_key=account.identity_key,
        device=frame.device,
        signature=frame.signature,
        one_time_keys=frame.one_time_keys,
        fallback_key=frame.fallback_key,
    )
    try:
        await conn.server.store.add_device(
            record,
            [KeyRecord(k.key, k.signature) for k in frame.one_time_keys],
            KeyRecord(frame.fallback_key.key, frame.fallback_key.signature),
            max_devices=conn.limits.max_devices_per_account,
        )
    except DeviceRefusedError as exc:
        conn.refuse(frame.req, "device_refused", str(exc))
        return
    conn.server.audit_event(
        "device.added", user=frame.username, device=record.device_id, address=conn.address
    )
    await conn.signed_in(frame.req, frame.username, record.device_id, frame.receive)


async def revoke_device(conn: ClientConnection, frame: frames.RevokeDevice) -> None:
    """Remove a device of the signed-in account, on the account key's signature."""
    username, device_id = conn.session.require_signed_in()
    if frame.device_id == device_id:
        conn.refuse(frame.req, "bad_request", "revoke this device from another one")
        return
    if abs(frame.revoked_at - time.time_ns() // 1_000_000) > REVOCATION_SKEW_MS:
        conn.refuse(frame.req, "bad_request", "the revocation is dated too far from now")
        return
    account = await conn.server.store.get_account(username)
    if account is None:
        raise AuthenticationError("account no longer exists")
    verify_revocation(
        account.identity_key, frame.signature, username, frame.device_id, frame.revoked_at
    )
    if not await conn.server.store.revoke_device(username, frame.device_id):
        conn.refuse(frame.req, "unknown_device", "the account has no such device")
        return
    conn.server.bus.publish(username, frame.device_id, Kick("device revoked"))
    conn.server.audit_event("device.revoked", user=username, device=frame.device_id, by=device_id)
    conn.send_frame(frames.Ok(req=frame.req))
