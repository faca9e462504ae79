"""Slow-loris family: each stalling client is cut off within its timeout, and a fresh
client still connects in under a second while it stalls."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import ssl
import time
from pathlib import Path

import pytest

from bastion.client import Client
from bastion.client.transport import ServerConnection
from bastion.protocol import frames
from tests.conftest import Profiles, ServerProcess
from tests.hardening.harness import ConfiguredServers, greeting_time, wait_closed
from tests.helpers import drain

pytestmark = pytest.mark.network

ESTABLISHED = "01"  # TCP state code in /proc/net/tcp

SHORT: dict[str, float] = {
    "tls_handshake_timeout_s": 1,
    "websocket_open_timeout_s": 1,
    "signin_timeout_s": 1,
    "heartbeat_idle_s": 0.5,
    "heartbeat_reply_s": 0.5,
}


def _insecure_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the test only needs the bytes to flow
    return ctx


async def test_tcp_connection_that_never_sends_a_client_hello_is_dropped(
    servers: ConfiguredServers,
) -> None:
    server = servers.start(**SHORT)
    stalled = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(20)]
    try:
        assert await greeting_time(server) < 1.0
        took = await wait_closed(stalled[0][0], 4.0)
        assert 0.5 < took < 3.0
    finally:
        for _, writer in stalled:
            writer.close()


async def test_byte_by_byte_websocket_upgrade_is_dropped(servers: ConfiguredServers) -> None:
    server = servers.start(**SHORT)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", server.port, ssl=_insecure_context()
    )
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n" * 10

    async def drip() -> None:
        for byte in request:
            writer.write(bytes([byte]))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            await asyncio.sleep(0.05)

    dripping = asyncio.create_task(drip())
    try:
        assert await greeting_time(server) < 1.0
        took = await wait_closed(reader, 4.0)
        assert took < 3.0
    finally:
        dripping.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await dripping
        writer.close()


async def test_connection_that_never_signs_in_is_dropped(servers: ConfiguredServers) -> None:
    server = servers.start(**SHORT)
    idle = await ServerConnection.open(server.url, pin=server.fingerprint)
    try:
        assert await greeting_time(server) < 1.0
        await asyncio.wait_for(idle.disconnected.wait(), 4.0)
        assert idle.close_reason == "sign-in timeout"
    finally:
        await idle.aclose()


def _pause(client: Client) -> asyncio.Transport:
    assert client.conn is not None
    assert client.conn._transport is not None
    transport: asyncio.Transport = client.conn._transport.underlying_transport
    transport.pause_reading()
    return transport


async def test_signed_in_socket_that_goes_silent_is_dropped_by_the_heartbeat(
    tmp_path: Path, servers: ConfiguredServers
) -> None:
    # Signing in is not what is tested here: give it room on a loaded machine.
    server = servers.start(**{**SHORT, "signin_timeout_s": 10})
    profiles = Profiles(tmp_path, server)
    try:
        silent = await profiles.online("silent", receive=False)
        transport = _pause(silent)  # no longer reads, so never answers a ping
        await asyncio.sleep(2.5)
        assert await greeting_time(server) < 1.0
        transport.resume_reading()
        assert silent.conn is not None
        # Had the server kept it, the client would now answer the ping and stay connected.
        await asyncio.wait_for(silent.conn.disconnected.wait(), 2.0)
    finally:
        await profiles.close()


def _server_socket_states(server: ServerProcess, client_port: int) -> list[str]:
    """TCP states of the server's side of the connection from ``client_port``."""
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                if (
                    int(local.rsplit(":", 1)[1], 16) == server.port
                    and int(remote.rsplit(":", 1)[1], 16) == client_port
                ):
                    states.append(state)
    return states


def _rss_bytes(server: ServerProcess) -> int:
    """The server process's resident memory."""
    assert server.proc is not None
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


