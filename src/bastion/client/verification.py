"""Interactive verification (SAS) between two devices, over end-to-end encrypted messages.

Flow (every step is a signed Olm payload, so only the two certified devices take part)::

    starter                          responder
    verify.start {txn}        ->
                              <-     verify.accept {commitment = H(responder key, start)}
    verify.key {starter key}  ->
                              <-     verify.key {responder key}   (starter checks the commitment)
    both show 7 emoji / 3 numbers; the users compare them
    verify.mac {MAC(own account key)}  <->  (each checks it against the key pinned at start)

The verification is bound to the account keys pinned when it started (the
failure behind Matrix CVE-2022-39250 was to accept whatever key came later): a
key that changes in between makes it fail, never succeed for the new key.
When both users start at the same time, the device with the smaller
(user, device) pair stays the starter and the other answers.

A peer cannot pile up requests: each of their devices has at most one pending
request (a new start replaces the old one), at most ``max_requests_per_peer``
devices of one user and ``max_requests_total`` requests in all are kept, a
request is forgotten once its starter would have timed out, and a user is
prompted once while any request of theirs is pending.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from bastion.client import trust
from bastion.client._util import now_ms
from bastion.client.events import FeatureEvent
from bastion.client.feature import ClientCore, FeatureSpec, Hooks
from bastion.client.records import DeviceEntry
from bastion.crypto.payload import Payload
from bastion.crypto.safety import safety_number
from bastion.crypto.sas import EstablishedSas, SasKeys, commitment
from bastion.crypto.signing import signing_input
from bastion.errors import AuthenticationError, SecurityError, StateError
from bastion.protocol import frames

KINDS = ("verify.start", "verify.accept", "verify.key", "verify.mac", "verify.cancel")
STEP_TIMEOUT_S = 120.0
EXTENSION = "verification"
MAX_REQUESTS_PER_PEER = 3
MAX_REQUESTS_TOTAL = 32


class VerificationFailed(SecurityError):
    """A verification was cancelled, timed out, or its codes or MACs did not match."""


class VerificationBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """What a verification payload's body carries (JSON)."""

    txn: str
    from_device: str
    to_device: str
    commitment: str = ""
    key: str = ""
    mac: str = ""
    reason: str = ""


@dataclass(frozen=True)
class VerificationRequestEvent(FeatureEvent):
    """Someone asks to verify with this device."""

    user: str
    device: str
    txn: str
    at: int

    def to_json(self) -> dict[str, Any]:
        return {"type": "verification_request", "from": self.user, "device": self.device,
                "txn": self.txn, "at": self.at}  # fmt: skip

    def describe(self) -> str:
        return f"{self.user} asks to verify: run 'bastion verify {self.user} --sas' to answer"


@dataclass(frozen=True)
class VerificationCancelledEvent(FeatureEvent):
    """The other side cancelled a verification."""

    user: str
    txn: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"type": "verification_cancelled", "from": self.user, "txn": self.txn,
                "reason": self.reason}  # fmt: skip

    def describe(self) -> str:
        return f"{self.user} cancelled the verification: {self.reason}"


@dataclass(frozen=True)
class SasCodes:
    """What both users compare."""

    emoji: list[tuple[str, str]]
    decimals: tuple[int, int, int]

    def __str__(self) -> str:
        symbols = "  ".join(symbol for symbol, _ in self.emoji)
        names = ", ".join(name for _, name in self.emoji)
        numbers = " ".join(f"{n:04d}" for n in self.decimals)
        return f"{symbols}\n({names})\nor the numbers: {numbers}"


@dataclass
class _Request:
    user: str
    device: str
    body: VerificationBody
    raw: bytes
    at: int


class _Yield(Exception):
    def __init__(self, request: _Request) -> None:
        super().__init__("yield to the other side's start")
        self.request = request


