"""The IRC door: a real gateway process with ``--irc 0``, and the ``irc`` package's client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import irc.client  # type: ignore[import-untyped]  # ships no type information
import irc.client_aio  # type: ignore[import-untyped]
import pytest

from bastion.gateway import paths
from bastion.gateway.irc import protocol
from tests.conftest import ServerProcess
from tests.gateway.support import GatewayProcess, gateways, pair, until
from tests.test_cli import bastion, register
from tests.test_devices import replace_account_on_server

pytestmark = pytest.mark.network
SERVICE = "*bastion"


@dataclass(frozen=True)
class Seen:
    """One IRC event as the client library parsed it."""

    type: str
    source: str
    target: str
    arguments: list[str]

    @property
    def nick(self) -> str:
        return self.source.split("!", 1)[0]


class IrcUser:
    """An IRC client (``irc.client_aio``) connected to a gateway's IRC door."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.raw: list[str] = []
        self.conn: irc.client_aio.AioConnection | None = None

    async def connect(self, address: str, nick: str, password: str | None) -> IrcUser:
        where = urlsplit(address)
        reactor = irc.client_aio.AioReactor(loop=asyncio.get_running_loop())
        reactor.add_global_handler("all_events", self._record, -20)
        server = reactor.server()
        assert where.hostname is not None
        assert where.port is not None
        self.conn = await server.connect(where.hostname, where.port, nick, password=password)
        return self

    def _record(self, conn: Any, event: irc.client.Event) -> None:
        if event.type == "all_raw_messages":
            self.raw.append(event.arguments[0])
            return
        self.seen.append(
            Seen(
                event.type, str(event.source or ""), str(event.target or ""), list(event.arguments)
            )
        )

    def of(self, kind: str) -> list[Seen]:
        return [e for e in self.seen if e.type == kind]

    def privmsgs(self, sender: str) -> list[str]:
        return [
            e.arguments[0]
            for e in self.seen
            if e.type in ("privmsg", "pubmsg") and e.nick == sender
        ]

    def notices(self) -> list[str]:
        return [
            e.arguments[0]
            for e in self.seen
            if e.type in ("privnotice", "notice") and e.nick == SERVICE
        ]

    async def wait_for(self, test: Callable[[Seen], bool], what: str, wait_s: float = 30.0) -> Seen:
        await until(lambda: any(test(e) for e in self.seen), what, wait_s=wait_s)
        return next(e for e in self.seen if test(e))

    async def wait_raw(self, pattern: str, what: str, wait_s: float = 30.0) -> str:
        await until(lambda: any(re.search(pattern, r) for r in self.raw), what, wait_s=wait_s)
        return next(r for r in self.raw if re.search(pattern, r))

    def send(self, line: str) -> None:
        assert self.conn is not None
        self.conn.send_raw(line)

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.disconnect("bye")


def token_of(gw: GatewayProcess) -> str:
    return paths.read_token(gw.profile)


@contextlib.asynccontextmanager
async def on_irc(gw: GatewayProcess, nick: str) -> AsyncIterator[IrcUser]:
    user = await IrcUser().connect(gw.ready["irc"], nick, token_of(gw))
    try:
        await user.wait_for(lambda e: e.type == "welcome", "the welcome")
        yield user
    finally:
        user.close()


async def connected(gw: GatewayProcess) -> None:
    """Wait until the gateway is signed in to the server."""
    link = await gw.link()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while (await link.call("status"))["connection"] != "connected":
            assert loop.time() < deadline, "the gateway did not connect"
            await asyncio.sleep(0.1)
    finally:
        await link.close()


@pytest.fixture
def two(server: ServerProcess, tmp_path: Path) -> tuple[Path, Path]:
    return pair(server, tmp_path)


def started(profile: Path) -> GatewayProcess:
    gw = GatewayProcess(profile, "--irc", "0")
    # Files fetched through the door land here, not in the real user's downloads folder.
    downloads = profile.parent / f"{profile.name}-downloads"
    downloads.mkdir(exist_ok=True)
    gw.start(env={"XDG_DOWNLOAD_DIR": str(downloads)})
    return gw


