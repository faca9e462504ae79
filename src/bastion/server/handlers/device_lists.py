"""Signed device lists: the relay keeps the newest one per account and hands it out.

Each account publishes a list of its device ids, signed by the account identity
key and numbered by a version that every link and revocation raises (see
:class:`bastion.crypto.device.SignedDeviceList`). The relay checks the signature
and that the version only goes up, stores the newest list
(:mod:`bastion.server.storage.device_lists`), and attaches it to every key query
answer. Clients do the checks that matter: the relay is not trusted with them
(docs/protocol.md, section 6.7).
"""

from __future__ import annotations

from bastion.crypto.device import SignedDeviceList
from bastion.errors import AuthenticationError
from bastion.protocol import frames
from bastion.protocol.codes import ErrorCode
from bastion.server.handlers._context import Route, Services
from bastion.server.handlers._request import Request
from bastion.server.storage.device_lists import StaleDeviceListError, StoredDeviceList


async def latest_frame(
    services: Services, username: str, identity_key: bytes
) -> frames.DeviceList | None:
    """The newest list of ``username`` (signed by ``identity_key``) for a key query answer."""
    stored = await services.storage.device_lists.latest(username)
    if stored is None or stored.identity_key != identity_key:
        return None
    return frames.DeviceList(
        version=stored.version, device_ids=list(stored.device_ids), signature=stored.signature
    )


async def publish(request: Request, services: Services, frame: frames.PublishDeviceList) -> None:
    """Store a newer list signed by the account key of the signed-in account."""
    username, device_id = request.signed_in()
    account = await services.storage.relay.get_account(username)
    if account is None:
        raise AuthenticationError("account no longer exists")
    listed = frame.device_list
    signed = SignedDeviceList(username, listed.version, tuple(listed.device_ids), listed.signature)
    try:
        signed.verify(account.identity_key)
    except AuthenticationError:
        request.refuse(
            frame.req, ErrorCode.BAD_DEVICE_LIST, "the device list is not signed by the account"
        )
        return
    try:
        await services.storage.device_lists.replace(
            username,
            StoredDeviceList(
                account.identity_key, signed.version, signed.device_ids, signed.signature
            ),
        )
    except StaleDeviceListError as exc:
        request.refuse(frame.req, ErrorCode.STALE_DEVICE_LIST, str(exc))
        return
    services.audit.event(
        "device_list.published", user=username, version=signed.version, by=device_id
    )
    request.reply(frames.Ok(req=frame.req))


ROUTES = (Route(frames.PublishDeviceList, publish),)
