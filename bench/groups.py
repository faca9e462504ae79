"""Group benchmark: one message to a group of ``--members`` members, every member connected.

Starts ``python -m bastion server run`` on 127.0.0.1 with a fresh SQLite data
folder whose ``bastion.toml`` raises the per-address limits (all connections
come from one address) and sets the group member cap to fit. Then, with the raw
protocol over real TLS WebSocket connections (as ``bench/_load.py`` does):

1. registers ``--members`` accounts (account key, vodozemac device, device
   certificate, signed one-time keys, signed challenge), each holding one
   receiving connection;
2. the first member builds and signs the group's ``create`` change with
   :mod:`bastion.groups.chain` naming every other member with their account
   key, and posts it (the server checks the chain and every key);
3. waits until every member has the invitation (none of them is the creator's
   contact) and accepts it, joining the group;
4. sends ``--messages`` group messages one after the other: each is one
   ``GroupSend`` whose ciphertext is a real Megolm ciphertext of a random
   plaintext the size of a signed group message; the server stores one copy per
   member device and pushes it. For each message it measures the time from the
   send to the ``GroupSent`` reply (durable) and until every other member's
   connection has the ``Deliver`` (which each acknowledges).

Everything is bounded: at most 1,000 members and 100 messages, and the whole
run stops after ``--timeout`` seconds. Nothing here asserts a number; record
the output in docs/benchmarks.md.

    python bench/groups.py                      # 200 members, 5 messages
    python bench/groups.py --members 50 --messages 2 --json
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import vodozemac
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from _report import BenchmarkError
from _servers import BENCH_CONFIG, CONFIG_FILE, ServerUnderTest
from bastion.crypto.device import DeviceCertificate
from bastion.crypto.olm import OlmDevice
from bastion.crypto.signing import AccountIdentity
from bastion.errors import FrameError, ServerRefusedError, UntrustedServerError
from bastion.groups import chain
from bastion.protocol import frames
from bastion.protocol.auth import register_message
from bastion.tlsprofile import fingerprint, pinning_client_context

MAX_MEMBERS = 1000
MAX_MESSAGES = 100
REGISTER_CONCURRENCY = 16
ONE_TIME_KEYS = 2
PLAINTEXT_BYTES = 300  # a signed group message carrying a 100-character text, roughly
MAX_REQ = 2**31 - 1


class Member(WSListener):
    """One member's connection: answers requests, acknowledges and timestamps deliveries."""

    def __init__(self, username: str, pin: str) -> None:
        super().__init__()
        self.username = username
        self.pin = pin
        self.identity = AccountIdentity.generate()
        self.transport: WSTransport | None = None
        self.closed = False
        loop = asyncio.get_running_loop()
        self.challenge: asyncio.Future[frames.Challenge] = loop.create_future()
        self.replies: dict[int, asyncio.Future[frames.ServerFrame]] = {}
        self.last_req = 0
        self.notices: asyncio.Event = asyncio.Event()
        self.messages: dict[bytes, int] = {}  # ciphertext prefix -> monotonic ns of receipt
        self.round: Round | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        ssl_object = transport.underlying_transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der is None or not hmac.compare_digest(fingerprint(der), self.pin):
            self._fail(UntrustedServerError("the server's certificate is not the expected one"))
            transport.disconnect()
            return
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            self.closed = True
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        if frame.msg_type is not WSMsgType.BINARY:
            return
        try:
            message = frames.decode_server_frame(frame.get_payload_as_bytes())
        except FrameError:
            return
        if isinstance(message, frames.Deliver):
            self._on_deliver(message)
        elif isinstance(message, frames.Challenge):
            if not self.challenge.done():
                self.challenge.set_result(message)
        elif (req := getattr(message, "req", None)) is not None:
            future = self.replies.pop(req, None)
            if future is not None and not future.done():
                future.set_result(message)

    def _on_deliver(self, deliver: frames.Deliver) -> None:
        now = time.monotonic_ns()
        self.send(frames.Ack(seqs=[deliver.seq]))
        if deliver.kind != frames.GROUP_KIND:
            return
        try:
            item = frames.decode_item(deliver.body)
        except FrameError:
            return
        if isinstance(item, frames.GroupChangeItem | frames.GroupInviteItem):
            self.notices.set()
        else:
            self.messages[item.ciphertext[:32]] = now
            if self.round is not None:
                self.round.arrived(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        self._fail(ServerRefusedError("disconnected", "the server closed the connection"))

    def _fail(self, error: Exception) -> None:
        if not self.challenge.done():
            self.challenge.set_exception(error)
            self.challenge.exception()
        for future in self.replies.values():
            if not future.done():
                future.set_exception(error)
        self.replies.clear()

    def send(self, frame: frames.Frame) -> None:
        """Send a frame if the connection is up."""
        if self.transport is not None and not self.closed:
            self.transport.send(WSMsgType.BINARY, frames.encode(frame))

    def new_req(self) -> int:
        """A fresh request id on this connection."""
        self.last_req = self.last_req % MAX_REQ + 1
        return self.last_req

    async def request(self, frame: frames.Frame, *, wait_s: float = 30) -> frames.ServerFrame:
        """Send a request (its ``req`` is replaced) and wait for the reply."""
        req = self.new_req()
        future: asyncio.Future[frames.ServerFrame] = asyncio.get_running_loop().create_future()
        self.replies[req] = future
        self.send(msgspec.structs.replace(frame, req=req))
        try:
            reply = await asyncio.wait_for(future, wait_s)
        except TimeoutError:
            raise ServerRefusedError("timeout", "the server did not answer in time") from None
        if isinstance(reply, frames.Error):
            raise ServerRefusedError(reply.code, reply.message)
        return reply

    async def register(self, url: str) -> None:
        """Connect, register this account through the real protocol, and stay signed in."""
        factory: Callable[[], Member] = lambda: self  # noqa: E731
        await asyncio.wait_for(
            ws_connect(
                factory,
                url,
                ssl_context=pinning_client_context(),
                max_frame_size=frames.MAX_FRAME_BYTES,
                logger_name="bench",
            ),
            10,
        )
        challenge = await asyncio.wait_for(self.challenge, 10)
        device = OlmDevice.create()
        created = time.time_ns() // 1_000_000
        certificate = DeviceCertificate.issue(
            self.identity,
            username=self.username,
            ed25519=device.ed25519,
            curve25519=device.curve25519,
            created_at=created,
        )
        fallback = device.new_fallback_key()
        reply = await self.request(
            frames.Register(
                req=0,
                username=self.username,
                identity_key=self.identity.public_bytes,
                device=frames.DeviceKeys(
                    device_id=device.device_id,
                    ed25519=device.ed25519,
                    curve25519=device.curve25519,
                    created_at=created,
                    certificate=certificate.signature,
                ),
                signature=device.sign(
                    register_message(
                        challenge.server_name, challenge.nonce, self.username, device.device_id
                    )
                ),
                one_time_keys=[
                    frames.SignedKey(key=k.key, signature=k.signature)
                    for k in device.new_one_time_keys(ONE_TIME_KEYS)
                ],
                fallback_key=frames.SignedKey(key=fallback.key, signature=fallback.signature),
                receive=True,
            )
        )
        if not isinstance(reply, frames.SignedIn):
            raise BenchmarkError("registration was not answered with signed_in")


class Round:
    """One message on its way: which members still wait for it."""

    def __init__(self, tag: bytes, receivers: list[Member]) -> None:
        self.tag = tag
        self.waiting = {m.username for m in receivers}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def arrived(self, member: Member) -> None:
        """Note a member's delivery; the round is done when nobody waits."""
        if self.tag in member.messages:
            self.waiting.discard(member.username)
            if not self.waiting and not self.done.done():
                self.done.set_result(None)


class Result(msgspec.Struct, kw_only=True):
    """What one run measured (times in milliseconds)."""

    members: int
    receivers: int
    messages: int
    ciphertext_bytes: int
    register_s: float
    create_ms: float
    durable_ms: list[float]
    all_delivered_ms: list[float]
    receiver_p50_ms: float
    receiver_p99_ms: float
    server_rss_mb: float
    machine: str


def megolm_ciphertext() -> bytes:
    """A real Megolm ciphertext of a random plaintext the size of a signed group message."""
    return vodozemac.GroupSession().encrypt(secrets.token_bytes(PLAINTEXT_BYTES)).to_bytes()


def server_config(members: int) -> str:
    """The bench server's limits: the relay bench's, plus a member cap that fits."""
    return BENCH_CONFIG + f"group_max_members = {max(members, 2)}\n"


async def run(
    url: str, pin: str, *, members: int, messages: int, rss: Callable[[], float]
) -> Result:
    """Register, create the group, send ``messages`` messages; returns the measurements."""
    started = time.perf_counter()
    everyone = [Member(f"member{i:04d}", pin) for i in range(members)]
    gate = asyncio.Semaphore(REGISTER_CONCURRENCY)

    async def register(member: Member) -> None:
        async with gate:
            await member.register(url)

    await asyncio.gather(*(register(m) for m in everyone))
    register_s = time.perf_counter() - started

    sender, receivers = everyone[0], everyone[1:]
    create = chain.create_group(
        sender.identity,
        sender.username,
        "bench",
        {m.username: m.identity.public_bytes for m in receivers},
        now=time.time(),
    )
    chain.apply_change(None, create, max_members=members)  # what every member checks
    t0 = time.perf_counter()
    await sender.request(frames.GroupPost(req=0, change=chain.encode_change(create)))
    create_ms = (time.perf_counter() - t0) * 1000
    await asyncio.gather(*(m.notices.wait() for m in receivers))
    await asyncio.gather(
        *(
            m.request(frames.GroupRespond(req=0, group_id=create.group_id, accept=True))
            for m in receivers
        )
    )

    durable: list[float] = []
    all_delivered: list[float] = []
    latencies: list[float] = []
    for _ in range(messages):
        ciphertext = megolm_ciphertext()
        tag = ciphertext[:32]
        current = Round(tag, receivers)
        for m in receivers:
            m.round = current
        sent_ns = time.monotonic_ns()
        reply = await sender.request(
            frames.GroupSend(
                req=0,
                group_id=create.group_id,
                client_msg_id=secrets.token_bytes(16),
                ciphertext=ciphertext,
            )
        )
        if not isinstance(reply, frames.GroupSent) or len(reply.members) != members:
            raise BenchmarkError("the group message was not fanned out to every member")
        durable.append((time.monotonic_ns() - sent_ns) / 1e6)
        await current.done
        last = max(m.messages[tag] for m in receivers)
        all_delivered.append((last - sent_ns) / 1e6)
        latencies += [(m.messages[tag] - sent_ns) / 1e6 for m in receivers]
    for m in everyone:
        if m.transport is not None:
            m.transport.disconnect()
    latencies.sort()
    return Result(
        members=members,
        receivers=len(receivers),
        messages=messages,
        ciphertext_bytes=len(megolm_ciphertext()),
        register_s=round(register_s, 2),
        create_ms=round(create_ms, 1),
        durable_ms=[round(x, 1) for x in durable],
        all_delivered_ms=[round(x, 1) for x in all_delivered],
        receiver_p50_ms=round(latencies[len(latencies) // 2], 1),
        receiver_p99_ms=round(latencies[min(len(latencies) - 1, len(latencies) * 99 // 100)], 1),
        server_rss_mb=round(rss(), 1),
        machine=machine(),
    )


def machine() -> str:
    """A one-line description of this machine."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "")
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPU {model or platform.processor()}, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )


def rss_mb(pid: int) -> float:
    """The resident memory of a process in MiB (0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def table(result: Result) -> str:
    """The result as a few lines for a person."""
    delivered = result.all_delivered_ms
    return "\n".join(
        [
            f"group of {result.members} members, {result.receivers} receiving connections,"
            f" {result.messages} messages of {result.ciphertext_bytes} bytes",
            f"  registration of all accounts   {result.register_s:8.2f} s",
            f"  create change posted            {result.create_ms:8.1f} ms",
            f"  send -> durable (GroupSent)     {statistics.median(result.durable_ms):8.1f} ms"
            " (median)",
            f"  send -> all {result.receivers} delivered       "
            f"{statistics.median(delivered):8.1f} ms (median; first {delivered[0]:.1f},"
            f" max {max(delivered):.1f})",
            f"  per receiver p50 / p99          {result.receiver_p50_ms:8.1f} /"
            f" {result.receiver_p99_ms:.1f} ms",
            f"  server RSS                      {result.server_rss_mb:8.1f} MiB",
            f"  machine: {result.machine}",
        ]
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description="One message to a large group, end to end.")
    parser.add_argument("--members", type=int, default=200, help="group size (2 to 1000)")
    parser.add_argument("--messages", type=int, default=5, help="messages, one after another")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after (seconds)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if not 2 <= args.members <= MAX_MEMBERS:
        parser.error(f"--members must be between 2 and {MAX_MEMBERS}")
    if not 1 <= args.messages <= MAX_MESSAGES:
        parser.error(f"--messages must be between 1 and {MAX_MESSAGES}")
    if not 0 < args.timeout <= 3600:
        parser.error("--timeout must be between 0 and 3600 seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark once; prints a table (or JSON)."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bastion-bench-groups-") as tmp:
        server = ServerUnderTest(Path(tmp), cpu=None)
        (server.data_dir / CONFIG_FILE).write_text(server_config(args.members))
        server.start()
        try:
            result = asyncio.run(
                asyncio.wait_for(
                    run(
                        server.url,
                        server.fingerprint,
                        members=args.members,
                        messages=args.messages,
                        rss=lambda: rss_mb(server.pid),
                    ),
                    args.timeout,
                )
            )
        except TimeoutError:
            print(f"error: the run took longer than {args.timeout:g} s", file=sys.stderr)
            return 1
        except (BenchmarkError, ServerRefusedError, OSError) as exc:
            print(f"error: {exc}\n{server.log_text()[-2000:]}", file=sys.stderr)
            return 1
        finally:
            server.stop()
    print(msgspec.json.encode(result).decode() if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