async def test_the_door_is_announced_and_a_wrong_password_is_refused(
    two: tuple[Path, Path],
) -> None:
    alice, _ = two
    with gateways(started(alice)) as (gw,):
        assert re.fullmatch(r"irc://127\.0\.0\.1:\d+", gw.ready["irc"])
        for password in ("not-the-token", None):
            user = await IrcUser().connect(gw.ready["irc"], "mallory", password)
            try:
                line = await user.wait_raw(r" 464 ", "the password refusal")
                assert "Password incorrect" in line
                await user.wait_raw(r"^ERROR ", "the link closed")
                assert not user.of("welcome")
            finally:
                user.close()


def test_a_door_off_the_loopback_is_refused(two: tuple[Path, Path]) -> None:
    alice, _ = two
    refused = bastion(
        "gateway", "--irc", "0", "--irc-host", "0.0.0.0", "--profile", str(alice), check=False
    )
    assert refused.returncode != 0
    assert "loopback address only" in refused.stderr


async def test_queries_both_ways_with_the_account_names(two: tuple[Path, Path]) -> None:
    alice, bob = two
    with gateways(started(alice), started(bob)) as (gw_a, gw_b):
        await connected(gw_a)
        await connected(gw_b)
        async with on_irc(gw_a, "someone") as a, on_irc(gw_b, "bobby") as b:
            # The chosen nick is replaced by the account's username.
            nick = await a.wait_for(lambda e: e.type == "nick", "the nick change")
            assert (nick.nick, nick.target) == ("someone", "alice")
            assert a.conn is not None
            assert a.conn.get_nickname() == "alice"
            a.conn.privmsg("bob", "hello bob, from irc")
            got = await b.wait_for(
                lambda e: e.type == "privmsg" and e.nick == "alice", "alice's query"
            )
            assert (got.target, got.arguments) == ("bob", ["hello bob, from irc"])
            # The first message from an unverified contact says so, once.
            assert any("alice is not verified" in n for n in b.notices())
            assert b.conn is not None
            b.conn.privmsg("alice", "hi alice")
            b.conn.privmsg("alice", "second")
            await a.wait_for(
                lambda e: e.nick == "bob" and e.arguments == ["second"], "bob's answer"
            )
            assert a.privmsgs("bob") == ["hi alice", "second"]
            assert sum("bob is not verified" in n for n in a.notices()) == 1
            # The history is the one every front end sees.
            history = json.loads(
                bastion("history", "bob", "--json", "--profile", str(alice)).stdout.splitlines()[-1]
            )
            assert history["text"] == "second"


async def test_long_multiline_and_hostile_text_reaches_irc_safely(two: tuple[Path, Path]) -> None:
    alice, bob = two
    with gateways(started(alice), started(bob)) as (gw_a, gw_b):
        await connected(gw_a)
        await connected(gw_b)
        async with on_irc(gw_a, "alice") as a:
            link = await gw_b.link()
            try:
                words = " ".join(f"word{i:04d}" for i in range(222))  # 1,997 characters
                assert len(words) > 1900
                await link.call("send", to="alice", text=words)
                unbroken = "é" * 1000  # 2,000 bytes, no space to split at
                await link.call("send", to="alice", text=unbroken)
                await link.call("send", to="alice", text="first line\nsecond line\r\nINJECT :x")
                await link.call("send", to="alice", text="\x01VERSION\x01")
                await link.call(
                    "send", to="alice", text="\x02bold\x0304red\x0f plain \x1b[31m \u202egnp"
                )
                await link.call("send", to="alice", text="\x01ACTION waves\x01")
                await link.call("send", to="alice", text="done")
            finally:
                await link.close()
            await a.wait_for(lambda e: e.arguments == ["done"], "the last message")
            assert all(len(r.encode()) + 2 <= 512 for r in a.raw)
            texts = a.privmsgs("bob")
            split = [t for t in texts if t.startswith("word")]
            assert len(split) >= 4
            assert " ".join(split) == words
            accents = [t for t in texts if t.startswith("é")]
            assert len(accents) >= 4
            assert "".join(accents) == unbroken
            assert "first line" in texts
            assert "second line" in texts
            assert "INJECT :x" in texts  # a line of text in a PRIVMSG, never a command
            assert not any(r.startswith("INJECT") for r in a.raw)
            assert "boldred plain \\x1b[31m ⟨U+202E⟩gnp" in texts
            assert "* bob waves" in texts
            assert not any("\x01" in r or "\x02" in r or "\x03" in r for r in a.raw)
            assert not any("VERSION" in t for t in texts)
            assert any("CTCP VERSION" in n for n in a.notices())