async def test_client_that_stops_reading_is_cut_off_and_its_buffer_freed(
    tmp_path: Path, servers: ConfiguredServers
) -> None:
    server = servers.start(
        max_write_buffer_bytes=65536,
        slow_reader_grace_s=1,
        messages_per_second=1000,
        messages_burst=1000,
    )
    profiles = Profiles(tmp_path, server)
    try:
        sender = await profiles.online("sender", receive=False)
        reader = await profiles.online("reader")
        await profiles.befriend("sender", "reader")
        await drain(reader)
        rss_before = _rss_bytes(server)
        transport = _pause(reader)
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client_port = sock.getsockname()[1]
        started = time.monotonic()
        assert sender.conn is not None
        conn = sender.conn
        # The server relays ciphertext it cannot read: big opaque bodies fill the pipe fast.
        body = secrets.token_bytes(frames.MAX_BODY_BYTES - 1024)
        copy = frames.DeviceCiphertext(
            user="reader", device_id=reader.account.device_id, kind=1, body=body
        )

        async def push_one() -> None:
            req = conn.next_req()
            send = frames.Send(
                req=req, client_msg_id=secrets.token_bytes(16), to="reader", ciphertexts=[copy]
            )
            await conn.request(send, req)

        pushed = 0
        for _ in range(40):
            if "connection.slow_reader" in server.log_text():
                break
            if ESTABLISHED not in _server_socket_states(server, client_port):
                break
            await asyncio.gather(*(push_one() for _ in range(8)))
            pushed += 8 * len(body)
        assert await greeting_time(server) < 1.0
        deadline = time.monotonic() + 3.0
        while ESTABLISHED in _server_socket_states(server, client_port):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        # The server process has let go of the socket and its buffered megabytes (what is
        # left, if anything, is an orphan the kernel times out on its own).
        assert ESTABLISHED not in _server_socket_states(server, client_port)
        assert time.monotonic() - started < 20
        # Memory stays bounded: the server never holds more than its write-buffer limit
        # for the reader.
        # Keep sending to the cut-off reader: it all goes to the database, not to memory.
        while pushed < 16 * 2**20:
            await asyncio.gather(*(push_one() for _ in range(8)))
            pushed += 8 * len(body)
        grown = _rss_bytes(server) - rss_before
        assert grown < pushed // 2, (grown, pushed)
    finally:
        await profiles.close()


async def test_client_that_never_reads_is_cut_within_the_grace_and_its_socket_aborted(
    tmp_path: Path, servers: ConfiguredServers
) -> None:
    # Heartbeats far off: only slow_reader_grace_s may cut the reader here.
    server = servers.start(slow_reader_grace_s=1, messages_per_second=1000, messages_burst=1000)
    profiles = Profiles(tmp_path, server)
    try:
        sender = await profiles.online("sender", receive=False)
        reader = await profiles.online("reader")
        await profiles.befriend("sender", "reader")
        await drain(reader)
        transport = _pause(reader)
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client_port = sock.getsockname()[1]
        assert sender.conn is not None
        conn = sender.conn
        body = secrets.token_bytes(frames.MAX_BODY_BYTES - 1024)
        copy = frames.DeviceCiphertext(
            user="reader", device_id=reader.account.device_id, kind=1, body=body
        )

        async def push_one() -> None:
            req = conn.next_req()
            send = frames.Send(
                req=req, client_msg_id=secrets.token_bytes(16), to="reader", ciphertexts=[copy]
            )
            await conn.request(send, req)

        # 1.5 MiB: far less than max_write_buffer_bytes, and little enough that the kernel's
        # autotuned buffers once took it all, so the server never noticed (until the heartbeat).
        for _ in range(3):
            await asyncio.gather(*(push_one() for _ in range(8)))
        pushed_at = time.monotonic()
        states = []
        for _ in range(100):  # 10 s at most: the grace (1 s) and a generous margin
            states = _server_socket_states(server, client_port)
            if not states:
                break
            await asyncio.sleep(0.1)
        took = time.monotonic() - pushed_at
        # Aborted, not closed gracefully: no FIN-WAIT-1 socket holding the unread megabytes.
        assert states == [], (states, took)
        assert took < 1 + 5
    finally:
        await profiles.close()
