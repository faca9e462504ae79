"""Server side of multi-device accounts: linking, adding and revoking devices.

The server can never add a device on its own: every device needs a
certificate from the account identity key, which the server does not hold.
Link slots only pair two connections; what passes through them is sealed
under a code the server never sees (see :mod:`bastion.crypto.linking`).
Slots are kept by the bus (:mod:`bastion.server.core.link_slots`), so in a cluster
the two connections may be on different nodes.
"""

from __future__ import annotations

from bastion.crypto.device import DeviceCertificate, verify_published_key, verify_revocation
from bastion.crypto.signing import verify_ed25519
from bastion.errors import AuthenticationError
from bastion.protocol import frames
from bastion.protocol.auth import register_message
from bastion.protocol.codes import ErrorCode
from bastion.server.cluster.local import Kick
from bastion.server.core.link_slots import LinkDeliver, LinkError
from bastion.server.handlers._context import Route, Services
from bastion.server.handlers._request import Request
from bastion.server.storage.interfaces import DeviceRecord, DeviceRefusedError, KeyRecord

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


def _pushes_to(request: Request, slot: bytes) -> LinkDeliver:
    """How a blob for ``slot`` reaches ``request``: a ``link_push`` frame."""

    def deliver(blob: bytes) -> None:
        request.reply(frames.LinkPush(slot=slot, blob=blob))

    return deliver


async def link_open(request: Request, services: Services, frame: frames.LinkOpen) -> None:
    """A signed-in device offers a link slot."""
    owner = request.signed_in()
    await services.bus.link_open(frame.slot, owner, _pushes_to(request, frame.slot))
    request.reply(frames.Ok(req=frame.req))


async def link_join(request: Request, services: Services, frame: frames.LinkJoin) -> None:
    """A new device (not signed in) hands its sealed keys to the slot's owner."""
    if request.session.username is not None:
        raise LinkError("this connection is already signed in")
    await services.bus.link_join(frame.slot, frame.blob, _pushes_to(request, frame.slot))
    request.reply(frames.Ok(req=frame.req))


async def link_more(request: Request, services: Services, frame: frames.LinkMore) -> None:
    """The owner hands one more sealed piece to the joining device, before its answer."""
    owner = request.signed_in()
    await services.bus.link_more(frame.slot, owner, frame.blob)
    request.reply(frames.Ok(req=frame.req))


async def link_answer(request: Request, services: Services, frame: frames.LinkAnswer) -> None:
    """The owner hands its sealed grant to the joining device."""
    owner = request.signed_in()
    await services.bus.link_answer(frame.slot, owner, frame.blob)
    request.reply(frames.Ok(req=frame.req))


async def add_device(request: Request, services: Services, frame: frames.AddDevice) -> None:
    """A device certified by the account key joins the account and is signed in."""
    nonce = request.session.take_nonce(services.clock.monotonic())
    account = await services.storage.relay.get_account(frame.username)
    if account is None or account.disabled:
        raise AuthenticationError("unknown or disabled account")
    record = verify_new_device(
        server_name=request.session.server_name,
        nonce=nonce,
        username=frame.username,
        identity_key=account.identity_key,
        device=frame.device,
        signature=frame.signature,
        one_time_keys=frame.one_time_keys,
        fallback_key=frame.fallback_key,
    )
    try:
        await services.storage.relay.add_device(
            record,
            [KeyRecord(k.key, k.signature) for k in frame.one_time_keys],
            KeyRecord(frame.fallback_key.key, frame.fallback_key.signature),
            max_devices=services.limits.max_devices_per_account,
        )
    except DeviceRefusedError as exc:
        request.refuse(frame.req, ErrorCode.DEVICE_REFUSED, str(exc))
        return
    services.audit.event(
        "device.added", user=frame.username, device=record.device_id, address=request.address
    )
    await request.bind(frame.req, frame.username, record.device_id, receive=frame.receive)


async def revoke_device(request: Request, services: Services, frame: frames.RevokeDevice) -> None:
    """Remove a device of the signed-in account, on the account key's signature."""
    username, device_id = request.signed_in()
    if frame.device_id == device_id:
        request.refuse(frame.req, ErrorCode.BAD_REQUEST, "revoke this device from another one")
        return
    if abs(frame.revoked_at - services.clock.now_ms()) > REVOCATION_SKEW_MS:
        request.refuse(frame.req, ErrorCode.BAD_REQUEST, "the revocation is dated too far from now")
        return
    account = await services.storage.relay.get_account(username)
    if account is None:
        raise AuthenticationError("account no longer exists")
    verify_revocation(
        account.identity_key, frame.signature, username, frame.device_id, frame.revoked_at
    )
    if not await services.storage.relay.revoke_device(username, frame.device_id):
        request.refuse(frame.req, ErrorCode.UNKNOWN_DEVICE, "the account has no such device")
        return
    services.bus.publish(username, frame.device_id, Kick("device revoked"))
    services.audit.event("device.revoked", user=username, device=frame.device_id, by=device_id)
    request.reply(frames.Ok(req=frame.req))


ROUTES = (
    Route(frames.AddDevice, add_device, before_signin=True),
    Route(frames.LinkJoin, link_join, before_signin=True),
    Route(frames.LinkOpen, link_open),
    Route(frames.LinkMore, link_more),
    Route(frames.LinkAnswer, link_answer),
    Route(frames.RevokeDevice, revoke_device),
)