async def test_a_group_is_a_channel(two: tuple[Path, Path]) -> None:
    alice, bob = two
    with gateways(started(alice), started(bob)) as (gw_a, gw_b):
        await connected(gw_a)
        await connected(gw_b)
        async with on_irc(gw_a, "alice") as a, on_irc(gw_b, "bob") as b:
            assert a.conn is not None
            assert b.conn is not None
            a.conn.join("#garden")
            await a.wait_for(lambda e: e.type == "join" and e.target == "#garden", "the join")
            names = await a.wait_for(lambda e: e.type == "namreply", "the names")
            assert names.arguments[-1] == "@alice"
            b.conn.invite("alice", "#garden")  # bob is not a member: no such channel for him
            await b.wait_raw(r" 403 bob #garden ", "bob's refusal")
            a.conn.invite("bob", "#garden")
            await a.wait_raw(r" 341 alice bob :#garden", "the inviting reply")
            await a.wait_for(lambda e: e.type == "join" and e.nick == "bob", "bob in the channel")
            # bob is alice's contact: the server lets him in at once (a stranger would get an
            # invitation, which JOIN accepts), and his client is joined to the channel.
            await b.wait_for(lambda e: e.type == "join" and e.nick == "bob", "bob joins")
            b_names = await b.wait_for(lambda e: e.type == "namreply", "bob's names")
            assert sorted(b_names.arguments[-1].split()) == ["@alice", "bob"]
            a.conn.privmsg("#garden", "welcome to the garden")
            got = await b.wait_for(lambda e: e.type == "pubmsg", "the group message")
            assert (got.nick, got.target, got.arguments) == (
                "alice",
                "#garden",
                ["welcome to the garden"],
            )
            b.conn.privmsg("#garden", "thanks")
            back = await a.wait_for(lambda e: e.type == "pubmsg" and e.nick == "bob", "the answer")
            assert back.arguments == ["thanks"]
            # A plain member may not rename or remove: 482 and the library's reason.
            b.conn.topic("#garden", "mine now")
            await b.wait_raw(r" 482 bob #garden ", "the refusal")
            await until(
                lambda: any("cannot rename the group in #garden" in n for n in b.notices()),
                "the reason",
            )
            b.conn.kick("#garden", "alice")
            await until(
                lambda: any("cannot remove alice" in n for n in b.notices()), "the kick refusal"
            )
            # The admin renames: the topic changes for both.
            a.conn.topic("#garden", "The Garden")
            topic = await b.wait_for(lambda e: e.type == "topic", "the new topic")
            assert (topic.nick, topic.arguments) == ("alice", ["The Garden"])
            a.conn.kick("#garden", "bob")
            kicked = await b.wait_for(lambda e: e.type == "kick", "bob removed")
            assert (kicked.nick, kicked.arguments[0]) == ("alice", "bob")
            b.conn.privmsg("#garden", "still here?")
            await b.wait_raw(r" 403 bob #garden |442 bob #garden ", "bob cannot send any more")


