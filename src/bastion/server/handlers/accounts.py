"""Accounts on the relay: registration (with the policy and invites) and sign-in.

Both answer a challenge the connection sent (``ServerSession``): the signature
covers the server's name and a fresh nonce, so neither can be replayed. Sign-in
failures are counted across every node (:meth:`Bus.record_failure`), by address
and by (address, account), so failures from elsewhere never lock the owner out;
registrations are counted per address the same way (:meth:`Bus.take`).
"""

from __future__ import annotations

import logging
import secrets

from bastion.errors import AuthenticationError
from bastion.protocol import frames
from bastion.protocol.codes import ErrorCode
from bastion.server.handlers._context import Route, Services
from bastion.server.handlers._request import Request
from bastion.server.handlers.devices import verify_new_device
from bastion.server.storage.interfaces import AccountRecord, KeyRecord, UsernameTakenError

log = logging.getLogger("bastion.server")


# --- limits, counted across every node ------------------------------------------------------


async def allow_registration(services: Services, address: str) -> bool:
    """The per-address registration bucket, counted across every node."""
    limits = services.limits
    return await services.bus.take(
        "registrations_per_address",
        address,
        limits.registrations_per_address_per_hour / 3600.0,
        limits.registrations_per_address_burst,
    )


async def signin_wait(services: Services, address: str, username: str) -> float:
    """Seconds a sign-in from this address for this account must wait (0: go ahead)."""
    return max(
        await services.bus.failure_wait("signin_by_address", address),
        await services.bus.failure_wait("signin_by_account", f"{address}/{username}"),
    )


async def signin_failed(services: Services, address: str, username: str) -> None:
    """Count a failed sign-in against the address and the account."""
    await services.bus.record_failure("signin_by_address", address, services.signin_backoff)
    await services.bus.record_failure(
        "signin_by_account", f"{address}/{username}", services.signin_backoff
    )


async def signin_succeeded(services: Services, address: str, username: str) -> None:
    """Forget the account's failures from this address; the address's count only decays."""
    await services.bus.clear_failures("signin_by_account", f"{address}/{username}")


# --- registration ---------------------------------------------------------------------------


async def _may_register(request: Request, services: Services, frame: frames.Register) -> bool:
    """Registration policy and the per-address limit; refuses and returns False if not."""
    mode = services.admin.policy.registration
    if mode == "closed":
        code, message = ErrorCode.REGISTRATION_CLOSED, "this server does not accept new accounts"
    elif mode == "invite" and frame.invite is None:
        code, message = ErrorCode.INVITE_REQUIRED, "this server accepts new accounts by invite only"
    elif not await allow_registration(services, request.limit_key):
        services.limit_log.hit("registrations_per_address", request.limit_key)
        code, message = (
            ErrorCode.RATE_LIMITED,
            "too many registrations from your address; try later",
        )
    else:
        return True
    if code is not ErrorCode.RATE_LIMITED:
        services.audit.event(
            "registration.refused", reason=code, user=frame.username, address=request.address
        )
    request.refuse(frame.req, code, message)
    return False


async def _take_invite(
    request: Request, services: Services, frame: frames.Register
) -> tuple[bool, str | None]:
    """Under an invite-only policy, take one use of the frame's invite code.

    Returns whether the registration may go on, and the code whose use was taken:
    None when no use was (no invite needed; a code sent anyway is left alone), so a
    failed registration gives back only a use it took.
    """
    if services.admin.policy.registration != "invite":
        return True, None
    if frame.invite is not None and await services.admin.use_invite(frame.invite):
        return True, frame.invite
    services.audit.event(
        "registration.refused", reason="bad_invite", user=frame.username, address=request.address
    )
    request.refuse(
        frame.req, ErrorCode.BAD_INVITE, "the invite code is unknown, used up or expired"
    )
    request.rechallenge()
    return False, None


async def register(request: Request, services: Services, frame: frames.Register) -> None:
    """Create an account with its first device, then sign the connection in as it."""
    if not await _may_register(request, services, frame):
        return
    nonce = request.session.take_nonce(services.clock.monotonic())
    device = frame.device
    record = verify_new_device(
        server_name=request.session.server_name,
        nonce=nonce,
        username=frame.username,
        identity_key=frame.identity_key,
        device=device,
        signature=frame.signature,
        one_time_keys=frame.one_time_keys,
        fallback_key=frame.fallback_key,
    )
    may_register, invite_taken = await _take_invite(request, services, frame)
    if not may_register:
        return
    now = services.clock.now_ms()
    try:
        await services.storage.relay.create_account(
            AccountRecord(frame.username, frame.identity_key, now),
            record,
            [KeyRecord(k.key, k.signature) for k in frame.one_time_keys],
            KeyRecord(frame.fallback_key.key, frame.fallback_key.signature),
        )
    except UsernameTakenError:
        if invite_taken is not None:
            await services.admin.return_invite(invite_taken)
        request.refuse(frame.req, ErrorCode.USERNAME_TAKEN, "that username is taken")
        request.reply(
            request.session.challenge(services.clock.monotonic(), secrets.token_bytes(32))
        )
        return
    log.info("account.registered")
    services.audit.event(
        "account.registered",
        user=frame.username,
        device=device.device_id,
        address=request.address,
        invited=invite_taken is not None,
    )
    await request.bind(frame.req, frame.username, device.device_id, receive=frame.receive)


# --- sign-in --------------------------------------------------------------------------------


async def signin(request: Request, services: Services, frame: frames.SignIn) -> None:
    """Check the answer to the challenge and sign the connection in as the device."""
    wait = await signin_wait(services, request.limit_key, frame.username)
    if wait > 0:
        services.limit_log.hit("signin_backoff", f"{request.limit_key} {frame.username}")
        request.refuse(
            frame.req,
            ErrorCode.RATE_LIMITED,
            f"too many failed sign-ins; try again in {wait:.0f} s",
        )
        request.session.attempts += 1  # waiting it out still spends this connection's tries
        request.rechallenge()
        return
    nonce = request.session.take_nonce(services.clock.monotonic())
    device = await services.storage.relay.get_device(frame.username, frame.device_id)
    account = await services.storage.relay.get_account(frame.username)
    try:
        if device is None or account is None or account.disabled:
            raise AuthenticationError("unknown device or disabled account")
        request.session.verify_answer(
            nonce=nonce,
            username=frame.username,
            device_id=frame.device_id,
            device_ed25519=device.ed25519,
            signature=frame.signature,
        )
    except AuthenticationError as exc:
        await signin_failed(services, request.limit_key, frame.username)
        services.audit.event(
            "signin.failed", user=frame.username, address=request.address, reason=str(exc)[:200]
        )
        raise
    await signin_succeeded(services, request.limit_key, frame.username)
    log.info("signin.ok")
    services.audit.event(
        "signin.ok", user=frame.username, device=frame.device_id, address=request.address
    )
    await request.bind(frame.req, frame.username, frame.device_id, receive=frame.receive)


ROUTES = (
    Route(frames.Register, register, before_signin=True),
    Route(frames.SignIn, signin, before_signin=True),
)
