"""The client core: register, sign in, send and receive end-to-end encrypted messages.

Front ends use it through :mod:`bastion.client` (whose ``Client`` installs the
default features); this module imports no feature: each is handed the client
as a :class:`~bastion.client.feature.ClientCore` and registers its handlers in
the client's :class:`~bastion.client.feature.Hooks`. Every received message is
decrypted, its signature and sender binding checked, and de-duplicated before
anything is stored or shown; a message that fails any check becomes a
:class:`WarningEvent`, never a message.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import typing
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Self

import msgspec

from bastion.client import device_list, receiving, replies
from bastion.client._util import TRANSIENT_ERRORS, UNANSWERED, check_username, now_ms
from bastion.client.events import (
    DevicesChangedEvent,
    Event,
    KeyChangedEvent,
    MessageEvent,
    WarningEvent,
)
from bastion.client.feature import Feature, install_all
from bastion.client.group_keys import ROOM_KEY_KIND
from bastion.client.profile import Profile
from bastion.client.records import (
    AccountInfo,
    ContactRecord,
    DeviceEntry,
    HistoryRecord,
    Stats,
)
from bastion.client.transport import ServerConnection, _Closed
from bastion.crypto.device import DeviceCertificate, verify_published_key
from bastion.crypto.olm import PRE_KEY, OlmDevice, OlmSession
from bastion.crypto.payload import Payload, direct_conversation, open_signed, seal
from bastion.crypto.signing import AccountIdentity
from bastion.errors import (
    AuthenticationError,
    DeviceListError,
    KeyChangedError,
    ProfileError,
    RejectedMessageError,
    ServerRefusedError,
    UntrustedServerError,
)
from bastion.protocol import frames
from bastion.protocol.auth import register_message, signin_message

ONE_TIME_KEY_TARGET = 40
ONE_TIME_KEY_LOW = 15
RETRY_LOOKBACK = 50  # how far back a retry looks for the failed copy it replaces
MAX_TEXT_CHARS = 16_000


def check_text(text: str) -> str:
    """Return ``text`` if it can be sent as a message; raise ValueError saying why not."""
    if not text:
        raise ValueError("the message is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError("the message is longer than 16,000 characters")
    return text


def _envelope_key(deliver: frames.Deliver) -> str:
    """What identifies a redelivery: the queue position and the exact ciphertext.

    The body's hash is part of it so a reused position (a server database restored
    from a backup) can never make a different message look like a duplicate.
    """
    return f"{deliver.seq}:{hashlib.sha256(deliver.body).hexdigest()[:32]}"


class SendRefusedError(ServerRefusedError):
    """The server refused a message; ``record`` is its history entry, now marked failed."""

    def __init__(self, code: str, message: str, record: HistoryRecord) -> None:
        super().__init__(code, message)
        self.record = record


class Client:
    """One unlocked device profile and, once connected, its server connection.

    ``features`` are installed once, here, in order; with none the client sends and
    receives text and nothing else (any other payload kind is refused as unknown).
    """

    def __init__(
        self, profile: Profile, account: AccountInfo, *, features: Sequence[Feature] = ()
    ) -> None:
        self.profile = profile
        self.account = account
        self.conn: ServerConnection | None = None
        self.notices: list[Event] = []
        self.failed: list[HistoryRecord] = []
        # Kept messages the last connect() handed to the server (see send_payload).
        self.flushed: list[HistoryRecord] = []
        self._receiving: int | None = None  # see bastion.client.receiving
        self.extensions: dict[str, object] = {}  # per-client state of features
        # What the features registered: handlers of checked payloads by kind, of server pushes
        # by frame type, of envelopes that are not Olm messages, and the connect/batch hooks.
        self.hooks = install_all(features, self)

    # --- opening and registering ------------------------------------------------------------

    @staticmethod
    def exists(path: Path) -> bool:
        """Whether a profile is stored in the folder ``path``."""
        return Profile.exists(path)

    @classmethod
    def open(cls, path: Path, passphrase: str) -> Self:
        """Unlock an existing profile; raises :class:`ProfileError`."""
        profile = Profile.unlock(path, passphrase)
        account = profile.get("account", AccountInfo)
        if account is None:
            profile.close()
            raise ProfileError("the profile holds no account; register or link first")
        return cls(profile, account)

    @classmethod
    async def register(
        cls,
        path: Path,
        passphrase: str,
        *,
        username: str,
        server_url: str,
        fingerprint: str | None = None,
        invite: str | None = None,
    ) -> Self:
        """Create an account and its first device on a server, and a profile for it.

        With no ``fingerprint`` the server's certificate is trusted on first use
        and pinned. Raises ValueError for a bad username, ServerRefusedError if
        the server refuses (e.g. the name is taken), UntrustedServerError on a
        certificate mismatch.
        """
        check_username(username)
        conn = await ServerConnection.open(server_url, pin=fingerprint, pin_given=True)
        try:
            challenge = conn.challenge
            with Profile.provisional(path, passphrase) as profile:
                client = await cls._register_on(
                    conn, profile, username, server_url, challenge, invite=invite
                )
        finally:
            await conn.aclose()
        return client

    @classmethod
    async def _register_on(
        cls,
        conn: ServerConnection,
        profile: Profile,
        username: str,
        server_url: str,
        challenge: frames.Challenge,
        *,
        invite: str | None = None,
    ) -> Self:
        return await cls.enroll(
            conn,
            profile,
            identity=AccountIdentity.generate(),
            device=OlmDevice.create(),
            username=username,
            server_url=server_url,
            challenge=challenge,
            new_account=True,
            invite=invite,
        )

    @classmethod
    async def enroll(
        cls,
        conn: ServerConnection,
        profile: Profile,
        *,
        identity: AccountIdentity,
        device: OlmDevice,
        username: str,
        server_url: str,
        challenge: frames.Challenge,
        new_account: bool,
        invite: str | None = None,
    ) -> Self:
        """Certify ``device`` under the account key, save the profile, and register it.

        With ``new_account`` the account is created; otherwise the device joins
        the existing account (after linking or importing).
        """
        created = now_ms()
        cert = DeviceCertificate.issue(
            identity,
            username=username,
            ed25519=device.ed25519,
            curve25519=device.curve25519,
            created_at=created,
        )
        otks = device.new_one_time_keys(ONE_TIME_KEY_TARGET)
        fallback = device.new_fallback_key()
        if conn.fingerprint is None:
            raise UntrustedServerError("the server presented no certificate")
        account = AccountInfo(
            username=username,
            server_url=server_url,
            fingerprint=conn.fingerprint,
            server_name=challenge.server_name,
            device_id=device.device_id,
            created_at=created,
        )
        with profile.transaction():
            profile.put("account", account)
            profile.put("identity", identity.private_bytes())
            profile.put("device", device.pickle(profile.pickle_key))
            profile.put(
                "contact:" + username,
                ContactRecord(user=username, identity_key=identity.public_bytes, trust="self"),
            )
        keys = frames.DeviceKeys(
            device_id=device.device_id,
            ed25519=device.ed25519,
            curve25519=device.curve25519,
            created_at=created,
            certificate=cert.signature,
        )
        signature = device.sign(
            register_message(challenge.server_name, challenge.nonce, username, device.device_id)
        )
        signed_otks = [frames.SignedKey(key=k.key, signature=k.signature) for k in otks]
        signed_fallback = frames.SignedKey(key=fallback.key, signature=fallback.signature)
        req = conn.next_req()
        frame: frames.Register | frames.AddDevice
        if new_account:
            frame = frames.Register(
                req=req,
                username=username,
                identity_key=identity.public_bytes,
                device=keys,
                signature=signature,
                one_time_keys=signed_otks,
                fallback_key=signed_fallback,
                receive=False,
                invite=invite,
            )
        else:
            frame = frames.AddDevice(
                req=req,
                username=username,
                device=keys,
                signature=signature,
                one_time_keys=signed_otks,
                fallback_key=signed_fallback,
                receive=False,
            )
        await conn.request(frame, req)
        client = cls(profile, account)
        client.conn = conn  # signed in by the registration; borrowed to publish the list
        try:
            await client.devices_of(username, publish_missing_list=False)
            own = client.contact(username)
            if own is None or device.device_id not in own.listed_devices:
                await device_list.update_own_list(client, add=[device.device_id])
        except ServerRefusedError:
            pass  # published on this device's next look at its own account
        finally:
            client.conn = None
        return client

    def identity(self) -> AccountIdentity:
        """The account identity key (private), from the encrypted profile."""
        raw = self.profile.get("identity", bytes)
        if raw is None:
            raise ProfileError("the profile holds no account key")
        return AccountIdentity.from_private_bytes(raw)

    # --- connection ---------------------------------------------------------------------------

    async def connect(self, *, receive: bool = True) -> None:
        """Connect and sign in; with ``receive`` the server starts delivering the queue."""
        conn = await ServerConnection.open(self.account.server_url, pin=self.account.fingerprint)
        try:
            challenge = conn.challenge
            if challenge.version != frames.PROTOCOL_VERSION:
                raise ServerRefusedError(
                    "version",
                    f"the server speaks protocol version {challenge.version}; "
                    f"this client speaks {frames.PROTOCOL_VERSION}",
                )
            if challenge.server_name != self.account.server_name:
                raise UntrustedServerError(
                    f"the server calls itself {challenge.server_name!r}, not "
                    f"{self.account.server_name!r}; refusing to sign in"
                )
            device = self.device()
            req = conn.next_req()
            reply = await conn.request(
                frames.SignIn(
                    req=req,
                    username=self.account.username,
                    device_id=self.account.device_id,
                    signature=device.sign(
                        signin_message(
                            challenge.server_name,
                            challenge.nonce,
                            self.account.username,
                            self.account.device_id,
                        )
                    ),
                    receive=receive,
                ),
                req,
            )
        except BaseException:
            await conn.aclose()
            raise
        self.conn = conn
        try:
            for hook in self.hooks.on_connect:
                await hook()
        except BaseException:
            self.conn = None
            await conn.aclose()
            raise
        if isinstance(reply, frames.SignedIn) and reply.one_time_keys < ONE_TIME_KEY_LOW:
            await self.top_up_keys(reply.one_time_keys)
        if receive and self._receiving is None:
            self._receiving = receiving.hold(self.profile.path)
        self.flushed = []
        self.failed = await self.flush_outbox()

    async def close(self) -> None:
        """Disconnect (if connected) and close the profile."""
        if self.conn is not None:
            await self.conn.aclose()
            self.conn = None
        if self._receiving is not None:
            os.close(self._receiving)
            self._receiving = None
        self.profile.close()

    def connection(self) -> ServerConnection:
        """The open server connection; raises ServerRefusedError ``disconnected``."""
        if self.conn is None:
            raise ServerRefusedError("disconnected", "not connected to the server")
        return self.conn

    async def request(self, frame: frames.Frame) -> frames.ServerFrame:
        """Send ``frame`` with a fresh request number and wait for its answer.

        Raises ServerRefusedError (``disconnected`` when not connected, or the
        server's refusal).
        """
        conn = self.connection()
        req = conn.next_req()
        return await conn.request(msgspec.structs.replace(frame, req=req), req)

    def notify(self, *events: Event) -> None:
        """Add ``events`` to :attr:`notices` (yielded by :meth:`receive` before its next event)."""
        self.notices.extend(events)

    def device(self) -> OlmDevice:
        """This device's Olm account (private), from the encrypted profile."""
        pickle = self.profile.get("device", str)
        if pickle is None:
            raise ProfileError("the profile holds no device keys")
        return OlmDevice.from_pickle(pickle, self.profile.pickle_key)

    async def top_up_keys(self, current: int) -> None:
        """Publish fresh one-time keys so the stock is back at its target."""
        count = ONE_TIME_KEY_TARGET - current
        if count <= 0:
            return
        with self.profile.transaction():
            device = self.device()
            keys = device.new_one_time_keys(count)
            self.profile.put("device", device.pickle(self.profile.pickle_key))
        conn = self.connection()
        req = conn.next_req()
        await conn.request(
            frames.UploadKeys(
                req=req,
                one_time_keys=[frames.SignedKey(key=k.key, signature=k.signature) for k in keys],
            ),
            req,
        )

    # --- key directory ------------------------------------------------------------------------

    def contact(self, user: str) -> ContactRecord | None:
        """The pinned record of a user, if any."""
        return self.profile.get("contact:" + user, ContactRecord)

    async def devices_of(
        self, user: str, *, publish_missing_list: bool = True
    ) -> list[DeviceEntry]:
        """A user's devices whose certificates verify under the pinned account key.

        Pins the account key on first sight. Raises ValueError for a name the
        server would refuse (at once, without asking), :class:`KeyChangedError`
        when the server shows a different key than the pinned one, and
        :class:`DeviceListError` when the answer fails the signed device list
        (see :mod:`bastion.client.device_list`). A change in the device set is
        added to :attr:`notices`. For this account with no signed list yet,
        ``publish_missing_list`` publishes the first one.
        """
        check_username(user)
        conn = self.connection()
        req = conn.next_req()
        reply = await conn.request(frames.QueryKeys(req=req, user=user), req)
        if not isinstance(reply, frames.KeysResult) or reply.user != user:
            raise RejectedMessageError("the server answered a key query for someone else")
        pinned = self.contact(user)
        if pinned is not None and pinned.identity_key != reply.identity_key:
            if user != self.account.username:
                with self.profile.transaction():
                    self.profile.put(
                        "contact:" + user,
                        msgspec.structs.replace(
                            pinned, trust="changed", pending_key=reply.identity_key
                        ),
                    )
            raise KeyChangedError(user)
        # A device not certified by the account key is never encrypted to.
        devices = [
            entry
            for d in reply.devices
            if (entry := device_list.certified_device(user, reply.identity_key, d)) is not None
        ]
        me = self.account.username
        signed = device_list.checked_list(
            user, reply, devices, pinned, this_device=self.account.device_id if user == me else None
        )
        if pinned is None:
            record = ContactRecord(user=user, identity_key=reply.identity_key, devices=devices)
        else:
            record = msgspec.structs.replace(pinned, devices=devices)
            before = {d.device_id for d in pinned.devices}
            after = {d.device_id for d in devices}
            if pinned.devices and before != after:
                added = [d for d in devices if d.device_id not in before]
                added.sort(key=lambda d: d.device_id)
                self.notices.append(
                    DevicesChangedEvent(
                        user=user,
                        added=tuple(d.device_id for d in added),
                        removed=tuple(sorted(before - after)),
                        at=now_ms(),
                        certified_at=tuple(d.created_at for d in added),
                        own_account=user == self.account.username,
                    )
                )
        with self.profile.transaction():
            self.profile.put("contact:" + user, device_list.pinned_record(record, signed))
        if signed is None and user == self.account.username and publish_missing_list:
            await device_list.update_own_list(self)
        return devices

    async def _claim_sessions(self, user: str, devices: list[DeviceEntry]) -> None:
        """Start Olm sessions with those of ``devices`` we have none with yet."""
        missing = [d for d in devices if not self.profile.sessions(d.curve25519)]
        if not missing:
            return
        conn = self.connection()
        req = conn.next_req()
        reply = await conn.request(frames.ClaimKeys(req=req, user=user), req)
        if not isinstance(reply, frames.ClaimResult) or reply.user != user:
            raise RejectedMessageError("the server answered a key claim for someone else")
        by_id = {d.device_id: d for d in missing}
        with self.profile.transaction():
            device = self.device()
            for claimed in reply.keys:
                target = by_id.get(claimed.device_id)
                if target is None or self.profile.sessions(target.curve25519):
                    continue
                verify_published_key(
                    target.ed25519,
                    target.device_id,
                    claimed.key,
                    claimed.signature,
                    fallback=claimed.fallback,
                )
                session = device.outbound_session(target.curve25519, claimed.key)
                self.profile.save_session(
                    target.curve25519,
                    session.session_id,
                    session.pickle(self.profile.pickle_key),
                    now_ms(),
                )

    # --- sending ------------------------------------------------------------------------------

    async def send_text(
        self,
        to: str,
        text: str,
        *,
        message_id: bytes | None = None,
        reply_to: bytes | None = None,
    ) -> HistoryRecord:
        """Encrypt ``text`` to every device of ``to`` (and our other devices) and send it.

        Returns once the server has stored it durably. ``message_id`` is that of
        a history entry written earlier (a message queued while offline); by
        default a new one. ``reply_to`` quotes a message of this conversation by
        its id (see :mod:`bastion.client.replies`). Raises ValueError for bad
        input (a quoted message of another conversation too), KeyChangedError if
        ``to``'s account key changed, ServerRefusedError.
        """
        check_text(text)
        if reply_to is None:
            return await self.send_payload(to, "text", text, message_id=message_id)
        check_username(to)
        quoted = self.profile.message(reply_to, HistoryRecord)
        if quoted is None or quoted.conversation != direct_conversation(self.account.username, to):
            raise ValueError(f"no message with this id in the conversation with {to}")
        body = replies.encode(text, reply_to)
        return await self.send_payload(to, replies.KIND, body, message_id=message_id)

    async def send_payload(
        self,
        to: str,
        kind: str,
        body: str,
        *,
        history: bool = True,
        group_id: bytes | None = None,
        message_id: bytes | None = None,
    ) -> HistoryRecord:
        """Encrypt a signed payload of ``kind`` to every device of ``to`` and our others.

        ``text`` payloads go into the history; other kinds (verification steps,
        contact notes, file offers...) are handled by whoever registered a
        handler for that kind on the receiving side. ``group_id`` sends a room key
        of that group on its room-key path (members need not be contacts; the
        receiver accepts nothing but a room key that way). ``message_id`` as for
        :meth:`send_text`. Raises like :meth:`send_text`.
        """
        check_username(to)
        if to == self.account.username:
            raise ValueError("you cannot send a message to yourself")
        contact = self.contact(to)
        if contact is not None and contact.trust == "changed":
            raise KeyChangedError(to)
        if message_id is None:
            retried = self._failed_copy(to, body) if history else None
            message_id = retried or secrets.token_bytes(16)
        for attempt in range(2):
            theirs = await self.devices_of(to)
            if not theirs:
                raise ServerRefusedError("no_devices", f"{to} has no usable device")
            mine = [
                d
                for d in await self.devices_of(self.account.username)
                if d.device_id != self.account.device_id
            ]
            await self._claim_sessions(to, theirs)
            await self._claim_sessions(self.account.username, mine)
            frame, record = self._encrypt(
                message_id,
                to,
                kind,
                body,
                [(to, d) for d in theirs] + [(self.account.username, d) for d in mine],
                history=history,
                group_id=group_id,
            )
            conn = self.connection()
            req = conn.next_req()
            try:
                reply = await conn.request(msgspec.structs.replace(frame, req=req), req)
            except ServerRefusedError as exc:
                if exc.code == "device_mismatch" and attempt == 0:
                    continue
                if exc.code in UNANSWERED:
                    raise  # kept in the outbox: it goes out (once) on the next connection
                failed = self._mark_failed(record, exc.message)
                raise SendRefusedError(exc.code, exc.message, failed) from None
            return self._mark_sent(record, reply)
        raise ServerRefusedError("device_mismatch", "the recipient's devices keep changing")

    async def send_payload_to_devices(
        self,
        to: str,
        theirs: list[DeviceEntry],
        mine: list[DeviceEntry],
        kind: str,
        body: str,
        *,
        group_id: bytes | None = None,
    ) -> HistoryRecord:
        """Encrypt a signed payload of ``kind`` to exactly ``theirs`` and ``mine``, and send it.

        No key-directory lookup happens here: the caller has checked these
        devices (``theirs`` of ``to``, ``mine`` our own other devices), and nothing
        else gets a copy. A room key goes to the device set checked against a
        group's chain in this one step (DESIGN §5). Nothing is kept in the
        history. Raises ValueError, ServerRefusedError (``device_mismatch`` when
        the server's device list is not the checked one: then nothing is sent).
        ``group_id`` sends a room key of that group on its room-key path, as
        :meth:`send_payload` does.
        """
        check_username(to)
        if to == self.account.username:
            raise ValueError("you cannot send a message to yourself")
        if not theirs:
            raise ServerRefusedError("no_devices", f"{to} has no checked device")
        me = self.account.username
        await self._claim_sessions(to, theirs)
        await self._claim_sessions(me, mine)
        message_id = secrets.token_bytes(16)
        frame, record = self._encrypt(
            message_id,
            to,
            kind,
            body,
            [(to, d) for d in theirs] + [(me, d) for d in mine],
            history=False,
            group_id=group_id,
        )
        conn = self.connection()
        req = conn.next_req()
        try:
            reply = await conn.request(msgspec.structs.replace(frame, req=req), req)
        except ServerRefusedError as exc:
            if exc.code not in TRANSIENT_ERRORS:
                with self.profile.transaction():
                    self.profile.sent(message_id)  # refused for good: never resent
            raise
        return self._mark_sent(record, reply)

    def _encrypt(
        self,
        message_id: bytes,
        to: str,
        kind: str,
        text: str,
        targets: list[tuple[str, DeviceEntry]],
        *,
        history: bool = True,
        group_id: bytes | None = None,
    ) -> tuple[frames.Send, HistoryRecord]:
        me = self.account.username
        sent_at = now_ms()
        conversation = direct_conversation(me, to)
        ciphertexts = []
        with self.profile.transaction():
            device = self.device()
            for user, target in targets:
                sessions = self.profile.sessions(target.curve25519)
                if not sessions:
                    raise ServerRefusedError(
                        "no_session", f"could not start a session with {user}'s device"
                    )
                session = OlmSession.from_pickle(sessions[0][1], self.profile.pickle_key)
                plaintext = seal(
                    Payload(
                        kind=kind,
                        sender=me,
                        sender_device=self.account.device_id,
                        recipient=to,
                        to=user,
                        to_device=target.device_id,
                        conversation=conversation,
                        message_id=message_id,
                        sent_at=sent_at,
                        body=text,
                    ),
                    device.sign,
                )
                olm_kind, body = session.encrypt(plaintext)
                self.profile.save_session(
                    target.curve25519,
                    session.session_id,
                    session.pickle(self.profile.pickle_key),
                    now_ms(),
                )
                ciphertexts.append(
                    frames.DeviceCiphertext(
                        user=user, device_id=target.device_id, kind=olm_kind, body=body
                    )
                )
            frame = frames.Send(
                req=0, client_msg_id=message_id, to=to, ciphertexts=ciphertexts, group_id=group_id
            )
            if len(frames.encode(frame)) > frames.MAX_FRAME_BYTES:
                raise ValueError(
                    "the message is too long to send to this many devices; split it up"
                )
            shown, reply_to = (text, None) if kind != replies.KIND else replies.decode(text)
            record = HistoryRecord(
                id=message_id,
                sender=me,
                device=self.account.device_id,
                peer=to,
                conversation=conversation,
                text=shown,
                sent_at=sent_at,
                server_ts=0,
                direction="out",
                state="pending",
                reply_to=reply_to,
            )
            if history and not self.profile.add_message(conversation, message_id, record):
                self.profile.update_message(message_id, record)
            self.profile.queue_outgoing(message_id, frames.encode(frame))
        return frame, record

    def _failed_copy(self, to: str, text: str) -> bytes | None:
        """The id of a recent refused copy of this message, so a retry replaces it."""
        for record in reversed(self.history(to, limit=RETRY_LOOKBACK)):
            if record.direction == "out" and record.state == "failed" and record.text == text:
                return record.id
        return None

    def _mark_failed(self, record: HistoryRecord, reason: str) -> HistoryRecord:
        """The server refused ``record``: it is not kept for resending, and shows as failed."""
        failed = msgspec.structs.replace(record, state="failed", reason=reason)
        with self.profile.transaction():
            self.profile.update_message(record.id, failed)
            self.profile.sent(record.id)
        return failed

    def _mark_sent(self, record: HistoryRecord, reply: frames.ServerFrame) -> HistoryRecord:
        server_ts = reply.server_ts if isinstance(reply, frames.Sent) else now_ms()
        sent = msgspec.structs.replace(record, state="sent", server_ts=server_ts, reason="")
        with self.profile.transaction():
            self.profile.update_message(record.id, sent)
            self.profile.sent(record.id)
        return sent

    async def flush_outbox(self) -> list[HistoryRecord]:
        """Resend messages encrypted but not yet acknowledged (same id: stored once).

        A message the server refuses for good (the recipient's devices or account
        changed meanwhile) is marked failed, never re-encrypted to new keys behind
        the user's back; those records are returned so a front end can say so.
        """
        conn = self.connection()
        failed = []
        for raw in self.profile.outgoing():
            frame = msgspec.msgpack.decode(raw, type=frames.Send)
            req = conn.next_req()
            record = self.profile.message(frame.client_msg_id, HistoryRecord)
            try:
                reply = await conn.request(msgspec.structs.replace(frame, req=req), req)
            except ServerRefusedError as exc:
                if exc.code in TRANSIENT_ERRORS:
                    raise
                with self.profile.transaction():
                    self.profile.sent(frame.client_msg_id)
                    if record is not None:
                        record = msgspec.structs.replace(record, state="failed", reason=exc.message)
                        self.profile.update_message(record.id, record)
                if record is not None:
                    failed.append(record)
                continue
            if record is not None:
                self.flushed.append(self._mark_sent(record, reply))
            else:
                with self.profile.transaction():
                    self.profile.sent(frame.client_msg_id)
        return failed

    # --- receiving ----------------------------------------------------------------------------

    async def receive(self, *, until_synced: bool = False) -> AsyncIterator[Event]:
        """Yield events as envelopes arrive, acknowledging each after it is stored.

        With ``until_synced`` it stops once everything queued at sign-in was
        handled; otherwise it runs until the connection closes.
        """
        conn = self.connection()
        batch: list[Event] = []
        while True:
            item = await conn.incoming.get()
            if isinstance(item, _Closed):
                if until_synced:
                    raise ServerRefusedError("disconnected", item.reason)
                return
            if not isinstance(item, frames.Deliver):
                if batch and (until_synced or conn.incoming.empty()):
                    # A batch ends at whatever is not a delivery too (the `synced` after
                    # the sign-in queue, say): its hooks must not wait for the next message.
                    await self._run_batch_hooks(batch)
                    batch = []
                if isinstance(item, frames.Synced):
                    if until_synced:
                        return
                    continue
                if isinstance(item, frames.KeysLow):
                    await self.top_up_keys(item.one_time_keys)
                    continue
                if isinstance(item, frames.LinkPush):
                    continue  # only the linking flow reads these
                push = self.hooks.pushes.get(type(item))
                notice = await push(item) if push is not None else None
                if notice is not None:
                    yield notice
                continue
            event = await self.process(item)
            if not isinstance(event, KeyChangedEvent):
                conn.send(frames.Ack(seqs=[item.seq]))
            notices, self.notices = self.notices, []
            if event is not None:
                batch.append(event)
            if batch and conn.incoming.empty():
                # The batch is stored; hooks (delivery receipts) run before it is shown.
                await self._run_batch_hooks(batch)
                batch = []
            for notice in notices:
                yield notice
            if event is not None:
                yield event

    async def _run_batch_hooks(self, batch: list[Event]) -> None:
        for hook in self.hooks.on_batch:
            await hook(batch)

    async def process(self, deliver: frames.Deliver) -> Event | None:
        """Decrypt and check one envelope; store it if it passes. None for a duplicate."""
        envelope = _envelope_key(deliver)
        if self.profile.seen("env", envelope):
            return None
        if deliver.kind not in {0, 1, frames.ROOM_KEY_PATH, frames.ROOM_KEY_PATH + 1}:
            special = self.hooks.envelopes.get(deliver.kind)
            if special is not None:
                handled = await special(deliver)
                if isinstance(handled, WarningEvent):  # a rejected group message, say
                    with self.profile.transaction():
                        self._count_rejected()
                return handled
        try:
            sender_device = await self._sender_device(deliver.sender, deliver.sender_device)
            with self.profile.transaction():
                return self._accept(deliver, sender_device)
        except KeyChangedError:
            # Not acknowledged and not marked seen: it waits on the server until the
            # user accepts or refuses the new key.
            return KeyChangedEvent(user=deliver.sender, at=deliver.server_ts)
        except (RejectedMessageError, AuthenticationError) as exc:
            reason = exc.reason if isinstance(exc, RejectedMessageError) else str(exc)
            with self.profile.transaction():
                self.profile.mark_seen("env", envelope)
                self._count_rejected()
            return WarningEvent(
                reason=reason,
                sender=deliver.sender,
                device=deliver.sender_device,
                at=deliver.server_ts,
            )

    def _count_rejected(self) -> None:
        """Add one to the rejected-messages counter (inside the caller's transaction)."""
        stats = self.profile.get("stats", Stats) or Stats()
        self.profile.put("stats", msgspec.structs.replace(stats, rejected=stats.rejected + 1))

    async def _sender_device(self, user: str, device_id: str) -> DeviceEntry:
        contact = self.contact(user)
        if contact is not None and contact.trust == "changed":
            raise KeyChangedError(user)
        known = {d.device_id: d for d in contact.devices} if contact is not None else {}
        if device_id not in known:
            try:
                known = {d.device_id: d for d in await self.devices_of(user)}
            except ServerRefusedError as exc:
                if exc.code in TRANSIENT_ERRORS:
                    raise  # not acknowledged: it is delivered again on the next connection
                raise RejectedMessageError("sender is unknown to the server") from None
            except DeviceListError as exc:
                raise RejectedMessageError(str(exc)) from None
        if device_id not in known:
            raise RejectedMessageError("sender device has no valid certificate")
        return known[device_id]

    def _accept(self, deliver: frames.Deliver, sender: DeviceEntry) -> Event | None:
        device = self.device()
        account_changed = False
        plaintext: bytes | None = None
        session: OlmSession | None = None
        # An Olm message on a group's room-key path (the relay let it past the contact
        # gate for two members of one group) may carry a room key and nothing else.
        room_key_path = deliver.kind >= frames.ROOM_KEY_PATH
        olm_kind = deliver.kind - frames.ROOM_KEY_PATH if room_key_path else deliver.kind
        for _sid, pickle in self.profile.sessions(sender.curve25519):
            candidate = OlmSession.from_pickle(pickle, self.profile.pickle_key)
            if olm_kind == PRE_KEY and not candidate.matches(deliver.body):
                continue
            try:
                plaintext = candidate.decrypt(olm_kind, deliver.body)
            except AuthenticationError:
                continue
            session = candidate
            break
        if session is None and olm_kind == PRE_KEY:
            session, plaintext = device.inbound_session(sender.curve25519, deliver.body)
            account_changed = True
        if session is None or plaintext is None:
            raise RejectedMessageError("message could not be decrypted")
        me = self.account.username
        payload = open_signed(
            plaintext,
            sender=deliver.sender,
            sender_device=deliver.sender_device,
            sender_ed25519=sender.ed25519,
            me=me,
            my_device=self.account.device_id,
        )
        replay_key = payload.sender + "\0" + payload.message_id.hex()
        if self.profile.seen("msg", replay_key):
            raise RejectedMessageError("replayed message")
        if room_key_path and payload.kind != ROOM_KEY_KIND:
            raise RejectedMessageError(
                "a group member who is not your contact sent something other than a room key"
            )
        handler = None
        text, reply_to = payload.body, None
        if payload.kind == replies.KIND:
            text, reply_to = replies.decode(payload.body)
            quoted = self.profile.message(reply_to, HistoryRecord)
            if quoted is not None and quoted.conversation != payload.conversation:
                raise RejectedMessageError("the reply quotes a message of another conversation")
        elif payload.kind != "text":
            handler = self.hooks.payloads.get(payload.kind)
            if handler is None:
                raise RejectedMessageError(f"unknown message kind {payload.kind!r}")
        outgoing = payload.sender == me
        peer = payload.recipient if outgoing else payload.sender
        record = HistoryRecord(
            id=payload.message_id,
            sender=payload.sender,
            device=payload.sender_device,
            peer=peer,
            conversation=payload.conversation,
            text=text,
            sent_at=payload.sent_at,
            server_ts=deliver.server_ts,
            direction="out" if outgoing else "in",
            state="sent" if outgoing else "received",
            reply_to=reply_to,
        )
        self.profile.save_session(
            sender.curve25519, session.session_id, session.pickle(self.profile.pickle_key), now_ms()
        )
        if account_changed:
            self.profile.put("device", device.pickle(self.profile.pickle_key))
        self.profile.mark_seen("env", _envelope_key(deliver))
        self.profile.mark_seen("msg", replay_key)
        if handler is not None:
            # Everything was checked; the handler may write to the profile (same transaction).
            return handler(payload, sender, deliver)
        self.profile.add_message(payload.conversation, payload.message_id, record)
        contact = self.contact(peer)
        return MessageEvent(
            record=record, verified=contact is not None and contact.trust == "verified"
        )

    # --- local queries ------------------------------------------------------------------------

    def history(self, peer: str, *, limit: int = 1000) -> list[HistoryRecord]:
        """The conversation with ``peer`` from the local encrypted store, oldest first."""
        check_username(peer)
        return self.profile.history(
            direct_conversation(self.account.username, peer), HistoryRecord, limit=limit
        )

    def stats(self) -> Stats:
        """Counters (messages rejected so far)."""
        return self.profile.get("stats", Stats) or Stats()

    # --- for front ends: the connection and the profile without reaching inside ---------------

    FRONT_ENDS = ("chat",)
    """Front ends that keep their own records in the profile, as ``NAME:WHAT`` (see below)."""

    @staticmethod
    def profile_exists(path: Path) -> bool:
        """Whether ``path`` holds a profile, so :meth:`open` can unlock it."""
        return Profile.exists(path)

    @staticmethod
    async def server_fingerprint(server_url: str) -> str:
        """The certificate fingerprint the server at ``server_url`` shows, with nothing pinned.

        For a person to compare with the one the operator gave them before pinning
        it; nothing is trusted, signed in or stored. Raises what connecting raises
        (:class:`~bastion.errors.ServerRefusedError`, ``OSError``, ``TimeoutError``).
        """
        probe = await ServerConnection.open(server_url, pin=None)
        await probe.aclose()
        return probe.fingerprint or ""

    @property
    def connected(self) -> bool:
        """Whether :meth:`connect` succeeded and no :meth:`disconnect` or :meth:`close` came since.

        The connection may have dropped since; :meth:`receive` ends when it does.
        """
        return self.conn is not None

    @property
    def close_reason(self) -> str | None:
        """Why the server closed the connection, if it said so (None while connected)."""
        return self.conn.close_reason if self.conn is not None else None

    async def disconnect(self) -> None:
        """Close the connection, if any; the profile stays open and :meth:`connect` may follow."""
        if self.conn is not None:
            await self.conn.aclose()
            self.conn = None

    def message(self, message_id: bytes) -> HistoryRecord | None:
        """A message of the local history by its id, in its latest state (sent, failed …)."""
        return self.profile.message(message_id, HistoryRecord)

    def receiving_elsewhere(self) -> bool:
        """Whether a receiver holds this profile right now: another process (``listen``,
        ``chat``), or this client itself once connected with ``receive``.
        """
        return receiving.held_elsewhere(self.profile.path)

    def front_end_record(self, name: str, kind: type[_Record]) -> _Record | None:
        """A front end's own record, stored encrypted in the profile; None if never saved.

        ``name`` is ``FRONT_END:WHAT`` with a front end of :attr:`FRONT_ENDS` (the
        chat app keeps its conversation list as ``chat:conversations``), so a
        front end never reads or overwrites the library's records.
        """
        return self.profile.get(self._front_end_name(name), kind)

    def save_front_end_record(self, name: str, value: object) -> None:
        """Store a front end's own record (see :meth:`front_end_record`) in one transaction."""
        key = self._front_end_name(name)
        with self.profile.transaction():
            self.profile.put(key, value)

    def _front_end_name(self, name: str) -> str:
        front_end, colon, what = name.partition(":")
        if front_end not in self.FRONT_ENDS or not colon or not what:
            raise ValueError(f"not a front end's record name: {name!r}")
        return name


_Record = typing.TypeVar("_Record")  # a record a front end stores (Client.front_end_record)