async def test_whois_shows_the_safety_number_and_a_changed_key_refuses_sends(
    server: ServerProcess, two: tuple[Path, Path], tmp_path: Path
) -> None:
    alice, _bob = two
    shown = json.loads(bastion("verify", "bob", "--json", "--profile", str(alice)).stdout)
    with gateways(started(alice)) as (gw,):
        await connected(gw)
        async with on_irc(gw, "alice") as a:
            assert a.conn is not None
            a.conn.whois(["bob"])
            await a.wait_raw(r" 318 alice bob ", "the end of whois")
            lines = [r for r in a.raw if " 320 alice bob " in r]
            assert any(f"safety number: {shown['safety_number']}" in r for r in lines)
            assert any("is unverified" in r for r in lines)
            assert any("devices: " in r for r in lines)

            server.stop()
            replace_account_on_server(server, "bob")
            server.start()
            register(server, "bob", tmp_path / "reinstalled")
            await connected(gw)
            a.conn.privmsg("bob", "are you still you?")
            await until(
                lambda: any("bob's account key has changed" in n for n in a.notices()),
                "the refusal",
            )
            notice = next(n for n in a.notices() if "account key has changed" in n)
            assert notice.startswith("not sent:")
            assert "bastion trust bob --accept-new-key" in notice
            a.conn.whois(["bob"])
            await until(lambda: sum(" 318 alice bob " in r for r in a.raw) == 2, "the second whois")
            changed = json.loads(bastion("verify", "bob", "--json", "--profile", str(alice)).stdout)
            assert changed["trust"] == "changed"
            assert any(f"new safety number: {changed['safety_number']}" in r for r in a.raw)
            history = bastion("history", "bob", "--json", "--profile", str(alice)).stdout
            assert "are you still you?" not in history


async def test_presence_as_away_and_monitor(two: tuple[Path, Path]) -> None:
    alice, bob = two
    with gateways(started(alice), started(bob)) as (gw_a, gw_b):
        await connected(gw_a)
        await connected(gw_b)
        where = urlsplit(gw_a.ready["irc"])
        reader, writer = await asyncio.open_connection(where.hostname, where.port)
        try:
            writer.write(
                f"CAP LS 302\r\nPASS {token_of(gw_a)}\r\nNICK alice\r\nUSER a 0 * :a\r\n".encode()
            )
            writer.write(b"CAP REQ :away-notify\r\nCAP END\r\nMONITOR + bob\r\n")
            await writer.drain()
            got = b""

            async def read_until(pattern: bytes) -> None:
                nonlocal got
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while not re.search(pattern, got):
                    left = deadline - loop.time()
                    assert left > 0, f"no {pattern!r} in {got!r}"
                    with contextlib.suppress(TimeoutError):
                        got += await asyncio.wait_for(reader.read(4096), left)

            await read_until(rb"CAP \S+ ACK :?away-notify")
            await read_until(rb" 730 alice :bob!bob@bastion")
            async with on_irc(gw_b, "bob") as b:
                assert b.conn is not None
                b.conn.send_raw("AWAY :gardening")
                await b.wait_raw(r" 306 bob ", "bob is away")
                await read_until(rb":bob!bob@bastion AWAY :gardening\r\n")
                writer.write(b"WHOIS bob\r\nISON bob carol\r\n")
                await writer.drain()
                await read_until(rb" 301 alice bob :gardening")
                await read_until(rb" 303 alice :bob\r\n")
                b.conn.send_raw("AWAY")
                await b.wait_raw(r" 305 bob ", "bob is back")
                await read_until(rb":bob!bob@bastion AWAY\r\n")
        finally:
            writer.close()


async def test_limits_end_a_flooding_or_overlong_client(two: tuple[Path, Path]) -> None:
    alice, _ = two
    with gateways(started(alice)) as (gw,):
        where = urlsplit(gw.ready["irc"])
        assert where.hostname is not None
        assert where.port is not None

        async def session(payload: bytes) -> bytes:
            reader, writer = await asyncio.open_connection(where.hostname, where.port)
            try:
                writer.write(payload)
                await writer.drain()
                return await asyncio.wait_for(reader.read(), 30)
            finally:
                writer.close()

        overlong = await session(b"PING :" + b"x" * 9000 + b"\r\n")
        assert b"ERROR :Closing link: Line too long" in overlong
        flood = await session(b"PING :x\r\n" * 2000)
        assert b"ERROR :Closing link: Excess flood" in flood

        # At most eight IRC clients at once; the ninth is told so.
        held = [
            socket.create_connection((where.hostname, where.port), timeout=10) for _ in range(8)
        ]
        try:
            await asyncio.sleep(0.5)
            ninth = await session(b"")
            assert b"at most 8 IRC clients" in ninth
        finally:
            for sock in held:
                sock.close()


