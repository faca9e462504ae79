"""Identity: safety numbers and verification, a changed key, devices, the export, the server.

Two flows outlast one call and report through live events:

- SAS verification (``verify.sas_start``): the exchange runs in the gateway;
  the codes to compare arrive as a ``verification_codes`` event, and the user's
  answer comes back through ``verify.sas_confirm`` or ``verify.sas_cancel``.
  A flow is known by the ``id`` the start answered (the gateway's, not the
  protocol's transaction id). Unanswered codes are refused after the step
  timeout, so nothing is marked verified without the user saying yes.
- Linking a device (``devices.link``): the answer is the one-time code; the
  outcome arrives as a ``linked`` or ``link_failed`` event.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from bastion.cli.identity import (
    device_json,
    linked_json,
    new_key,
    safety_number_json,
    server_info_json,
)
from bastion.client import comparison, devices, link_history, trust, verification
from bastion.errors import BastionError, StateError
from bastion.gateway.context import GatewayContext
from bastion.gateway.methods._base import ContextMethod
from bastion.gateway.methods.files import absolute
from bastion.gateway.rpc import MethodError, Session

log = logging.getLogger(__name__)
FLOWS = "gateway:flows"  # the client extension holding this gateway's running flows


@dataclass(slots=True)
class SasFlow:
    """One SAS verification the gateway runs for a front end."""

    id: str
    user: str
    answer: asyncio.Future[bool]
    codes: verification.SasCodes | None = None
    task: asyncio.Task[None] = field(init=False)  # set as it starts


@dataclass(slots=True)
class Flows:
    """What runs in the background: verifications by id, links (kept so they are not lost)."""

    sas: dict[str, SasFlow] = field(default_factory=dict)
    links: set[asyncio.Task[None]] = field(default_factory=set)


def flows(ctx: GatewayContext) -> Flows:
    """The gateway's running flows, kept with the client they belong to."""
    found = ctx.client.extensions.get(FLOWS)
    if not isinstance(found, Flows):
        found = Flows()
        ctx.client.extensions[FLOWS] = found
    return found


# --- safety numbers and trust ------------------------------------------------------------------