@dataclass
class _State:
    sessions: dict[str, SasVerification] = field(default_factory=dict)
    requests: dict[str, _Request] = field(default_factory=dict)
    max_requests_per_peer: int = MAX_REQUESTS_PER_PEER
    max_requests_total: int = MAX_REQUESTS_TOTAL
    request_lifetime_ms: int = int(STEP_TIMEOUT_S * 1000)

    def remember(self, request: _Request) -> bool:
        """Keep a request within the limits; True if the user should be prompted."""
        for txn, old in list(self.requests.items()):
            if request.at - old.at > self.request_lifetime_ms:
                del self.requests[txn]  # its starter has given up by now
        theirs = [r for r in self.requests.values() if r.user == request.user]
        for old in theirs:
            if old.device == request.device:  # a device starting again replaces its request
                del self.requests[old.body.txn]
        devices = {r.device for r in self.requests.values() if r.user == request.user}
        if len(devices) >= self.max_requests_per_peer:
            return False
        if len(self.requests) >= self.max_requests_total:
            return False
        self.requests[request.body.txn] = request
        return not theirs


def _state(client: ClientCore) -> _State:
    state = client.extensions.get(EXTENSION)
    if not isinstance(state, _State):
        state = _State()
        client.extensions[EXTENSION] = state
    return state


def _encode(body: VerificationBody) -> str:
    return json.dumps(msgspec.to_builtins(body), sort_keys=True)


class SasVerification:
    """One verification with one device of another user."""

    def __init__(
        self,
        client: ClientCore,
        peer: str,
        txn: str,
        *,
        starter: bool,
        start_raw: bytes,
        pinned_key: bytes,
        peer_device: str | None = None,
        step_timeout_s: float = STEP_TIMEOUT_S,
    ) -> None:
        self.client = client
        self.peer = peer
        self.txn = txn
        self.starter = starter
        self.start_raw = start_raw
        self.pinned_key = pinned_key
        self.peer_device = peer_device
        self.step_timeout_s = step_timeout_s
        self.inbox: asyncio.Queue[tuple[str, VerificationBody] | _Yield] = asyncio.Queue()
        self._keys = SasKeys()
        self._established: EstablishedSas | None = None
        self._info = b""
        self.done = False

    # --- plumbing -------------------------------------------------------------------------

    async def _send(self, kind: str, **fields: str) -> None:
        body = VerificationBody(
            txn=self.txn,
            from_device=self.client.account.device_id,
            to_device=self.peer_device or "*",
            **fields,
        )
        await self.client.send_payload(self.peer, kind, _encode(body), history=False)

    async def _expect(self, kind: str) -> VerificationBody:
        try:
            item = await asyncio.wait_for(self.inbox.get(), self.step_timeout_s)
        except TimeoutError:
            await self.cancel("timed out")
            raise VerificationFailed("the verification timed out") from None
        if isinstance(item, _Yield):
            raise item
        got, body = item
        if got == "verify.cancel":
            self._forget()
            raise VerificationFailed(f"{self.peer} cancelled: {body.reason or 'no reason'}")
        if got != kind:
            await self.cancel("unexpected step")
            raise VerificationFailed(f"expected {kind}, got {got}")
        return body

    def _forget(self) -> None:
        _state(self.client).sessions.pop(self.txn, None)

    async def cancel(self, reason: str) -> None:
        """Tell the other side and stop."""
        self._forget()
        if not self.done:
            await self._send("verify.cancel", reason=reason[:200])

    # --- the exchange ---------------------------------------------------------------------

    async def exchange(self) -> SasCodes:
        """Run the key exchange; returns the codes to compare."""
        me = (self.client.account.username, self.client.account.device_id)
        if self.starter:
            accept = await self._expect("verify.accept")
            self.peer_device = accept.from_device
            await self._send("verify.key", key=self._keys.public_key)
            theirs = await self._expect("verify.key")
            if commitment(theirs.key, self.start_raw) != accept.commitment:
                await self.cancel("commitment mismatch")
                raise VerificationFailed("the other side's key does not match its commitment")
            starter = (*me, self._keys.public_key)
            responder = (self.peer, self.peer_device, theirs.key)
        else:
            await self._send(
                "verify.accept", commitment=commitment(self._keys.public_key, self.start_raw)
            )
            theirs = await self._expect("verify.key")
            await self._send("verify.key", key=self._keys.public_key)
            starter = (self.peer, self.peer_device or "", theirs.key)
            responder = (*me, self._keys.public_key)
        try:
            self._established = self._keys.establish(theirs.key)
        except AuthenticationError as exc:
            await self.cancel("unusable key")
            raise VerificationFailed(str(exc)) from None
        self._info = signing_input("bastion/v1/sas-info", [self.txn, *starter, *responder])
        emoji, decimals = self._established.codes(self._info)
        return SasCodes(emoji, decimals)

    def _mac_info(self, user: str, device: str) -> bytes:
        return signing_input("bastion/v1/sas-mac-info", [self._info, user, device])

    async def confirm(self) -> None:
        """The user says the codes match: exchange MACs and mark the contact verified.

        Raises VerificationFailed if the other side's MAC does not cover the key
        pinned when the verification started.
        """
        if self._established is None or self.peer_device is None:
            raise StateError("compare the codes first")
        client = self.client
        me = client.account.username
        own = self._established.mac(
            client.identity().public_bytes, self._mac_info(me, client.account.device_id)
        )
        await self._send("verify.mac", mac=own)
        theirs = await self._expect("verify.mac")
        try:
            self._established.verify_mac(
                self.pinned_key, self._mac_info(self.peer, self.peer_device), theirs.mac
            )
        except AuthenticationError:
            await self.cancel("key mismatch")
            raise VerificationFailed(
                f"{self.peer}'s account key is not the one pinned when this started"
            ) from None
        number = safety_number(me, client.identity().public_bytes, self.peer, self.pinned_key)
        trust.mark_verified(client, self.peer, number)
        self.done = True
        self._forget()


