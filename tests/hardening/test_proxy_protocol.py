"""Client addresses through a load balancer: PROXY headers, believed only from the balancer.

The network tests put a small PROXY-speaking forwarder in front of a real
server, as HAProxy with ``send-proxy-v2`` (or nginx with ``proxy_protocol on``)
would be: it connects from 127.0.0.1, which the server's config names as its
balancer, and says which client address each connection carries.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from proxyprotocol.result import ProxyResult, ProxyResultIPv4, ProxyResultIPv6, ProxyResultLocal
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

from bastion.client import Client
from bastion.errors import BastionError, ConfigError, ServerRefusedError
from bastion.server.config import parse_networks, parse_settings
from bastion.server.net.proxy import ProxyHeaderError, is_trusted, read_client_address
from tests.conftest import PASSPHRASE, ServerProcess, free_port
from tests.hardening.harness import admin
from tests.helpers import TcpForwarder

pytestmark = pytest.mark.network

BALANCER = parse_networks(["127.0.0.1/32", "fd00::/8"], source="test")


def v4(client: str) -> ProxyResult:
    return ProxyResultIPv4(
        (ipaddress.IPv4Address(client), 40000), (ipaddress.IPv4Address("10.0.0.11"), 8443)
    )


# --- what is believed ------------------------------------------------------------------------


def test_only_the_balancers_own_addresses_are_trusted() -> None:
    assert is_trusted("127.0.0.1", BALANCER)
    assert is_trusted("::ffff:127.0.0.1", BALANCER)  # an IPv4 peer on a dual-stack socket
    assert is_trusted("fd00::5", BALANCER)
    assert not is_trusted("127.0.0.2", BALANCER)
    assert not is_trusted("203.0.113.7", BALANCER)
    assert not is_trusted("unknown", BALANCER)


def test_the_balancers_are_named_in_the_config_file() -> None:
    settings = parse_settings(b'[network]\nproxy_protocol_from = ["10.0.0.2", "10.1.0.0/16"]\n')
    assert [str(n) for n in settings.proxy_protocol_from] == ["10.0.0.2/32", "10.1.0.0/16"]
    assert parse_settings(b"").proxy_protocol_from == ()
    for bad in (
        b'[network]\nproxy_protocol_from = "10.0.0.2"\n',
        b'[network]\nproxy_protocol_from = ["balancer.internal"]\n',
        b'[network]\nproxy_protocol_from = ["10.0.0.1/8"]\n',  # host bits set: a typo
        b'[network]\nproxy_from = ["10.0.0.2"]\n',
    ):
        with pytest.raises(ConfigError, match="network"):
            parse_settings(bad, source="bastion.toml")


async def _header_then(data: bytes) -> tuple[str | None, bytes]:
    """Feed ``data`` to the header reader; returns the address and what it left unread."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        address = await asyncio.wait_for(read_client_address(ours), 5)
        loop = asyncio.get_running_loop()
        rest = b""
        while chunk := await loop.sock_recv(ours, 4096):
            rest += chunk
        return address, rest
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("version", [ProxyProtocolV1(), ProxyProtocolV2()])
async def test_a_header_gives_the_client_address_and_leaves_the_tls_bytes(
    version: ProxyProtocolV1 | ProxyProtocolV2,
) -> None:
    hello = b"\x16\x03\x01\x02\x00" + bytes(50)  # the start of a TLS ClientHello
    assert await _header_then(version.pack(v4("203.0.113.7")) + hello) == ("203.0.113.7", hello)
    six = ProxyResultIPv6(
        (ipaddress.IPv6Address("2001:db8::7"), 40000), (ipaddress.IPv6Address("fd00::11"), 8443)
    )
    assert await _header_then(version.pack(six) + hello) == ("2001:db8::7", hello)


async def test_a_balancers_own_check_names_no_client() -> None:
    assert await _header_then(ProxyProtocolV2().pack(ProxyResultLocal())) == (None, b"")
    assert await _header_then(b"PROXY UNKNOWN\r\n") == (None, b"")


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00" + bytes(50),  # TLS straight away: no header
        b"PROXY TCP4 203.0.113.7\r\n",  # fields missing
        b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 8443",  # cut off before the line end
        b"PROXY " + b"9" * 600 + b"\r\n",  # far longer than any header
        ProxyProtocolV2().pack(v4("203.0.113.7"))[:20],  # cut off
        b"",  # connected and closed: a plain TCP health check
    ],
)
async def test_anything_else_from_the_balancer_is_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        await _header_then(data)


# --- through a real server -------------------------------------------------------------------


