"""Device keys on the relay: query an account's devices, claim one-time keys, upload more.

Claims are rate limited per requester and per (requester, target) pair: the
pair limit stops one account from draining another's one-time keys to force
fallback-key sessions (Prekey Pogo). A device whose stock runs low is told once
(``keys_low``) until it uploads.
"""

from __future__ import annotations

import logging

from bastion.crypto.device import verify_published_key
from bastion.errors import AuthenticationError
from bastion.protocol import frames
from bastion.protocol.codes import ErrorCode
from bastion.server.cluster.local import KeysLow
from bastion.server.handlers import device_lists
from bastion.server.handlers._context import Route, Services
from bastion.server.handlers._request import Request
from bastion.server.storage.interfaces import KeyRecord

log = logging.getLogger("bastion.server")


async def allow_claim(services: Services, requester: str, target: str) -> bool:
    """Token buckets on key claims per requester and per (requester, target) pair.

    Both are counted across every node of a cluster (:meth:`Bus.take`).
    """
    limits = services.limits
    if requester != target and not await services.bus.take(
        "key_claims_per_target",
        f"{requester}/{target}",
        limits.key_claims_per_target_per_hour / 3600.0,
        limits.key_claims_per_target_burst,
    ):
        return False
    return await services.bus.take(
        "key_claims", requester, limits.key_claims_per_minute / 60.0, limits.key_claims_burst
    )


async def query_keys(request: Request, services: Services, frame: frames.QueryKeys) -> None:
    """Answer with an account's key, its devices and its newest signed device list."""
    store = services.storage.relay
    account = await store.get_account(frame.user)
    if account is None:
        request.refuse(frame.req, ErrorCode.UNKNOWN_USER, f"there is no user named {frame.user}")
        return
    devices = await store.list_devices(frame.user)
    device_list = await device_lists.latest_frame(services, frame.user, account.identity_key)
    request.reply(
        frames.KeysResult(
            req=frame.req,
            user=frame.user,
            identity_key=account.identity_key,
            devices=[
                frames.DeviceKeys(
                    device_id=d.device_id,
                    ed25519=d.ed25519,
                    curve25519=d.curve25519,
                    created_at=d.created_at,
                    certificate=d.certificate,
                )
                for d in devices
            ],
            device_list=device_list,
        )
    )


async def claim_keys(request: Request, services: Services, frame: frames.ClaimKeys) -> None:
    """Hand out one key per device of an account (its fallback key when the stock is empty)."""
    requester, _ = request.signed_in()
    if not await allow_claim(services, requester, frame.user):
        log.info("limit.hit", extra={"limit": "key_claims"})
        request.refuse(frame.req, ErrorCode.RATE_LIMITED, "too many key claims; wait a minute")
        return
    store = services.storage.relay
    claimed = await store.claim_keys(frame.user)
    request.reply(
        frames.ClaimResult(
            req=frame.req,
            user=frame.user,
            keys=[
                frames.ClaimedKey(
                    device_id=k.device_id, key=k.key, signature=k.signature, fallback=k.fallback
                )
                for k in claimed
            ],
        )
    )
    for k in claimed:
        device = (frame.user, k.device_id)
        if device in services.keys_low_notified:
            continue  # told once; the next notice waits until the device uploads
        count = await store.count_one_time_keys(frame.user, k.device_id)
        if count < services.limits.one_time_keys_low:
            services.keys_low_notified.add(device)
            services.bus.publish(frame.user, k.device_id, KeysLow(count))


async def upload_keys(request: Request, services: Services, frame: frames.UploadKeys) -> None:
    """Add one-time keys (each signed by the device) and replace the fallback key."""
    username, device_id = request.signed_in()
    store = services.storage.relay
    device = await store.get_device(username, device_id)
    if device is None:
        raise AuthenticationError("device no longer exists")
    for key in frame.one_time_keys:
        verify_published_key(device.ed25519, device_id, key.key, key.signature, fallback=False)
    if frame.fallback_key is not None:
        fb = frame.fallback_key
        verify_published_key(device.ed25519, device_id, fb.key, fb.signature, fallback=True)
    current = await store.count_one_time_keys(username, device_id)
    if current + len(frame.one_time_keys) > services.limits.one_time_keys_max:
        request.refuse(frame.req, ErrorCode.TOO_MANY_KEYS, "one-time key stock is full")
        return
    services.keys_low_notified.discard((username, device_id))
    await store.add_one_time_keys(
        username,
        device_id,
        [KeyRecord(k.key, k.signature) for k in frame.one_time_keys],
        None
        if frame.fallback_key is None
        else KeyRecord(frame.fallback_key.key, frame.fallback_key.signature),
    )
    request.reply(frames.Ok(req=frame.req))


ROUTES = (
    Route(frames.QueryKeys, query_keys),
    Route(frames.ClaimKeys, claim_keys),
    Route(frames.UploadKeys, upload_keys),
)
