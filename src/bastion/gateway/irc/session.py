"""One IRC client of the gateway: registration, commands, and live events shown as IRC.

One IRC user is the profile's account: the password is the gateway's token,
and whatever nick the client asks for becomes the account's username. Direct
messages are queries with the peer's nick, each group a channel
(:mod:`.channels`), contacts a buddy list (MONITOR, ISON), presence AWAY, and
everything else the gateway has to say (changed keys, unverified senders,
rejected messages, file offers, refused sends) a NOTICE from ``*bastion``.
docs/gateway.md has the whole mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from bastion.client import USERNAME_RE, comparison, contacts, group_invites, groups, trust
from bastion.errors import BastionError, KeyChangedError, ServerRefusedError, StateError
from bastion.gateway import paths, rpc
from bastion.gateway.context import GatewayContext
from bastion.gateway.hub import Subscription
from bastion.gateway.irc.channels import ChannelBook, ChannelView, base_channel, fold, names_params
from bastion.gateway.irc.protocol import (
    SERVER,
    SERVICE,
    SERVICE_PREFIX,
    Message,
    clean_name,
    clean_text,
    ctcp_commands,
    escape_line,
    line,
    outgoing_text,
    parse,
    text_lines,
    user_prefix,
)
from bastion.gateway.methods import contacts as contact_methods
from bastion.gateway.methods import files as file_methods
from bastion.gateway.methods import messages as message_methods
from bastion.gateway.rpc import MethodError

log = logging.getLogger(__name__)

REGISTRATION_S = 60.0  # to send PASS, NICK and USER
IDLE_S = 240.0  # silence before the gateway sends PING
PING_S = 90.0  # to answer it
WRITE_S = 60.0  # an IRC client that reads nothing for this long is dropped
FLOOD_BURST = 120  # lines at once...
FLOOD_RATE = 20.0  # ...then lines a second, before a client is disconnected for flooding
SUPPORTED_CAPS = frozenset({"away-notify"})
MAX_MONITOR = 100
AWAY_STATES = frozenset({"away", "busy"})
ISUPPORT = (
    "CHANTYPES=#",
    "PREFIX=(o)@",
    "CHANMODES=b,,,nt",
    "CASEMAPPING=ascii",
    "NICKLEN=32",
    "CHANNELLEN=50",
    "TOPICLEN=256",
    f"MONITOR={MAX_MONITOR}",
    "AWAYLEN=140",
    "NETWORK=bastion",
)


class Door(Protocol):
    """What a session needs of its door."""

    ctx: GatewayContext
    token: str

    def echo(self, origin: IrcSession, target: str, text: str) -> None: ...


class Closing(Exception):
    """End the session after an ERROR line was sent."""


class IrcSession:
    """An IRC client connected to the door, from its first line to QUIT."""

    def __init__(
        self, door: Door, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.door = door
        self.ctx = door.ctx
        self.reader = reader
        self.writer = writer
        self.nick = "*"
        self.given_nick: str | None = None
        self.user_given = False
        self.password: str | None = None
        self.cap_negotiating = False
        self.caps: set[str] = set()
        self.registered = False
        self.book = ChannelBook()
        self.views: dict[bytes, ChannelView] = {}
        self.monitored: dict[str, None] = {}  # ordered set
        self.presence: dict[str, tuple[str, str | None]] = {}
        self.told_unverified: set[str] = set()
        self.invited: set[bytes] = set()  # invitations shown and not answered
        self.connection_state = ""
        self.rpc = rpc.BasicSession()
        self.sub: Subscription | None = None
        self.pump: asyncio.Task[None] | None = None
        self.write_lock = asyncio.Lock()
        self.tokens = float(FLOOD_BURST)
        self.last_line = time.monotonic()
        self.pinged = False

    # --- the connection -------------------------------------------------------------------------

    async def run(self) -> None:
        """Read and answer lines until the client quits, breaks a limit or the door closes."""
        try:
            while True:
                raw = await self._next_line()
                if raw is None:
                    return
                if not self._take_token():
                    await self.error("Excess flood")
                    return
                try:
                    message = parse(raw)
                except ValueError:
                    continue
                if message is not None:
                    await self.handle(message)
        except Closing:
            return
        finally:
            await self._stop()

    async def _next_line(self) -> bytes | None:
        while True:
            timeout = REGISTRATION_S if not self.registered else (PING_S if self.pinged else IDLE_S)
            try:
                raw = await asyncio.wait_for(self.reader.readuntil(b"\n"), timeout)
            except asyncio.IncompleteReadError:
                return None
            except asyncio.LimitOverrunError:
                await self.error("Line too long (the limit is 8 KiB)")
                return None
            except TimeoutError:
                if not self.registered:
                    await self.error("Registration timed out")
                    return None
                if self.pinged:
                    await self.error("Ping timeout")
                    return None
                self.pinged = True
                await self.send(line(None, "PING", SERVER))
                continue
            self.pinged = False
            return raw

    def _take_token(self) -> bool:
        now = time.monotonic()
        self.tokens = min(FLOOD_BURST, self.tokens + (now - self.last_line) * FLOOD_RATE)
        self.last_line = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    async def _stop(self) -> None:
        if self.sub is not None:
            self.sub.close()
        if self.pump is not None:
            self.pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.pump
        self.registered = False

    async def send(self, *lines: bytes) -> None:
        """Write lines to the client (whole lines, in order, from the command loop and the pump)."""
        if not lines:
            return
        async with self.write_lock:
            if self.writer.is_closing():
                raise ConnectionResetError("the IRC client is gone")
            self.writer.write(b"".join(lines))
            try:
                await asyncio.wait_for(self.writer.drain(), WRITE_S)
            except TimeoutError:
                self.writer.close()
                raise ConnectionResetError("the IRC client reads nothing") from None

    async def error(self, reason: str) -> None:
        """Send ERROR and close (the client broke a limit or quit)."""
        with contextlib.suppress(ConnectionError):
            await self.send(line(None, "ERROR", f"Closing link: {reason}"))
        self.writer.close()

    def num(self, code: str, *params: str) -> bytes:
        """A numeric reply to our client."""
        return line(SERVER, code, self.nick, *params)

    def notice_lines(self, text: str) -> list[bytes]:
        return text_lines(SERVICE_PREFIX, "NOTICE", self.nick, [escape_line(text)])

    async def notice(self, text: str) -> None:
        """A NOTICE from ``*bastion`` (text from peers in it is shown escaped)."""
        await self.send(*self.notice_lines(text))

    @property
    def me(self) -> str:
        return self.ctx.client.account.username

    def show_own(self, target: str, text: str) -> None:
        """Our user sent ``text`` from another IRC client: show it here too."""
        lines = text_lines(user_prefix(self.me), "PRIVMSG", target, clean_text(text, self.me))
        task = asyncio.get_running_loop().create_task(self.send(*lines))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # --- commands -------------------------------------------------------------------------------

    async def handle(self, message: Message) -> None:
        """Answer one command."""
        early: dict[str, Callable[[list[str]], Awaitable[None]]] = {
            "CAP": self.on_cap,
            "PASS": self.on_pass,
            "NICK": self.on_nick,
            "USER": self.on_user,
            "PING": self.on_ping,
            "PONG": self.on_pong,
            "QUIT": self.on_quit,
        }
        later: dict[str, Callable[[list[str]], Awaitable[None]]] = {
            "PRIVMSG": self.on_privmsg,
            "NOTICE": self.on_notice,
            "JOIN": self.on_join,
            "PART": self.on_part,
            "TOPIC": self.on_topic,
            "INVITE": self.on_invite,
            "KICK": self.on_kick,
            "MODE": self.on_mode,
            "NAMES": self.on_names,
            "WHO": self.on_who,
            "WHOIS": self.on_whois,
            "LIST": self.on_list,
            "ISON": self.on_ison,
            "MONITOR": self.on_monitor,
            "AWAY": self.on_away,
            "MOTD": self.on_motd,
        }
        handler = early.get(message.command)
        if handler is None:
            handler = later.get(message.command)
            if handler is not None and not self.registered:
                await self.send(self.num("451", "You have not registered"))
                return
        if handler is None:
            await self.send(self.num("421", message.command[:32], "Unknown command"))
            return
        try:
            await handler(message.params)
        except Closing:
            raise
        except ConnectionError:
            raise Closing from None
        except Exception as exc:
            # Never the exception's text: it may hold anything. The log names the type only.
            log.error("IRC command %s failed: %s", message.command, type(exc).__name__)
            await self.notice(f"{message.command} failed: the gateway could not do it")

    async def need(self, params: list[str], count: int, command: str) -> bool:
        if len(params) >= count:
            return True
        await self.send(self.num("461", command, "Not enough parameters"))
        return False

    # --- registration ---------------------------------------------------------------------------

    async def on_cap(self, params: list[str]) -> None:
        sub = params[0].upper() if params else ""
        if sub == "LS":
            if not self.registered:
                self.cap_negotiating = True
            await self.send(line(SERVER, "CAP", self.nick, "LS", " ".join(sorted(SUPPORTED_CAPS))))
        elif sub == "LIST":
            await self.send(line(SERVER, "CAP", self.nick, "LIST", " ".join(sorted(self.caps))))
        elif sub == "REQ":
            if not self.registered:
                self.cap_negotiating = True
            wanted = params[1].split() if len(params) > 1 else []
            names = {w.lstrip("-") for w in wanted}
            if wanted and names <= SUPPORTED_CAPS:
                for w in wanted:
                    if w.startswith("-"):
                        self.caps.discard(w[1:])
                    else:
                        self.caps.add(w)
                await self.send(line(SERVER, "CAP", self.nick, "ACK", " ".join(wanted)))
            else:
                await self.send(line(SERVER, "CAP", self.nick, "NAK", " ".join(wanted)))
        elif sub == "END":
            self.cap_negotiating = False
            await self.register()
        else:
            await self.send(self.num("410", sub[:16] or "*", "Invalid CAP command"))

    async def on_pass(self, params: list[str]) -> None:
        if self.registered:
            await self.send(self.num("462", "You may not reregister"))
        elif await self.need(params, 1, "PASS"):
            self.password = params[0]

    async def on_nick(self, params: list[str]) -> None:
        if not params or not params[0]:
            await self.send(self.num("431", "No nickname given"))
            return
        if self.registered:
            if params[0] != self.nick:
                await self.send(
                    self.num("432", params[0][:32], "Your nick is your account's username here")
                )
            return
        self.given_nick = params[0][:64]
        await self.register()

    async def on_user(self, params: list[str]) -> None:
        if self.registered:
            await self.send(self.num("462", "You may not reregister"))
        elif await self.need(params, 1, "USER"):
            self.user_given = True
            await self.register()

    async def on_ping(self, params: list[str]) -> None:
        await self.send(line(SERVER, "PONG", SERVER, params[0] if params else SERVER))

    async def on_pong(self, params: list[str]) -> None:
        self.pinged = False

    async def on_quit(self, params: list[str]) -> None:
        await self.error("Quit")
        raise Closing

    async def on_motd(self, params: list[str]) -> None:
        await self.send(self.num("422", "MOTD File is missing"))

    async def register(self) -> None:
        """Finish registration once NICK and USER came (and CAP END, if CAP was used)."""
        if self.registered or self.given_nick is None or not self.user_given:
            return
        if self.cap_negotiating:
            return
        if not paths.token_matches(self.password, self.door.token):
            log.warning("refused an IRC client: wrong password")
            await self.send(
                line(SERVER, "464", self.given_nick.replace(" ", "_") or "*", "Password incorrect")
            )
            await self.error("Password incorrect: the password is the gateway's token")
            raise Closing
        client = self.ctx.client
        me = self.me
        self.sub = self.ctx.hub.subscribe()
        self.registered = True
        lines: list[bytes] = []
        if self.given_nick != me:
            lines.append(line(user_prefix(self.given_nick), "NICK", me))
        self.nick = me
        lines += [
            self.num(
                "001", f"Welcome to Bastion, {me}: end-to-end encrypted, through your gateway"
            ),
            self.num("002", f"Your host is {SERVER}, the gateway of {me}"),
            self.num("003", "This server was started with the gateway"),
            self.num("004", SERVER, "bastion", "i", "bnot"),
            self.num("005", *ISUPPORT, "are supported by this server"),
            self.num("422", "MOTD File is missing"),
        ]
        await self.send(*lines)
        await self.notice(
            f"Connected as {me}. Direct messages: /query USER. Groups are channels. "
            f"/whois USER shows a contact's safety number. Notices about security come from "
            f"{SERVICE}."
        )
        for contact in contacts.local_contacts(client):
            self.presence[contact.user] = (contact.presence, contact.status)
        invites = []
        if self.ctx.online:
            with contextlib.suppress(BastionError):
                invites = await group_invites.pending(client)
        waiting = {bytes.fromhex(invite.group_id) for invite in invites}
        for state in groups.groups(client):
            if me in state.members and state.group_id not in waiting:
                await self.join_view(state)
        for invite in invites:
            await self.show_invite(invite.to_json())
        self.pump = asyncio.create_task(self.forward(self.sub))

    # --- direct messages and groups ----------------------------------------------------------

    async def on_notice(self, params: list[str]) -> None:
        """NOTICEs from the IRC client (CTCP replies, mostly) are not sent to anyone."""

    async def on_privmsg(self, params: list[str]) -> None:
        if not params:
            await self.send(self.num("411", "No recipient given (PRIVMSG)"))
            return
        if len(params) < 2 or not params[1]:
            await self.send(self.num("412", "No text to send"))
            return
        for target in params[0].split(",")[:4]:
            # Nicks compare without case (CASEMAPPING=ascii); usernames are lower case.
            await self.privmsg(target if target.startswith("#") else target.lower(), params[1])

    async def privmsg(self, target: str, raw: str) -> None:
        if target.lower() == SERVICE:
            await self.service_command(raw)
            return
        text = outgoing_text(raw, self.me)
        if text is None:
            await self.notice("CTCP requests are not sent to peers; only /me is (as text)")
            return
        if not text.strip():
            await self.send(self.num("412", "No text to send"))
            return
        if target.startswith("#"):
            await self.send_group(target, text)
        else:
            await self.send_direct(target, text)

    async def service_command(self, raw: str) -> None:
        """What ``/msg *bastion ...`` asks for: the file list, fetching a file, or help."""
        words = raw.split()
        command = words[0].lower() if words else ""
        if command == "files" and len(words) == 1:
            listing = await file_methods.files_list(self.ctx, self.rpc, {})
            if not listing:
                await self.notice("no files were offered to you")
            for item in listing:
                await self.notice(self.file_line(item))
            return
        if command == "get" and len(words) == 2:
            params = {"id": words[1]}
            problem = rpc.check_params("files.get", params)
            if problem is not None:
                await self.notice(f"not fetched: {problem}")
                return
            await self.notice(f"fetching {clean_name(words[1])}: downloading, checking, scanning")
            try:
                got = await file_methods.files_get(self.ctx, self.rpc, params)
            except (BastionError, ValueError) as exc:
                await self.notice(f"not fetched: {exc}")
                return
            await self.notice(self.file_line(got))
            return
        await self.notice(
            "I am the gateway. /query USER to message a contact, /join #name to open or "
            "create a group, /whois USER for a safety number. To me: 'files' lists the files "
            "offered to you with their scan verdicts, 'get ID' downloads, checks and scans one "
            "(saved only if clean); see docs/gateway.md."
        )

    @staticmethod
    def file_line(item: dict[str, Any]) -> str:
        """One file with its state and the scan's verdict, for a NOTICE."""
        verdict = item.get("verdict")
        reasons = "; ".join(str(r) for r in item.get("reasons") or [])
        line = (
            f"file {item.get('id')} from {item.get('from')}: {item.get('name')!r}, "
            f"{item.get('size')} bytes, {item.get('state')}"
        )
        if verdict:
            line += f", scan verdict: {verdict}" + (f" ({reasons})" if reasons else "")
        if item.get("saved_to"):
            line += f", saved to {item.get('saved_to')}"
        elif verdict and verdict != "clean":
            line += ", NOT saved: it stays in quarantine (bastion file get ID --allow-blocked)"
        return line

    async def send_direct(self, target: str, text: str) -> None:
        if not USERNAME_RE.fullmatch(target):
            await self.send(self.num("401", target[:64], "No such nick: not a Bastion username"))
            return
        params = {"to": target, "text": text}
        problem = rpc.check_params("send", params)
        if problem is not None:
            await self.notice(f"not sent to {target}: {problem}")
            return
        try:
            sent = await message_methods.send(self.ctx, self.rpc, params)
        except KeyChangedError:
            await self.notice(self.key_changed_text(target, refused=True))
            return
        except MethodError as exc:
            await self.notice(f"not sent to {target}: {exc}")
            return
        except ServerRefusedError as exc:
            await self.notice(f"not sent to {target}: {exc.message}")
            return
        except (BastionError, ValueError) as exc:
            await self.notice(f"not sent to {target}: {exc}")
            return
        if sent["type"] == "queued":
            await self.notice(
                f"queued for {target}: the server cannot be reached; it goes out, in order, "
                "when it can"
            )
        elif sent["type"] == "kept":
            await self.notice(f"kept for {target}: the server's answer was lost; it goes again")
        self.door.echo(self, target, text)

    async def send_group(self, channel: str, text: str) -> None:
        found = await self.joined(channel)
        if found is None:
            return
        state, _view = found
        try:
            self.ctx.require_online()
            await groups.send_text(self.ctx.client, state, text)
        except (BastionError, ValueError) as exc:
            await self.send(self.num("404", channel, "Cannot send to channel"))
            await self.notice(f"not sent to {channel}: {self.reason(exc)}")
            return
        self.door.echo(self, channel, text)

    @staticmethod
    def reason(exc: BastionError | ValueError) -> str:
        return exc.message if isinstance(exc, ServerRefusedError) else str(exc)

    async def joined(self, channel: str) -> tuple[groups.GroupState, ChannelView] | None:
        """The group of a channel the client is in, or None after sending the error."""
        group_id = self.book.group_of(channel)
        view = self.views.get(group_id) if group_id is not None else None
        state = groups.state_of(self.ctx.client, group_id) if group_id is not None else None
        if group_id is None or state is None:
            await self.send(self.num("403", channel[:64], "No such channel"))
            return None
        if view is None or self.me not in state.members:
            await self.send(self.num("442", channel[:64], "You're not on that channel"))
            return None
        return state, view

    async def join_view(self, state: groups.GroupState) -> None:
        """Show a group as a joined channel: JOIN, topic, names (once, while it stays joined)."""
        if state.group_id in self.views:
            return
        channel = self.book.channel_of(state.group_id, state.name)
        view = ChannelView(
            channel=channel, name=state.name, members=set(state.members), admins=set(state.admins)
        )
        self.views[state.group_id] = view
        await self.send(
            line(user_prefix(self.me), "JOIN", channel),
            self.num("332", channel, clean_name(state.name)),
            *self.names_lines(view),
        )

    def names_lines(self, view: ChannelView) -> list[bytes]:
        out = [self.num("353", "=", view.channel, names) for names in names_params(view)]
        return [*out, self.num("366", view.channel, "End of /NAMES list")]

    async def refresh(
        self, group_id: bytes, by: str | None = None, kind: str | None = None
    ) -> None:
        """Show what changed in a group since the client last saw it (JOIN, KICK, MODE, TOPIC)."""
        state = groups.state_of(self.ctx.client, group_id)
        view = self.views.get(group_id)
        me = self.me
        author = user_prefix(by) if by and USERNAME_RE.fullmatch(by) else SERVICE_PREFIX
        if state is None or me not in state.members:
            if view is not None:
                # Forget the channel before writing: a concurrent refresh shows it once only.
                del self.views[group_id]
                self.book.by_channel.pop(fold(view.channel), None)
                self.book.by_group.pop(group_id, None)
                if kind == "leave" and by == me:
                    await self.send(line(user_prefix(me), "PART", view.channel, "left the group"))
                else:
                    await self.send(
                        line(author, "KICK", view.channel, me, "removed from the group")
                    )
            return
        if view is None:
            if by != me and await self.invitation_waits(group_id):
                invite = {"group": group_id.hex(), "name": state.name, "by": by}
                await self.show_invite({**invite, "members": len(state.members)})
            else:
                await self.join_view(state)
            return
        out: list[bytes] = []
        for user in sorted(set(state.members) - view.members):
            if USERNAME_RE.fullmatch(user):
                out.append(line(user_prefix(user), "JOIN", view.channel))
        for user in sorted(view.members - set(state.members)):
            if kind == "leave" and by == user:
                out.append(line(user_prefix(user), "PART", view.channel, "left the group"))
            else:
                out.append(line(author, "KICK", view.channel, user, "removed from the group"))
        for user in sorted(set(state.admins) - view.admins):
            out.append(line(author, "MODE", view.channel, "+o", user))
        for user in sorted((view.admins & set(state.members)) - set(state.admins)):
            out.append(line(author, "MODE", view.channel, "-o", user))
        if state.name != view.name:
            out.append(line(author, "TOPIC", view.channel, clean_name(state.name)))
        view.members, view.admins, view.name = set(state.members), set(state.admins), state.name
        await self.send(*out)

    async def invitation_waits(self, group_id: bytes) -> bool:
        """Whether the server holds an invitation of ours to this group (a JOIN accepts it)."""
        if group_id in self.invited:
            return True
        if not self.ctx.online:
            return False
        try:
            pending = await group_invites.pending(self.ctx.client)
        except BastionError:
            return False
        return any(invite.group_id == group_id.hex() for invite in pending)

    async def on_join(self, params: list[str]) -> None:
        if not await self.need(params, 1, "JOIN"):
            return
        for channel in params[0].split(",")[:8]:
            if channel == "0":
                continue  # "part every channel": leaving groups takes PART, one at a time
            await self.join(channel)

    async def join(self, channel: str) -> None:
        """Open a group's channel: one we are in, an invitation to accept, or a new group."""
        client = self.ctx.client
        if not channel.startswith("#") or len(channel) < 2:
            await self.send(self.num("403", channel[:64], "Channels start with #"))
            return
        group_id = self.book.group_of(channel)
        if group_id is not None and group_id in self.views:
            return
        state = groups.state_of(client, group_id) if group_id is not None else None
        if state is not None and self.me in state.members and group_id not in self.invited:
            await self.join_view(state)
            return
        try:
            self.ctx.require_online()
            for invite in await group_invites.pending(client):
                invited = bytes.fromhex(invite.group_id)
                mapped = self.book.by_group.get(invited)
                if fold(mapped or base_channel(invite.name)) == fold(channel):
                    self.invited.discard(invited)
                    await self.join_view(await group_invites.accept(client, invite.group_id))
                    return
            if state is not None and self.me in state.members:
                self.invited.discard(state.group_id)  # accepted elsewhere meanwhile
                await self.join_view(state)
                return
            name = channel[1:]
            if base_channel(name) != channel:
                await self.send(
                    self.num(
                        "479",
                        channel[:64],
                        "Illegal channel name: a new group's channel takes letters, digits, "
                        "'-', '_' and '.'",
                    )
                )
                return
            state = await groups.create(client, name, [])
        except (BastionError, ValueError) as exc:
            await self.send(self.num("403", channel[:64], "Cannot join channel"))
            await self.notice(f"cannot join {channel}: {self.reason(exc)}")
            return
        self.book.by_channel.pop(fold(channel), None)
        await self.join_view(state)
        await self.notice(f"created the group {state.name!r} ({state.group_id.hex()[:16]})")

    async def change_group(
        self,
        channel: str,
        what: str,
        act: Callable[[groups.GroupState], Awaitable[groups.GroupState]],
        *,
        admin_only: bool = True,
    ) -> bool:
        """Run one change of a group and show it; errors become numerics and a notice."""
        found = await self.joined(channel)
        if found is None:
            return False
        state, _view = found
        try:
            self.ctx.require_online()
            new = await act(state)
        except (BastionError, ValueError) as exc:
            if admin_only and self.me not in state.admins:
                await self.send(self.num("482", channel, "You're not a group admin"))
            await self.notice(f"cannot {what} in {channel}: {self.reason(exc)}")
            return False
        del new
        return True

    async def on_part(self, params: list[str]) -> None:
        if not await self.need(params, 1, "PART"):
            return
        for channel in params[0].split(",")[:8]:
            group_id = self.book.group_of(channel)
            if (
                await self.change_group(
                    channel,
                    "leave the group",
                    lambda s: groups.change(self.ctx.client, s, groups.Leave()),
                    admin_only=False,
                )
                and group_id is not None
            ):
                await self.refresh(group_id, self.me, "leave")

    async def on_topic(self, params: list[str]) -> None:
        if not await self.need(params, 1, "TOPIC"):
            return
        channel = params[0]
        if len(params) == 1:
            found = await self.joined(channel)
            if found is not None:
                await self.send(self.num("332", channel, clean_name(found[0].name)))
            return
        name = params[1]
        group_id = self.book.group_of(channel)
        if (
            await self.change_group(
                channel,
                "rename the group",
                lambda s: groups.change(self.ctx.client, s, groups.Rename(name=name)),
            )
            and group_id is not None
        ):
            await self.refresh(group_id, self.me, "rename")

    async def on_invite(self, params: list[str]) -> None:
        if not await self.need(params, 2, "INVITE"):
            return
        user, channel = params[0].lower(), params[1]
        group_id = self.book.group_of(channel)
        state = groups.state_of(self.ctx.client, group_id) if group_id is not None else None
        if state is not None and user in state.members:
            await self.send(self.num("443", user[:64], channel, "is already on channel"))
            return
        if (
            await self.change_group(
                channel,
                f"add {user}",
                lambda s: groups.add_member(self.ctx.client, s, user),
            )
            and group_id is not None
        ):
            await self.send(self.num("341", user, channel))
            await self.refresh(group_id, self.me, "add_member")

    async def on_kick(self, params: list[str]) -> None:
        if not await self.need(params, 2, "KICK"):
            return
        channel, user = params[0], params[1].lower()
        group_id = self.book.group_of(channel)
        state = groups.state_of(self.ctx.client, group_id) if group_id is not None else None
        if state is not None and user not in state.members:
            await self.send(self.num("441", user[:64], channel, "They aren't on that channel"))
            return
        if (
            await self.change_group(
                channel,
                f"remove {user}",
                lambda s: groups.change(self.ctx.client, s, groups.RemoveMember(user=user)),
            )
            and group_id is not None
        ):
            await self.refresh(group_id, self.me, "remove_member")

    async def on_mode(self, params: list[str]) -> None:
        if not await self.need(params, 1, "MODE"):
            return
        target = params[0]
        if not target.startswith("#"):
            await self.send(self.num("221", "+i"))
            return
        if len(params) == 1:
            if await self.joined(target) is not None:
                await self.send(self.num("324", target, "+nt"))
            return
        modes = params[1]
        if modes.lstrip("+-") == "b" and len(params) == 2:
            await self.send(self.num("368", target, "End of channel ban list"))
            return
        if modes not in ("+o", "-o") or len(params) < 3:
            await self.send(self.num("472", modes[:8], "is unknown mode char to me"))
            return
        user = params[2].lower()
        group_id = self.book.group_of(target)
        change: groups.MemberChange = (
            groups.Promote(user=user) if modes == "+o" else groups.Demote(user=user)
        )
        if (
            await self.change_group(
                target,
                "change admins",
                lambda s: groups.change(self.ctx.client, s, change),
            )
            and group_id is not None
        ):
            await self.refresh(group_id, self.me, "promote" if modes == "+o" else "demote")

    async def on_names(self, params: list[str]) -> None:
        if not params:
            await self.send(self.num("366", "*", "End of /NAMES list"))
            return
        found = await self.joined(params[0])
        if found is not None:
            await self.send(*self.names_lines(found[1]))

    async def on_who(self, params: list[str]) -> None:
        mask = params[0] if params else "*"
        out: list[bytes] = []
        if mask.startswith("#"):
            group_id = self.book.group_of(mask)
            view = self.views.get(group_id) if group_id is not None else None
            members = sorted(view.members) if view is not None else []
            admins = view.admins if view is not None else set()
            for user in members:
                flags = ("G" if self.is_away(user) else "H") + ("@" if user in admins else "")
                out.append(self.num("352", mask, user, SERVER, SERVER, user, flags, f"0 {user}"))
        elif USERNAME_RE.fullmatch(mask):
            flags = "G" if self.is_away(mask) else "H"
            out.append(self.num("352", "*", mask, SERVER, SERVER, mask, flags, f"0 {mask}"))
        await self.send(*out, self.num("315", mask[:64], "End of /WHO list"))

    async def on_list(self, params: list[str]) -> None:
        out = [self.num("321", "Channel", "Users  Name")]
        for view in self.views.values():
            out.append(self.num("322", view.channel, str(len(view.members)), clean_name(view.name)))
        await self.send(*out, self.num("323", "End of /LIST"))

    # --- contacts, presence, trust -----------------------------------------------------------

    def state_of(self, user: str) -> tuple[str, str | None]:
        return self.presence.get(user, ("offline", None))

    def is_away(self, user: str) -> bool:
        return self.state_of(user)[0] in AWAY_STATES

    def is_online(self, user: str) -> bool:
        return user == self.me or self.state_of(user)[0] != "offline"

    async def on_ison(self, params: list[str]) -> None:
        asked = " ".join(params).lower().split()[:64]
        await self.send(self.num("303", " ".join(u for u in asked if self.is_online(u))))

    async def on_monitor(self, params: list[str]) -> None:
        if not await self.need(params, 1, "MONITOR"):
            return
        sub = params[0]
        targets = [t.lower() for t in (params[1] if len(params) > 1 else "").split(",") if t]
        if sub == "+":
            fresh = []
            for target in targets:
                if len(self.monitored) >= MAX_MONITOR:
                    rest = ",".join(t for t in targets if t not in self.monitored)
                    await self.send(
                        self.num("734", str(MAX_MONITOR), rest, "Monitor list is full.")
                    )
                    break
                if USERNAME_RE.fullmatch(target):
                    self.monitored[target] = None
                    fresh.append(target)
            await self.send(*self.monitor_lines(fresh))
        elif sub == "-":
            for target in targets:
                self.monitored.pop(target, None)
        elif sub.upper() == "C":
            self.monitored.clear()
        elif sub.upper() == "L":
            out = [self.num("732", user) for user in self.monitored]
            await self.send(*out, self.num("733", "End of MONITOR list"))
        elif sub.upper() == "S":
            await self.send(*self.monitor_lines(list(self.monitored)))

    def monitor_lines(self, users: list[str]) -> list[bytes]:
        online = [user_prefix(u) for u in users if self.is_online(u)]
        offline = [u for u in users if not self.is_online(u)]
        out = []
        if online:
            out.append(self.num("730", ",".join(online)))
        if offline:
            out.append(self.num("731", ",".join(offline)))
        return out

    async def on_away(self, params: list[str]) -> None:
        status = params[0] if params and params[0] else None
        state = "away" if status else "online"
        body: dict[str, Any] = {"state": state, "status": status[:140] if status else None}
        try:
            await contact_methods.presence_set(self.ctx, self.rpc, body)
        except (BastionError, ValueError) as exc:
            await self.notice(f"presence not set: {self.reason(exc)}")
            return
        if status:
            await self.send(self.num("306", "You have been marked as being away"))
        else:
            await self.send(self.num("305", "You are no longer marked as being away"))

    async def on_whois(self, params: list[str]) -> None:
        if not params:
            await self.send(self.num("431", "No nickname given"))
            return
        nick = params[-1].split(",")[0].lower()
        await self.send(*await self.whois_lines(nick))

    async def whois_lines(self, nick: str) -> list[bytes]:
        """WHOIS: who, their verification state, safety number and devices."""
        client = self.ctx.client
        end = self.num("318", nick[:64], "End of /WHOIS list")
        if nick.lower() == SERVICE:
            return [
                self.num("311", SERVICE, "bastion", SERVER, "*", "the gateway"),
                self.num("312", SERVICE, SERVER, "Bastion gateway"),
                end,
            ]
        if not USERNAME_RE.fullmatch(nick):
            return [self.num("401", nick[:64], "No such nick"), end]
        head = [
            self.num("311", nick, nick, SERVER, "*", nick),
            self.num("312", nick, SERVER, "Bastion gateway"),
        ]
        if nick == self.me:
            account = client.account
            return [
                *head,
                self.num("320", nick, f"is you, on device {account.device_id}"),
                self.num("320", nick, f"account key fingerprint: {account.fingerprint}"),
                end,
            ]
        if self.ctx.online:
            with contextlib.suppress(BastionError, ValueError):
                await client.devices_of(nick)  # pins on first sight, sees a changed key
        contact = client.contact(nick)
        if contact is None:
            return [self.num("401", nick, "No such nick: no key is known for this user"), end]
        out = list(head)
        if contact.trust == "changed":
            number = trust.pending_safety_number(client, nick)
            out += [
                self.num("320", nick, "key CHANGED: messages to and from them wait for you"),
                self.num("320", nick, f"new safety number: {' '.join(number.groups)}"),
                self.num(
                    "320",
                    nick,
                    f"compare it with {nick}; only if it matches: "
                    f"bastion trust {nick} --accept-new-key NUMBER",
                ),
            ]
        else:
            try:
                number = comparison.current_number(client, nick)
            except StateError as exc:
                out.append(self.num("320", nick, escape_line(str(exc))))
            else:
                out += [
                    self.num("320", nick, f"is {contact.trust}"),
                    self.num("320", nick, f"safety number: {' '.join(number.groups)}"),
                ]
                if contact.trust != "verified":
                    out.append(
                        self.num(
                            "320",
                            nick,
                            f"compare it with {nick}, then: bastion verify {nick} --confirm NUMBER",
                        )
                    )
        known = ", ".join(d.device_id for d in contact.devices) or "none known"
        out.append(self.num("320", nick, clean_name(f"devices: {known}")))
        state, status = self.state_of(nick)
        if state in AWAY_STATES:
            out.append(self.num("301", nick, clean_name(status or state)))
        return [*out, end]

    def key_changed_text(self, user: str, *, refused: bool) -> str:
        first = (
            f"not sent: {user}'s account key has changed. "
            if refused
            else (f"{user}'s account key has changed; their messages wait until you decide. ")
        )
        return (
            first + "It can mean they reinstalled, or that someone impersonates them. "
            f"/whois {user} shows the new safety number; compare it with {user} (in person "
            f"or by call) and only if it matches run 'bastion trust {user} --accept-new-key "
            "NUMBER'."
        )

    # --- live events -------------------------------------------------------------------------

    async def forward(self, sub: Subscription) -> None:
        """Show each event of the gateway as IRC, until the session ends."""
        async for event in sub:
            try:
                await self.on_event(event)
            except ConnectionError:
                return
            except Exception as exc:
                log.error("IRC event %s failed: %s", event.get("type"), type(exc).__name__)
        if sub.overflowed:
            await self.error("this IRC client fell too far behind; events were dropped")

    async def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        handlers: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {
            "message": self.show_message,
            "presence": self.show_presence,
            "group_change": self.show_group_change,
            "group_invite": self.show_invite,
            "group_warning": self.show_group_warning,
            "connection": self.show_connection,
        }
        handler = handlers.get(str(kind))
        if handler is not None:
            await handler(event)
            return
        text = self.describe(event)
        if text:
            await self.notice(text)

    def describe(self, event: dict[str, Any]) -> str | None:
        """The notice for an event that is not a message, presence or group change."""
        kind = event.get("type")
        who = str(event.get("from") or event.get("user") or "")
        if kind == "key_changed":
            return self.key_changed_text(who, refused=False)
        if kind == "warning":
            return f"a message claiming to be from {who} was rejected: {event.get('reason')}"
        if kind == "devices_changed":
            whose = "YOUR account's" if event.get("own_account") else f"{who}'s"
            added = ", ".join(event.get("added") or []) or "none"
            removed = ", ".join(event.get("removed") or []) or "none"
            text = f"{whose} devices changed: added {added}; removed {removed}"
            if event.get("own_account") and event.get("added"):
                text += (
                    ". If this was not you, someone holds your account key: revoke it now "
                    "(bastion devices revoke DEVICE) and see docs/threat-model.md"
                )
            return text
        if kind == "file":
            return (
                f"{who} offers the file {clean_name(str(event.get('name')))!r} "
                f"({event.get('size')} bytes); to download and check it: "
                f"bastion file get {clean_name(str(event.get('id')))} "
                f"(or /msg {SERVICE} get {clean_name(str(event.get('id')))})"
            )
        if kind == "contact_request":
            note = clean_name(str(event.get("note") or ""))
            return (
                f"{who} asks to be your contact"
                + (f" ({note!r})" if note else "")
                + f": bastion contacts accept {who} (or decline)"
            )
        if kind == "contact":
            return f"{who} is now {event.get('state')} in your contacts"
        if kind == "verification_request":
            return f"{who} asks to verify with you: bastion verify {who} --sas"
        if kind == "verification_cancelled":
            return f"the verification with {who} was cancelled: {event.get('reason')}"
        if kind == "overflow":
            return str(event.get("reason"))
        return None

    async def show_message(self, event: dict[str, Any]) -> None:
        sender = str(event.get("from", ""))
        conversation = str(event.get("conversation", ""))
        text = str(event.get("text", ""))
        if not USERNAME_RE.fullmatch(sender):
            return
        me = self.me
        own = sender == me
        if own and event.get("device") == self.ctx.client.account.device_id:
            # This device's own message changing state: only a refusal is news.
            if event.get("state") == "failed":
                peer = conversation.removeprefix("dm:").replace(me, "", 1).strip(",")
                await self.notice(f"not sent to {peer}: {event.get('reason')}")
            return
        if conversation.startswith("group:"):
            try:
                group_id = bytes.fromhex(conversation.removeprefix("group:"))
            except ValueError:
                return
            if group_id not in self.views:
                await self.refresh(group_id)
            view = self.views.get(group_id)
            if view is None:
                return
            target = view.channel
        elif conversation.startswith("dm:"):
            names = conversation.removeprefix("dm:").split(",")
            peer = next((n for n in names if n != me), me)
            if not USERNAME_RE.fullmatch(peer):
                return
            target = peer if own else me
        else:
            return
        out: list[bytes] = []
        if not own and not event.get("verified") and sender not in self.told_unverified:
            self.told_unverified.add(sender)
            out += self.notice_lines(
                f"{sender} is not verified: compare safety numbers before trusting who this "
                f"is (/whois {sender}, then bastion verify {sender} --confirm NUMBER)"
            )
        for name in ctcp_commands(text):
            out += self.notice_lines(
                f"{sender} sent a CTCP {name} request; the gateway does not pass CTCP on"
            )
        out += text_lines(user_prefix(sender), "PRIVMSG", target, clean_text(text, sender))
        await self.send(*out)

    async def show_presence(self, event: dict[str, Any]) -> None:
        user = str(event.get("user", ""))
        if not USERNAME_RE.fullmatch(user):
            return
        state = str(event.get("state", "offline"))
        status = event.get("status")
        before = self.state_of(user)
        self.presence[user] = (state, status if isinstance(status, str) else None)
        out: list[bytes] = []
        if user in self.monitored and (before[0] == "offline") != (state == "offline"):
            out += self.monitor_lines([user])
        if "away-notify" in self.caps and (before[0] in AWAY_STATES) != (state in AWAY_STATES):
            if state in AWAY_STATES:
                out.append(line(user_prefix(user), "AWAY", clean_name(str(status or state))))
            else:
                out.append(line(user_prefix(user), "AWAY"))
        await self.send(*out)

    async def show_group_change(self, event: dict[str, Any]) -> None:
        try:
            group_id = bytes.fromhex(str(event.get("group", "")))
        except ValueError:
            return
        by = event.get("by")
        await self.refresh(group_id, by if isinstance(by, str) else None, str(event.get("change")))

    async def show_invite(self, event: dict[str, Any]) -> None:
        inviter = str(event.get("by", ""))
        try:
            group_id = bytes.fromhex(str(event.get("group", "")))
        except ValueError:
            return
        if not USERNAME_RE.fullmatch(inviter) or group_id in self.views or group_id in self.invited:
            return
        self.invited.add(group_id)
        channel = self.book.channel_of(group_id, str(event.get("name", "")))
        await self.send(
            line(user_prefix(inviter), "INVITE", self.nick, channel),
            *self.notice_lines(
                f"{inviter} invites you to the group {clean_name(str(event.get('name')))!r} "
                f"({event.get('members')} members): /join {channel} to accept"
            ),
        )

    async def show_group_warning(self, event: dict[str, Any]) -> None:
        try:
            group_id = bytes.fromhex(str(event.get("group", "")))
        except ValueError:
            return
        view = self.views.get(group_id)
        where = view.channel if view is not None else f"group {group_id.hex()[:12]}"
        await self.notice(f"warning about {where}: {event.get('reason')}")

    async def show_connection(self, event: dict[str, Any]) -> None:
        state = str(event.get("state"))
        if state == self.connection_state:
            return
        self.connection_state = state
        if state == "connected":
            await self.notice("connected to the server")
        elif state == "reconnecting":
            await self.notice(
                f"the server cannot be reached ({event.get('reason')}); reconnecting. "
                "Direct messages are queued meanwhile; group messages are refused"
            )
        elif state == "stopped":
            await self.notice(f"the gateway stopped: {event.get('reason')}")