async def verify_number(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """The safety number to compare, as ``bastion verify USER --json`` (and the QR code).

    ``qr_text`` adds the QR code drawn in text, as ``bastion verify USER`` shows it.
    """
    client, user = ctx.client, params["user"]
    contact = client.contact(user)
    if contact is not None and contact.trust == "changed":
        number, fingerprint = new_key(client, user)
        out = safety_number_json(user, number, "changed", fingerprint)
    else:
        number = await trust.safety_number_with(client, user)
        contact = client.contact(user)
        out = safety_number_json(user, number, contact.trust if contact else "unverified")
    if params.get("qr", False):
        png = await asyncio.to_thread(comparison.qr_png, number.qr_payload())
        out["qr_png"] = base64.b64encode(png).decode("ascii")
    if params.get("qr_text", False):
        out["qr_text"] = comparison.render_qr_text(number.qr_payload())
    return out


async def verify_confirm(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Mark a contact verified if the number they read out (or their QR code) matches."""
    client, user = ctx.client, params["user"]
    if sum(name in params for name in ("number", "qr_image", "qr_payload")) != 1:
        raise ValueError("give one of: the number they read out, qr_image or qr_payload")
    contact = client.contact(user)
    if contact is not None and contact.trust == "changed":
        raise StateError(
            f"{user}'s key changed: nothing was marked verified. Compare the new number "
            "(verify.number) and accept it first (trust.accept_new_key)"
        )
    number = await trust.safety_number_with(client, user)
    if "number" in params:
        comparison.confirm_number(client, user, params["number"])
    elif "qr_payload" in params:
        try:
            payload = base64.b64decode(params["qr_payload"], validate=True)
        except ValueError:
            raise ValueError("qr_payload is not base64") from None
        comparison.confirm_qr_payload(client, user, payload)
    else:
        image = absolute(params["qr_image"], "qr_image")
        comparison.confirm_qr_image(client, user, image)  # the profile is this thread's
    contact = client.contact(user)
    return safety_number_json(user, number, contact.trust if contact else "unverified")


async def trust_accept_new_key(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Pin the new key whose safety number or fingerprint ``verify.number`` showed."""
    user = params["user"]
    contact = trust.accept_new_key(ctx.client, user, params["key"])
    return {"type": "key_accepted", "user": user, "trust": contact.trust}


# --- SAS verification --------------------------------------------------------------------------


def _codes_json(flow: SasFlow, codes: verification.SasCodes) -> dict[str, Any]:
    return {
        "type": "verification_codes",
        "id": flow.id,
        "user": flow.user,
        "emoji": [{"symbol": symbol, "name": name} for symbol, name in codes.emoji],
        "decimals": list(codes.decimals),
    }


async def _run_sas(ctx: GatewayContext, flow: SasFlow) -> None:
    """The whole exchange; its end is published as ``verification_done`` or ``_failed``."""

    async def compare(codes: verification.SasCodes) -> bool:
        flow.codes = codes
        ctx.hub.publish(_codes_json(flow, codes))
        try:
            return await asyncio.wait_for(asyncio.shield(flow.answer), verification.STEP_TIMEOUT_S)
        except TimeoutError:
            return False  # nobody said they match: refuse

    try:
        await verification.verify_interactively(ctx.client, flow.user, compare)
    except BastionError as exc:
        ctx.hub.publish(
            {"type": "verification_failed", "id": flow.id, "user": flow.user, "reason": str(exc)}
        )
        raise
    finally:
        flows(ctx).sas.pop(flow.id, None)
    ctx.hub.publish(
        {"type": "verification_done", "id": flow.id, "user": flow.user, "trust": "verified"}
    )


async def verify_sas_start(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Start verifying a user by comparing codes, or answer their request if one waits."""
    ctx.require_online()
    user = params["user"]
    running = flows(ctx).sas
    if any(f.user == user for f in running.values()):
        raise StateError(f"a verification with {user} is already running")
    flow = SasFlow(
        id=secrets.token_hex(8), user=user, answer=asyncio.get_running_loop().create_future()
    )
    running[flow.id] = flow
    flow.task = asyncio.create_task(_run_sas(ctx, flow))
    flow.task.add_done_callback(_quiet)
    return {"type": "verification_started", "id": flow.id, "user": user}


def _quiet(task: asyncio.Task[None]) -> None:
    """Retrieve a background flow's exception: its end was published as an event."""
    if not task.cancelled() and task.exception() is not None:
        log.info("gateway flow ended: %s", type(task.exception()).__name__)


def _flow(ctx: GatewayContext, flow_id: str) -> SasFlow:
    flow = flows(ctx).sas.get(flow_id)
    if flow is None:
        raise MethodError("not_found", "no verification with this id is running")
    return flow


async def verify_sas_confirm(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """The user says the codes match: finish, and answer once the other side confirmed too."""
    flow = _flow(ctx, params["id"])
    if flow.codes is None:
        raise StateError("the codes are not shown yet: wait for the verification_codes event")
    if not flow.answer.done():
        flow.answer.set_result(True)
    await asyncio.wait({flow.task}, timeout=verification.STEP_TIMEOUT_S + 5)
    if not flow.task.done():
        raise MethodError(
            "verification_failed", "the other side did not finish in time", {"id": flow.id}
        )
    if flow.task.cancelled():
        raise MethodError("verification_failed", "the verification was cancelled", {"id": flow.id})
    failure = flow.task.exception()
    if failure is not None:
        reason = str(failure) if isinstance(failure, BastionError) else "the verification failed"
        raise MethodError("verification_failed", reason, {"id": flow.id})
    return {"type": "verification_done", "id": flow.id, "user": flow.user, "trust": "verified"}


async def verify_sas_cancel(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Stop a verification (the codes differ, or the user gave up); nothing is marked."""
    flow = _flow(ctx, params["id"])
    if flow.codes is not None and not flow.answer.done():
        flow.answer.set_result(False)  # the other side is told the codes did not match
    else:
        flow.task.cancel()
    await asyncio.wait({flow.task}, timeout=10)
    flows(ctx).sas.pop(flow.id, None)
    return {"type": "verification_cancelled", "id": flow.id, "user": flow.user}


# --- devices, export, server --------------------------------------------------------------------


async def devices_list(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """This account's certified devices, this one marked."""
    ctx.require_online()
    mine = ctx.client.account.device_id
    listed = await devices.list_devices(ctx.client)
    return [device_json(d.device_id, d.created_at, this_device=d.device_id == mine) for d in listed]


async def devices_link(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Offer a one-time code for a new device; the outcome comes as a ``linked`` event.

    ``history`` (``all``, a number of days, or ``none``, the default) is what
    this device sends the new one before the account (see ``link_history``).
    """
    ctx.require_online()
    choice = link_history.parse_choice(str(params.get("history", "none")))
    shown: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def show(code: str) -> None:
        if not shown.done():
            shown.set_result(code)

    async def run() -> None:
        try:
            linked = await devices.offer_link(ctx.client, show, history=choice)
        except (BastionError, TimeoutError) as exc:
            reason = str(exc) or "nobody used the code in time"
            ctx.hub.publish({"type": "link_failed", "reason": reason})
            if not shown.done():
                shown.set_exception(exc)
            raise
        ctx.hub.publish(linked_json(linked.device_id, linked.history))

    task = asyncio.create_task(run())
    links = flows(ctx).links
    links.add(task)
    task.add_done_callback(links.discard)
    task.add_done_callback(_quiet)
    try:
        code = await asyncio.wait_for(asyncio.shield(shown), 30)
    except TimeoutError:
        task.cancel()
        raise MethodError("timeout", "the server did not open a link slot in time") from None
    return {
        "type": "link_code",
        "code": code,
        "server": ctx.client.account.server_url,
        "expires_in_s": int(devices.LINK_WAIT_S),
    }


async def devices_revoke(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Revoke another device of this account (signed with the account key)."""
    ctx.require_online()
    await devices.revoke_device(ctx.client, params["device"])
    return {"type": "revoked", "device": params["device"]}


async def account_export(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Write the account key and server pins to a new file, sealed under the given passphrase."""
    file = absolute(params["file"], "file")
    if file.exists():
        raise StateError("that file exists already; the export never overwrites a file")
    # On the loop's thread: the profile's database belongs to it (the key derivation
    # holds the gateway up for about a second, as the command would).
    devices.export_account(ctx.client, file, params["passphrase"])
    return {"type": "exported", "file": str(file)}


async def server_info(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """The server's pins and its signed policy, as ``bastion server-info --json``."""
    return server_info_json(ctx.client)


METHODS: dict[str, ContextMethod] = {
    "verify.number": verify_number,
    "verify.confirm": verify_confirm,
    "verify.sas_start": verify_sas_start,
    "verify.sas_confirm": verify_sas_confirm,
    "verify.sas_cancel": verify_sas_cancel,
    "trust.accept_new_key": trust_accept_new_key,
    "devices.list": devices_list,
    "devices.link": devices_link,
    "devices.revoke": devices_revoke,
    "account.export": account_export,
    "server.info": server_info,
}