# --- receiving ------------------------------------------------------------------------------


def install(client: ClientCore, hooks: Hooks) -> None:
    """Register the verification payload handlers for ``client`` (default limits)."""
    set_limits(client)
    for kind in KINDS:
        hooks.payloads.add(kind, functools.partial(_handle, client))


FEATURE = FeatureSpec("verification", install)


def set_limits(
    client: ClientCore,
    *,
    max_requests_per_peer: int = MAX_REQUESTS_PER_PEER,
    max_requests_total: int = MAX_REQUESTS_TOTAL,
) -> None:
    """Bound the requests of ``client`` that wait for an answer.

    At most ``max_requests_per_peer`` devices of one user, and ``max_requests_total``
    requests in all, wait for an answer; more are dropped without a prompt.
    """
    state = _state(client)
    state.max_requests_per_peer = max_requests_per_peer
    state.max_requests_total = max_requests_total


def _handle(
    client: ClientCore, payload: Payload, sender: DeviceEntry, deliver: frames.Deliver
) -> FeatureEvent | None:
    del sender, deliver
    try:
        body = msgspec.json.decode(payload.body, type=VerificationBody)
    except msgspec.MsgspecError:
        return None
    me = client.account
    if payload.sender == me.username or body.from_device != payload.sender_device:
        return None  # our own copy, or a body that lies about its device
    if body.to_device not in ("*", me.device_id):
        return None  # meant for another of our devices
    state = _state(client)
    if payload.kind == "verify.start":
        request = _Request(
            payload.sender, payload.sender_device, body, payload.body.encode(), now_ms()
        )
        for mine in state.sessions.values():
            if mine.peer == payload.sender and mine.starter and mine.peer_device is None:
                # Both sides started: the smaller (user, device) stays the starter.
                if (me.username, me.device_id) < (payload.sender, payload.sender_device):
                    return None
                mine.inbox.put_nowait(_Yield(request))
                return None
        if not state.remember(request):
            return None  # already prompted for this user, or over a limit
        return VerificationRequestEvent(
            user=payload.sender, device=payload.sender_device, txn=body.txn, at=request.at
        )
    session = state.sessions.get(body.txn)
    if session is None or session.peer != payload.sender:
        if payload.kind == "verify.cancel":
            state.requests.pop(body.txn, None)
        return None
    if session.peer_device is not None and session.peer_device != payload.sender_device:
        return None  # another device of theirs answered too late
    session.inbox.put_nowait((payload.kind, body))
    if payload.kind == "verify.cancel":
        return VerificationCancelledEvent(user=payload.sender, txn=body.txn, reason=body.reason)
    return None


