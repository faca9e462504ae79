"""The relay benchmark's load generator: real accounts and frames, opaque ciphertext.

``bench/relay.py`` runs this file in its own process, pinned to its own core:
``python bench/_load.py CONFIG_JSON``. It prints one :class:`LoadReport` as JSON.

Every account is registered through the real protocol (account key, Olm device,
device certificate, signed one-time keys, signed challenge). Senders then send
``Send`` frames whose ciphertext is random bytes of the size of a real Olm
ciphertext; the server cannot tell the difference, so TLS, frame decoding,
durable storage, routing, delivery and acknowledgement are all exercised. The
first bytes of each body carry the sender, a counter and the scheduled send
time, so the receiving connection (same process, same clock) measures
end-to-end latency.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import os
import secrets
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from _crypto import measure, sample_ciphertext_bytes
from _report import BenchmarkError, IdleResult, LoadConfig, LoadReport, ModeResult
from _servers import postgres_pids
from bastion.crypto.device import DeviceCertificate
from bastion.crypto.olm import NORMAL, OlmDevice
from bastion.crypto.signing import AccountIdentity
from bastion.errors import BastionError, FrameError, ServerRefusedError, UntrustedServerError
from bastion.protocol import frames
from bastion.protocol.auth import register_message
from bastion.tlsprofile import fingerprint, pinning_client_context

# sender index, message counter, scheduled send time (monotonic ns)
HEADER = struct.Struct(">IIq")
ONE_TIME_KEYS = 20
IDLE_ONE_TIME_KEYS = 2  # idle accounts only hold a connection; fewer keys register faster
IDLE_SETTLE_S = 2.0
REGISTER_CONCURRENCY = 16
MAX_REQ = 2**31 - 1
_NS = 1_000_000_000
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the server process, seen from /proc -------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process, all threads included (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime and stime


def processes_cpu_s(pids: list[int]) -> float:
    """CPU seconds of several processes together."""
    return sum(process_cpu_s(pid) for pid in pids)


def processes_memory_mb(pids: list[int], field: str = "VmRSS") -> float:
    """A memory figure of several processes, added up."""
    return sum(process_memory_mb(pid, field) for pid in pids)


def process_memory_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of ``/proc/PID/status`` (VmRSS now, VmHWM peak) in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def core_busy_s(cpu: int | None) -> float:
    """Seconds one CPU spent busy (not idle or waiting for I/O), all processes together."""
    if cpu is None:
        return 0.0
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                ticks = [int(x) for x in line.split()[1:]]
                return (sum(ticks) - ticks[3] - ticks[4]) / _CLK_TCK  # minus idle and iowait
    return 0.0


@dataclass(frozen=True, slots=True)
class _Snapshot:
    at_ns: int
    received: int
    server_cpu_s: float
    backend_cpu_s: float
    load_cpu_s: float
    core_busy_s: float


# --- one connection ----------------------------------------------------------------------------


class Peer(WSListener):
    """One account's connection: a sender or a receiver."""

    def __init__(self, run: LoadRun, index: int, username: str) -> None:
        super().__init__()
        self.run = run
        self.index = index
        self.username = username
        self.device_id = ""
        self.partner: Peer | None = None
        self.transport: WSTransport | None = None
        self.challenge: asyncio.Future[frames.Challenge] = (
            asyncio.get_running_loop().create_future()
        )
        self.replies: dict[int, asyncio.Future[frames.ServerFrame]] = {}
        self.last_req = 0
        self.counter = 0
        self.pending_acks: list[int] = []
        self.closed = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        ssl_object = transport.underlying_transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der is None or not hmac.compare_digest(fingerprint(der), self.run.config.fingerprint):
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
            self.run.errors += 1
            return
        if isinstance(message, frames.Deliver):
            self.run.on_deliver(self, message)
        elif isinstance(message, frames.Sent):
            pass  # durable on the server; the latency that matters is at the receiver
        elif isinstance(message, frames.Challenge):
            if not self.challenge.done():
                self.challenge.set_result(message)
        elif (req := getattr(message, "req", None)) is not None or isinstance(
            message, frames.Error
        ):
            future = self.replies.pop(req, None) if req is not None else None
            if future is not None and not future.done():
                future.set_result(message)
            elif isinstance(message, frames.Error):
                self.run.errors += 1
                codes = self.run.error_codes
                codes[message.code] = codes.get(message.code, 0) + 1

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        self._fail(ServerRefusedError("disconnected", "the server closed the connection"))
        self.run.disconnects += 1

    def _fail(self, error: Exception) -> None:
        if not self.challenge.done():
            self.challenge.set_exception(error)
            self.challenge.exception()
        for future in self.replies.values():
            if not future.done():
                future.set_exception(error)
        self.replies.clear()

    def new_req(self) -> int:
        """A fresh request id on this connection."""
        self.last_req = self.last_req % MAX_REQ + 1
        return self.last_req

    def send(self, frame: frames.Frame) -> None:
        """Send a frame if the connection is up."""
        if self.transport is not None and not self.closed:
            self.transport.send(WSMsgType.BINARY, frames.encode(frame))

    async def request(self, frame: frames.Frame, req: int, *, wait_s: float) -> frames.ServerFrame:
        """Send a request and wait for its reply; raises ServerRefusedError on error or timeout."""
        future: asyncio.Future[frames.ServerFrame] = asyncio.get_running_loop().create_future()
        self.replies[req] = future
        self.send(frame)
        try:
            reply = await asyncio.wait_for(future, wait_s)
        except TimeoutError:
            raise ServerRefusedError("timeout", "the server did not answer in time") from None
        if isinstance(reply, frames.Error):
            raise ServerRefusedError(reply.code, reply.message)
        return reply

    def flush_acks(self) -> None:
        """Acknowledge everything delivered since the last flush in one frame."""
        seqs, self.pending_acks = self.pending_acks, []
        for start in range(0, len(seqs), frames.MAX_ACKS_PER_FRAME):
            self.send(frames.Ack(seqs=seqs[start : start + frames.MAX_ACKS_PER_FRAME]))


