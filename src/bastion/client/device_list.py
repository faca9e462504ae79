"""Signed device lists on the client: check what the server says, publish our own.

The server's word on which devices an account has is checked against the
account's signed device list (:class:`bastion.crypto.device.SignedDeviceList`):
the client pins the highest version it has seen per account and refuses an
older one (a rollback), a device the list does not name (for instance a revoked
device the server keeps handing out), and an answer without a list once a list
was seen. An account that never published a list (made before lists existed) is
accepted as before until it publishes one; each device of such an account
publishes version 1 the first time it looks up its own account.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import msgspec

from bastion.client.records import ContactRecord, DeviceEntry
from bastion.crypto.device import DeviceCertificate, SignedDeviceList
from bastion.errors import AuthenticationError, DeviceListError, ServerRefusedError
from bastion.protocol import frames

if TYPE_CHECKING:
    from bastion.client.feature import ClientCore

PUBLISH_ATTEMPTS = 3


def certified_device(user: str, identity_key: bytes, keys: frames.DeviceKeys) -> DeviceEntry | None:
    """The device if its certificate verifies under ``identity_key`` for ``user``, else None."""
    try:
        DeviceCertificate(
            username=user,
            device_id=keys.device_id,
            ed25519=keys.ed25519,
            curve25519=keys.curve25519,
            created_at=keys.created_at,
            signature=keys.certificate,
        ).verify(identity_key)
    except AuthenticationError:
        return None
    return DeviceEntry(
        device_id=keys.device_id,
        ed25519=keys.ed25519,
        curve25519=keys.curve25519,
        created_at=keys.created_at,
    )


def checked_list(
    user: str,
    reply: frames.KeysResult,
    certified: list[DeviceEntry],
    pinned: ContactRecord | None,
    *,
    this_device: str | None = None,
) -> SignedDeviceList | None:
    """The signed list in ``reply`` once it passed every check (None: the account has none).

    ``pinned`` is the record under the same account key (the caller handles a
    changed key first). ``this_device`` (for our own account) may be missing from
    the list: a device that just joined publishes the list that names it. Raises
    :class:`DeviceListError` with a sentence for the user.
    """
    pinned_version = pinned.device_list_version if pinned is not None else 0
    if reply.device_list is None:
        if pinned_version > 0:
            raise DeviceListError(
                f"the server withholds {user}'s signed device list (this device has seen "
                f"version {pinned_version}); refusing to use {user}'s devices"
            )
        return None
    signed = SignedDeviceList(
        user, reply.device_list.version, tuple(reply.device_list.device_ids),
        reply.device_list.signature,
    )  # fmt: skip
    try:
        signed.verify(reply.identity_key)
    except AuthenticationError:
        raise DeviceListError(
            f"{user}'s device list is not signed by their account key; refusing to use "
            f"{user}'s devices"
        ) from None
    if signed.version < pinned_version:
        raise DeviceListError(
            f"the server shows an older device list for {user} (version {signed.version}; "
            f"this device has seen version {pinned_version}): a rollback, which could bring "
            f"back a revoked device; refusing to use {user}'s devices"
        )
    listed = set(signed.device_ids)
    unlisted = sorted(
        d.device_id for d in certified if d.device_id not in listed and d.device_id != this_device
    )
    if unlisted:
        raise DeviceListError(
            f"the server lists device {', '.join(unlisted)} for {user}, which {user}'s signed "
            f"device list (version {signed.version}) does not name: it may be a revoked "
            f"device; refusing to encrypt to {user}'s devices"
        )
    return signed


def pinned_record(record: ContactRecord, signed: SignedDeviceList | None) -> ContactRecord:
    """``record`` with the version and ids of ``signed`` pinned (unchanged for None)."""
    if signed is None:
        return record
    return msgspec.structs.replace(
        record, device_list_version=signed.version, listed_devices=list(signed.device_ids)
    )


async def update_own_list(
    client: ClientCore, *, add: Iterable[str] = (), remove: Iterable[str] = ()
) -> SignedDeviceList:
    """Publish the next version of this account's list, with ``add`` and without ``remove``.

    The base is the newest checked list (or, for an account without one, the
    devices the server lists with valid certificates). Raises
    :class:`DeviceListError` if the server's answer fails the checks, and
    :class:`ServerRefusedError` if the server keeps refusing the new version.
    """
    me = client.account.username
    conn = client.connection()
    adding, removing = set(add), set(remove)
    for _attempt in range(PUBLISH_ATTEMPTS):
        await client.devices_of(me, publish_missing_list=False)
        record = client.contact(me)
        if record is None:
            raise DeviceListError("this profile holds no record of its own account")
        if record.device_list_version:
            base = set(record.listed_devices)
        else:
            base = {d.device_id for d in record.devices}
        signed = SignedDeviceList.issue(
            client.identity(),
            username=me,
            version=record.device_list_version + 1,
            device_ids=(base | adding) - removing,
        )
        req = conn.next_req()
        try:
            await conn.request(
                frames.PublishDeviceList(
                    req=req,
                    device_list=frames.DeviceList(
                        version=signed.version,
                        device_ids=list(signed.device_ids),
                        signature=signed.signature,
                    ),
                ),
                req,
            )
        except ServerRefusedError as exc:
            if exc.code == "stale_device_list":
                continue  # another device published meanwhile: build on the newer list
            raise
        with client.profile.transaction():
            current = client.contact(me) or record
            client.profile.put("contact:" + me, pinned_record(current, signed))
        return signed
    raise ServerRefusedError(
        "stale_device_list", "the account's device list keeps changing; try again"
    )