# --- starting and answering ---------------------------------------------------------------


async def start(
    client: ClientCore, user: str, *, step_timeout_s: float = STEP_TIMEOUT_S
) -> SasVerification:
    """Ask ``user``'s devices to verify; the first to answer takes part."""
    contact = await trust.pinned_contact(client, user)
    if contact.trust == "changed":
        raise StateError(f"{user}'s key changed: accept or refuse it before verifying")
    txn = secrets.token_hex(16)
    body = VerificationBody(txn=txn, from_device=client.account.device_id, to_device="*")
    raw = _encode(body)
    session = SasVerification(
        client, user, txn, starter=True, start_raw=raw.encode(),
        pinned_key=contact.identity_key, step_timeout_s=step_timeout_s,
    )  # fmt: skip
    state = _state(client)
    state.sessions[txn] = session
    # Their request may have arrived while we were getting ready: the same rule as
    # for crossing starts decides who answers.
    me = (client.account.username, client.account.device_id)
    for other in list(state.requests.values()):
        if other.user == user and me > (other.user, other.device):
            del state.requests[other.body.txn]
            session.inbox.put_nowait(_Yield(other))
            return session
    await client.send_payload(user, "verify.start", raw, history=False)
    return session


def accept(
    client: ClientCore, txn: str, *, step_timeout_s: float = STEP_TIMEOUT_S
) -> SasVerification:
    """Answer a pending request; raises StateError if there is none with that id."""
    state = _state(client)
    request = state.requests.pop(txn, None)
    if request is None:
        raise StateError("no such verification request")
    contact = client.contact(request.user)
    if contact is None or contact.trust == "changed":
        raise StateError(f"{request.user}'s key is not settled: verify after deciding on it")
    session = SasVerification(
        client, request.user, txn, starter=False, start_raw=request.raw,
        pinned_key=contact.identity_key, peer_device=request.device,
        step_timeout_s=step_timeout_s,
    )  # fmt: skip
    state.sessions[txn] = session
    return session


def pending_request(client: ClientCore, user: str) -> str | None:
    """The id of the newest pending request from ``user`` that has not timed out, if any."""
    state = _state(client)
    now = now_ms()
    theirs = [
        r
        for r in state.requests.values()
        if r.user == user and now - r.at <= state.request_lifetime_ms
    ]
    return max(theirs, key=lambda r: r.at).body.txn if theirs else None


async def verify_interactively(
    client: ClientCore,
    user: str,
    compare: Callable[[SasCodes], Awaitable[bool]],
    *,
    step_timeout_s: float = STEP_TIMEOUT_S,
) -> None:
    """Verify ``user`` end to end: answer their request or start one, show codes, finish.

    ``compare`` shows the codes and returns whether the user says they match.
    The client's receive loop must be running. Raises VerificationFailed.
    """
    txn = pending_request(client, user)
    if txn is not None:
        session = accept(client, txn, step_timeout_s=step_timeout_s)
    else:
        session = await start(client, user, step_timeout_s=step_timeout_s)
    try:
        codes = await session.exchange()
    except _Yield as yielded:
        _state(client).sessions.pop(session.txn, None)
        _state(client).requests[yielded.request.body.txn] = yielded.request
        session = accept(client, yielded.request.body.txn, step_timeout_s=step_timeout_s)
        codes = await session.exchange()
    if not await compare(codes):
        await session.cancel("the codes did not match")
        raise VerificationFailed("the codes did not match; nothing was marked verified")
    await session.confirm()