# --- the run ---------------------------------------------------------------------------------


class LoadRun:
    """All connections of one benchmark run, and the counters of the current mode."""

    def __init__(self, config: LoadConfig, body_bytes: int) -> None:
        self.config = config
        self.body_bytes = body_bytes
        self.pad = secrets.token_bytes(max(0, body_bytes - HEADER.size))
        self.id_prefix = secrets.token_bytes(8)
        self.senders: list[Peer] = []
        self.receivers: list[Peer] = []
        self.idle: list[Peer] = []
        self.errors = 0
        self.disconnects = 0
        self._reset()

    def _reset(self) -> None:
        self.window_start_ns = 0
        self.window_end_ns = 0
        self.refill_until_ns = 0
        self.sent_total = 0
        self.received_total = 0
        self.sent_in_window = 0
        self.latencies_ns: list[int] = []
        self.errors = 0
        self.error_codes: dict[str, int] = {}

    # --- setup -------------------------------------------------------------------------------

    async def register_all(self) -> float:
        """Register every sender and receiver account; returns the seconds it took.

        Senders connect to ``sender_url``, receivers to ``receiver_url`` (in a
        cluster, two different nodes: every message crosses the bus); with
        ``node_urls``, pair i's sender to node i mod N and its receiver to the next.
        """
        started = time.perf_counter()
        cfg = self.config
        pairs = max(cfg.pairs, cfg.open_pairs)
        self.senders = [Peer(self, i, f"sender{i:05d}") for i in range(pairs)]
        self.receivers = [Peer(self, i, f"receiver{i:05d}") for i in range(pairs)]
        for sender, receiver in zip(self.senders, self.receivers, strict=True):
            sender.partner = receiver
        gate = asyncio.Semaphore(REGISTER_CONCURRENCY)

        async def one(peer: Peer, url: str, receive: bool) -> None:
            async with gate:
                await self._register(peer, url, receive=receive, keys=ONE_TIME_KEYS)

        urls = cfg.node_urls
        if urls:
            jobs = [one(p, urls[i % len(urls)], False) for i, p in enumerate(self.senders)]
            jobs += [one(p, urls[(i + 1) % len(urls)], True) for i, p in enumerate(self.receivers)]
        else:
            jobs = [one(p, cfg.sender_url, False) for p in self.senders]
            jobs += [one(p, cfg.receiver_url, True) for p in self.receivers]
        await asyncio.wait_for(asyncio.gather(*jobs), 60 + 0.2 * pairs)

        async def befriend(sender: Peer, receiver: Peer) -> None:
            async with gate:
                req = sender.new_req()
                request = frames.ContactAction(req=req, user=receiver.username, action="request")
                await sender.request(request, req, wait_s=30)
                req = receiver.new_req()
                accept = frames.ContactAction(req=req, user=sender.username, action="accept")
                await receiver.request(accept, req, wait_s=30)

        # Messages flow only between accepted contacts: each pair becomes one first.
        pairs_ = zip(self.senders, self.receivers, strict=True)
        await asyncio.wait_for(
            asyncio.gather(*(befriend(s, r) for s, r in pairs_)), 60 + 0.1 * pairs
        )
        return time.perf_counter() - started

    async def idle_connections(self) -> IdleResult:
        """Register ``idle`` more receiving accounts on the sender node and hold them open.

        The server's RSS growth over them, divided by their number, is the memory
        one idle connection costs (an upper bound: it includes the account's
        registration and the allocator's slack).
        """
        cfg = self.config
        pid = cfg.server_pids[0]
        idle = [Peer(self, -1, f"idle{i:06d}") for i in range(cfg.idle)]
        self.idle = idle
        before = process_memory_mb(pid)
        started = time.perf_counter()
        self.errors = 0
        self.disconnects = 0
        gate = asyncio.Semaphore(REGISTER_CONCURRENCY)
        failures = 0

        async def one(peer: Peer) -> None:
            nonlocal failures
            async with gate:
                try:
                    await self._register(
                        peer, cfg.sender_url, receive=True, keys=IDLE_ONE_TIME_KEYS
                    )
                except (BastionError, OSError, TimeoutError):
                    failures += 1

        await asyncio.wait_for(asyncio.gather(*(one(p) for p in idle)), 60 + 0.05 * cfg.idle)
        seconds = time.perf_counter() - started
        await asyncio.sleep(IDLE_SETTLE_S)
        after = process_memory_mb(pid)
        held = sum(1 for p in idle if p.transport is not None and not p.closed)
        per_connection_kib = (after - before) * 1024 / held if held else 0.0
        return IdleResult(
            connections=held,
            seconds=seconds,
            rss_before_mb=before,
            rss_after_mb=after,
            kib_per_connection=per_connection_kib,
            connections_per_gib=1024 * 1024 / per_connection_kib if per_connection_kib > 0 else 0,
            errors=failures + self.errors + self.disconnects,
        )

    async def _register(self, peer: Peer, url: str, *, receive: bool, keys: int) -> None:
        factory: Callable[[], Peer] = lambda: peer  # noqa: E731
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
        challenge = await asyncio.wait_for(peer.challenge, 10)
        identity = AccountIdentity.generate()
        device = OlmDevice.create()
        created = time.time_ns() // 1_000_000
        certificate = DeviceCertificate.issue(
            identity,
            username=peer.username,
            ed25519=device.ed25519,
            curve25519=device.curve25519,
            created_at=created,
        )
        one_time_keys = device.new_one_time_keys(keys)
        fallback = device.new_fallback_key()
        req = peer.new_req()
        reply = await peer.request(
            frames.Register(
                req=req,
                username=peer.username,
                identity_key=identity.public_bytes,
                device=frames.DeviceKeys(
                    device_id=device.device_id,
                    ed25519=device.ed25519,
                    curve25519=device.curve25519,
                    created_at=created,
                    certificate=certificate.signature,
                ),
                signature=device.sign(
                    register_message(
                        challenge.server_name, challenge.nonce, peer.username, device.device_id
                    )
                ),
                one_time_keys=[
                    frames.SignedKey(key=k.key, signature=k.signature) for k in one_time_keys
                ],
                fallback_key=frames.SignedKey(key=fallback.key, signature=fallback.signature),
                receive=receive,
            ),
            req,
            wait_s=30,
        )
        if not isinstance(reply, frames.SignedIn):
            raise ServerRefusedError("unexpected", "registration was not answered with signed_in")
        peer.device_id = device.device_id

    # --- the hot path ------------------------------------------------------------------------

    def send_message(self, sender: Peer, scheduled_ns: int) -> None:
        """Send one message from ``sender`` to its partner, stamped with its scheduled time."""
        partner = sender.partner
        if partner is None or sender.closed:
            return
        sender.counter += 1
        body = HEADER.pack(sender.index, sender.counter, scheduled_ns) + self.pad
        sender.send(
            frames.Send(
                req=sender.new_req(),
                client_msg_id=self.id_prefix + struct.pack(">II", sender.index, sender.counter),
                to=partner.username,
                ciphertexts=[
                    frames.DeviceCiphertext(
                        user=partner.username, device_id=partner.device_id, kind=NORMAL, body=body
                    )
                ],
            )
        )
        self.sent_total += 1
        if self.window_start_ns <= scheduled_ns < self.window_end_ns:
            self.sent_in_window += 1

    def on_deliver(self, receiver: Peer, deliver: frames.Deliver) -> None:
        """Acknowledge, take the latency, and (closed loop) let the sender send the next one."""
        now = time.monotonic_ns()
        if self.config.batch_acks:
            receiver.pending_acks.append(deliver.seq)
            if len(receiver.pending_acks) == 1:
                asyncio.get_running_loop().call_soon(receiver.flush_acks)
        else:
            receiver.send(frames.Ack(seqs=[deliver.seq]))
        try:
            index, _, scheduled_ns = HEADER.unpack_from(deliver.body)
        except struct.error:
            self.errors += 1
            return
        if index >= len(self.senders):
            self.errors += 1
            return
        self.received_total += 1
        if self.window_start_ns <= scheduled_ns < self.window_end_ns:
            self.latencies_ns.append(now - scheduled_ns)
        if now < self.refill_until_ns:
            self.send_message(self.senders[index], now)

    # --- modes -------------------------------------------------------------------------------

    async def closed_loop(self) -> ModeResult:
        """Each sender keeps ``window`` messages in flight (sent, not yet delivered)."""
        self._reset()
        cfg = self.config
        start = time.monotonic_ns()
        self.window_start_ns = start + int(cfg.warmup * _NS)
        self.window_end_ns = self.window_start_ns + int(cfg.seconds * _NS)
        self.refill_until_ns = self.window_end_ns
        for sender in self.senders[: cfg.pairs]:
            for _ in range(cfg.window):
                self.send_message(sender, time.monotonic_ns())
        first, last = await self._snapshots()
        self.refill_until_ns = 0
        await self._drain()
        return self._result("closed", f"W={cfg.window}, {cfg.pairs} pairs", first, last)

    async def open_loop(self) -> ModeResult:
        """A fixed total rate; latency counts from the scheduled time (no coordinated omission)."""
        self._reset()
        cfg = self.config
        rate = cfg.rate
        start = time.monotonic_ns() + 10_000_000
        total = int(rate * (cfg.warmup + cfg.seconds))
        self.window_start_ns = start + int(cfg.warmup * _NS)
        self.window_end_ns = self.window_start_ns + int(cfg.seconds * _NS)
        hard_stop = start + int((2 * (cfg.warmup + cfg.seconds) + 5) * _NS)
        snapshots = asyncio.get_running_loop().create_task(self._snapshots())
        senders = self.senders[: cfg.open_pairs]
        n = 0
        while n < total:
            now = time.monotonic_ns()
            if now > hard_stop:
                break
            due = min(total, (now - start) * rate // _NS + 1) if now >= start else 0
            while n < due:
                self.send_message(senders[n % len(senders)], start + int(n * _NS / rate))
                n += 1
            await asyncio.sleep(0.001)  # uvloop timers have 1 ms resolution
        for k in range(n, total):  # never sent: the generator fell behind; count them as missing
            if self.window_start_ns <= start + int(k * _NS / rate) < self.window_end_ns:
                self.sent_in_window += 1
        first, last = await snapshots
        await self._drain()
        return self._result("open", f"{rate:.0f}/s, {len(senders)} pairs", first, last)

    async def _snapshots(self) -> tuple[_Snapshot, _Snapshot]:
        first = await self._snapshot_at(self.window_start_ns)
        last = await self._snapshot_at(self.window_end_ns)
        return first, last

    async def _snapshot_at(self, at_ns: int) -> _Snapshot:
        delay = (at_ns - time.monotonic_ns()) / _NS
        if delay > 0:
            await asyncio.sleep(delay)
        return _Snapshot(
            at_ns=time.monotonic_ns(),
            received=self.received_total,
            server_cpu_s=processes_cpu_s(self.config.server_pids),
            backend_cpu_s=self._backend_cpu_s(),
            load_cpu_s=time.process_time(),
            core_busy_s=core_busy_s(self.config.server_cpu),
        )

    def _backend_cpu_s(self) -> float:
        """CPU seconds of Redis and every PostgreSQL process (cluster runs only)."""
        if self.config.redis_pid is None:
            return 0.0
        return processes_cpu_s([self.config.redis_pid, *postgres_pids()])

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.config.drain_s
        while self.received_total < self.sent_total and time.monotonic() < deadline:
            if all(p.closed for p in self.receivers):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # let the last acknowledgements reach the store

    def _result(self, mode: str, load: str, first: _Snapshot, last: _Snapshot) -> ModeResult:
        elapsed = (last.at_ns - first.at_ns) / _NS
        delivered = last.received - first.received
        latencies = sorted(self.latencies_ns)
        server_cpu = last.server_cpu_s - first.server_cpu_s
        backend_cpu = last.backend_cpu_s - first.backend_cpu_s
        others = max(0.0, last.core_busy_s - first.core_busy_s - server_cpu)
        return ModeResult(
            mode=mode,
            load=load,
            seconds=elapsed,
            sent=self.sent_in_window,
            delivered=delivered,
            delivered_per_s=delivered / elapsed if elapsed > 0 else 0.0,
            p50_ms=_percentile_ms(latencies, 0.50),
            p99_ms=_percentile_ms(latencies, 0.99),
            p999_ms=_percentile_ms(latencies, 0.999),
            max_ms=latencies[-1] / 1e6 if latencies else 0.0,
            missing=max(0, self.sent_in_window - len(latencies)),
            errors=self.errors + self.disconnects,
            error_codes=dict(self.error_codes),
            server_cpu_us_per_msg=server_cpu / delivered * 1e6 if delivered else 0.0,
            server_cpu_util=server_cpu / elapsed if elapsed > 0 else 0.0,
            server_rss_mb=processes_memory_mb(self.config.server_pids),
            load_cpu_util=(last.load_cpu_s - first.load_cpu_s) / elapsed if elapsed > 0 else 0.0,
            others_on_server_core=others / elapsed if elapsed > 0 else 0.0,
            backend_cpu_us_per_msg=(
                backend_cpu / delivered * 1e6
                if delivered and self.config.redis_pid is not None
                else None
            ),
        )

    async def close(self) -> None:
        """Close every connection."""
        for peer in [*self.senders, *self.receivers, *self.idle]:
            if peer.transport is not None and not peer.closed:
                peer.transport.send_close(WSCloseCode.OK)
                peer.transport.disconnect()
        await asyncio.sleep(0.1)


def _percentile_ms(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile in milliseconds (0.0 with no samples)."""
    if not sorted_ns:
        return 0.0
    rank = min(len(sorted_ns), max(1, math.ceil(q * len(sorted_ns))))
    return sorted_ns[rank - 1] / 1e6


async def run(config: LoadConfig) -> LoadReport:
    """Register the accounts, run each requested mode, then the client crypto figure."""
    body_bytes = sample_ciphertext_bytes()
    load = LoadRun(config, body_bytes)
    try:
        register_s = await load.register_all()
        await asyncio.sleep(0.5)  # let the receivers' catch-up finish
        results = []
        for mode in config.modes:
            if mode == "closed":
                results.append(await load.closed_loop())
            elif mode == "open":
                results.append(await load.open_loop())
            else:
                raise BenchmarkError(f"unknown mode {mode!r}")
        peak = processes_memory_mb(config.server_pids, "VmHWM")
        idle = await load.idle_connections() if config.idle > 0 else None
    finally:
        await load.close()
    crypto = measure(seconds=config.crypto_seconds) if config.crypto_seconds > 0 else None
    return LoadReport(
        accounts=2 * max(config.pairs, config.open_pairs) + config.idle,
        register_s=register_s,
        body_bytes=body_bytes,
        modes=results,
        crypto=crypto,
        server_peak_rss_mb=peak,
        idle=idle,
    )


def _run_loop(config: LoadConfig) -> LoadReport:
    try:
        import uvloop  # a project dependency where the platform has it
    except ImportError:
        return asyncio.run(run(config))
    return uvloop.run(run(config))


def main(argv: list[str]) -> int:
    """Entry point: one JSON LoadConfig argument in, one JSON LoadReport on standard output."""
    if len(argv) != 1:
        print("usage: _load.py CONFIG_JSON", file=sys.stderr)
        return 2
    config = msgspec.json.decode(argv[0], type=LoadConfig)
    report = _run_loop(config)
    sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