async def test_leaving_a_group_parts_its_channel(two: tuple[Path, Path]) -> None:
    alice, _ = two
    with gateways(started(alice)) as (gw,):
        await connected(gw)
        async with on_irc(gw, "alice") as a:
            assert a.conn is not None
            a.conn.join("#shortlived")
            await a.wait_for(lambda e: e.type == "join", "the new channel")
            a.conn.join("#bad,name")  # two channels: "#bad" is made, "name" is not a channel
            await a.wait_raw(r" 403 alice name ", "the refusal of a name without #")
            a.conn.part("#shortlived")
            parted = await a.wait_for(lambda e: e.type == "part", "the part")
            assert (parted.nick, parted.target) == ("alice", "#shortlived")
            listed = bastion("group", "list", "--json", "--profile", str(alice)).stdout
            assert "shortlived" in listed  # the group is still known...
            a.conn.privmsg("#shortlived", "anyone?")
            await a.wait_raw(r" 403 alice #shortlived ", "...but its channel is gone")


TMUX_SOCKET = "bastion-irc-test"


def tmux(*args: str) -> str:
    result = subprocess.run(
        ["tmux", "-L", TMUX_SOCKET, *args], capture_output=True, text=True, timeout=20, check=True
    )
    return result.stdout


async def test_irssi_talks_to_the_gateway(two: tuple[Path, Path], tmp_path: Path) -> None:
    if shutil.which("irssi") is None or shutil.which("tmux") is None:
        pytest.skip("irssi and tmux are needed for this test (apt-get install irssi tmux)")
    alice, bob = two
    with gateways(started(alice), started(bob)) as (gw_a, gw_b):
        await connected(gw_a)
        await connected(gw_b)
        where = urlsplit(gw_a.ready["irc"])
        home = tmp_path / "irssi"
        home.mkdir()
        command = (
            f"irssi --home={home} -c {where.hostname} -p {where.port} "
            f"-w {token_of(gw_a)} -n someone"
        )
        tmux("new-session", "-d", "-s", "irc", "-x", "200", "-y", "50", command)
        try:
            async with on_irc(gw_b, "bob") as b:
                assert b.conn is not None

                async def screen_shows(text: str) -> None:
                    try:
                        await until(lambda: text in tmux("capture-pane", "-p", "-t", "irc"), text)
                    except AssertionError:
                        raise AssertionError(tmux("capture-pane", "-p", "-t", "irc")) from None

                await screen_shows("Welcome to Bastion, alice")
                tmux("send-keys", "-t", "irc", "/msg bob hello from irssi", "Enter")
                got = await b.wait_for(lambda e: e.type == "privmsg", "irssi's message")
                assert (got.nick, got.arguments) == ("alice", ["hello from irssi"])
                b.conn.privmsg("alice", "hello irssi \x02bold\x02")
                tmux("send-keys", "-t", "irc", "/window goto bob", "Enter")  # the query window
                await screen_shows("hello irssi bold")
                tmux("send-keys", "-t", "irc", "/whois bob", "Enter")
                await screen_shows("safety number:")
        finally:
            with contextlib.suppress(subprocess.SubprocessError):
                tmux("kill-server")


def test_the_line_parser_reads_rfc_and_ircv3_lines() -> None:
    parsed = protocol.parse(b"@time=2026-01-01T00:00:00Z;x :nick!u@h privmsg #a,bob :hi  there\r\n")
    assert parsed is not None
    assert (parsed.command, parsed.params, parsed.prefix) == (
        "PRIVMSG",
        ["#a,bob", "hi  there"],
        "nick!u@h",
    )
    assert parsed.tags == {"time": "2026-01-01T00:00:00Z", "x": ""}
    assert protocol.parse(b"\r\n") is None
    with pytest.raises(ValueError, match="not an IRC command"):
        protocol.parse(b":prefix-only")
    many = protocol.parse(b"CMD " + b" ".join(b"p%d" % i for i in range(20)))
    assert many is not None
    assert len(many.params) == 15
    assert many.params[-1] == " ".join(f"p{i}" for i in range(14, 20))