class ProxyForwarder(TcpForwarder):
    """A balancer in miniature that announces each connection with a PROXY header."""

    def __init__(self, backend: int, client: str, *, version: int = 2) -> None:
        super().__init__([backend])
        self.client = client
        self.version = version

    def greeting(self) -> bytes:
        packer = ProxyProtocolV2() if self.version == 2 else ProxyProtocolV1()
        if ":" in self.client:
            return packer.pack(
                ProxyResultIPv6(
                    (ipaddress.IPv6Address(self.client), 40000),
                    (ipaddress.IPv6Address("fd00::11"), 8443),
                )
            )
        return packer.pack(v4(self.client))

    async def __aenter__(self) -> ProxyForwarder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@pytest.fixture
async def behind_balancer(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    server = ServerProcess(tmp_path / "node", free_port())
    server.data_dir.mkdir(mode=0o700)
    (server.data_dir / "bastion.toml").write_text(
        '[network]\nproxy_protocol_from = ["127.0.0.1"]\n'
        "[limits]\nregistrations_per_address_burst = 2\nregistrations_per_address_per_hour = 1\n"
    )
    server.start()
    yield server
    server.kill()


async def _register(server: ServerProcess, root: Path, name: str, url: str) -> None:
    client = await Client.register(
        root / name, PASSPHRASE, username=name, server_url=url, fingerprint=server.fingerprint
    )
    await client.close()


async def test_limits_count_each_client_address_the_balancer_names(
    behind_balancer: ServerProcess, tmp_path: Path
) -> None:
    server = behind_balancer
    async with (
        ProxyForwarder(server.port, "203.0.113.7") as crowd,
        ProxyForwarder(server.port, "198.51.100.9", version=1) as other,
    ):
        await _register(server, tmp_path, "ann", crowd.url)
        await _register(server, tmp_path, "ben", crowd.url)
        with pytest.raises(ServerRefusedError) as caught:
            await _register(server, tmp_path, "cat", crowd.url)
        assert caught.value.code == "rate_limited"
        # Another client behind the same balancer is not held back by the first one.
        await _register(server, tmp_path, "dan", other.url)
    audit = admin(server.data_dir, "audit", "show").stdout
    assert "key=203.0.113.7" in audit  # the limit hit names the client, not the balancer
    assert "127.0.0.1" not in audit


async def test_an_ipv6_client_is_counted_by_its_64_network(
    behind_balancer: ServerProcess, tmp_path: Path
) -> None:
    server = behind_balancer
    async with (
        ProxyForwarder(server.port, "2001:db8:1:2::1") as first,
        ProxyForwarder(server.port, "2001:db8:1:2::2") as second,
        ProxyForwarder(server.port, "2001:db8:1:2:a:b:c:d") as third,
        ProxyForwarder(server.port, "2001:db8:1:3::1") as neighbour,
    ):
        await _register(server, tmp_path, "ann", first.url)
        await _register(server, tmp_path, "ben", second.url)
        # A third address of the same /64 is the same client: over the burst of 2.
        with pytest.raises(ServerRefusedError) as caught:
            await _register(server, tmp_path, "cat", third.url)
        assert caught.value.code == "rate_limited"
        # The next /64 is someone else.
        await _register(server, tmp_path, "dan", neighbour.url)
    audit = admin(server.data_dir, "audit", "show").stdout
    assert "key=2001:db8:1:2::/64" in audit


async def test_a_connection_from_the_balancer_without_a_header_is_dropped(
    behind_balancer: ServerProcess, tmp_path: Path
) -> None:
    with pytest.raises((BastionError, OSError)):
        await asyncio.wait_for(
            _register(behind_balancer, tmp_path, "sneaky", behind_balancer.url), 20
        )
    async with ProxyForwarder(behind_balancer.port, "203.0.113.7") as balancer:
        await _register(behind_balancer, tmp_path, "honest", balancer.url)  # still serving


async def test_a_client_that_is_not_the_balancer_cannot_claim_an_address(tmp_path: Path) -> None:
    """Only the listed balancers are believed: from anywhere else a PROXY header is no TLS."""
    server = ServerProcess(tmp_path / "node", free_port())
    server.data_dir.mkdir(mode=0o700)
    (server.data_dir / "bastion.toml").write_text(
        '[network]\nproxy_protocol_from = ["10.0.0.0/8"]\n'  # the balancer is elsewhere
        "[limits]\nregistrations_per_address_burst = 1\nregistrations_per_address_per_hour = 1\n"
    )
    server.start()
    try:
        async with ProxyForwarder(server.port, "203.0.113.7") as spoofer:
            with pytest.raises((BastionError, OSError)):
                await asyncio.wait_for(_register(server, tmp_path, "spoof", spoofer.url), 20)
        # Served as usual, counted under its own address: the first registration passes,
        # the second from the same address is over the limit.
        await _register(server, tmp_path, "direct", server.url)
        with pytest.raises(ServerRefusedError) as caught:
            await _register(server, tmp_path, "again", server.url)
        assert caught.value.code == "rate_limited"
    finally:
        server.kill()
    assert "key=127.0.0.1" in admin(server.data_dir, "audit", "show").stdout