def test_peer_text_cannot_inject_a_line_or_a_control() -> None:
    assert protocol.line("a!a@b", "PRIVMSG", "bob", "x\r\nQUIT :y") == (
        b":a!a@b PRIVMSG bob :x  QUIT :y\r\n"
    )
    assert protocol.clean_text("a\x01PING 1\x01b\n\x1d\x16c\x00", "bob") == ["ab", "c\\x00"]
    assert protocol.clean_text("\x01ACTION \x0312waves\x01", "bob") == ["* bob waves"]
    assert protocol.outgoing_text("\x01VERSION\x01", "alice") is None
    assert protocol.outgoing_text("\x01ACTION nods\x01", "alice") == "* alice nods"


def test_splitting_keeps_characters_whole_and_prefers_spaces() -> None:
    assert protocol.split_text("aaaa bbbb cccc", 10) == ["aaaa bbbb", "cccc"]
    pieces = protocol.split_text("é" * 9, 9)  # 18 bytes, 2 per character
    assert pieces == ["éééé", "éééé", "é"]
    assert all(len(p.encode()) <= 9 for p in pieces)


async def test_a_file_offer_is_a_notice_and_the_service_fetches_it_with_its_verdict(
    two: tuple[Path, Path], tmp_path: Path
) -> None:
    alice, bob = two
    with gateways(started(alice)) as (gw,):
        await connected(gw)
        async with on_irc(gw, "alice") as a:
            notes = tmp_path / "notes.txt"
            notes.write_text("the plan\n")
            bastion("file", "send", "alice", str(notes), "--profile", str(bob))
            await until(lambda: any("offers the file" in n for n in a.notices()), "the offer")
            offer = next(n for n in a.notices() if "offers the file" in n)
            [listed] = [
                json.loads(x)
                for x in bastion("file", "list", "--json", "--profile", str(alice)).stdout.split(
                    "\n"
                )
                if x.strip()
            ]
            assert offer.startswith("bob offers the file 'notes.txt'")
            assert f"bastion file get {listed['id']}" in offer
            assert offer.endswith(f"/msg *bastion get {listed['id']})")

            a.send(f"PRIVMSG *bastion :get {listed['id']}")
            await until(lambda: any("scan verdict" in n for n in a.notices()), "the verdict")
            verdict = next(n for n in a.notices() if "scan verdict" in n)
            saved = alice.parent / "alice-downloads" / "notes.txt"
            assert "scan verdict: clean" in verdict
            assert verdict.endswith(f"saved to {saved}")
            assert saved.read_text() == "the plan\n"
            a.send("PRIVMSG *bastion :files")
            await until(
                lambda: sum(f"file {listed['id']}" in n for n in a.notices()) >= 2, "the list"
            )


async def test_direct_messages_are_queued_in_order_while_the_server_is_away(
    server: ServerProcess, two: tuple[Path, Path]
) -> None:
    alice, bob = two
    with gateways(started(alice)) as (gw,):
        await connected(gw)
        async with on_irc(gw, "alice") as a:
            assert a.conn is not None
            server.stop()
            await until(lambda: any("cannot be reached" in n for n in a.notices()), "offline")
            a.conn.privmsg("bob", "one")
            a.conn.privmsg("bob", "two")
            a.conn.privmsg("#nowhere", "group messages need the server")
            await until(lambda: sum("queued for bob" in n for n in a.notices()) == 2, "queued")
            await a.wait_raw(r" 403 alice #nowhere ", "no such channel")
            server.start()
            await connected(gw)
            await until(lambda: any("connected to the server" in n for n in a.notices()), "back")
    inbox = bastion("inbox", "--json", "--profile", str(bob)).stdout.splitlines()
    texts = [json.loads(x)["text"] for x in inbox if '"message"' in x]
    assert texts == ["one", "two"]
