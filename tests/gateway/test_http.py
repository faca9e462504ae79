"""The HTTP and WebSocket door of a real ``bastion gateway --http 0``, with a real HTTP client."""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import ipaddress
import os
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bastion.gateway import paths
from bastion.gateway.rpc import MAX_REQUEST_BYTES
from tests.conftest import ServerProcess, free_port
from tests.gateway.support import GatewayProcess
from tests.test_cli import bastion, befriend, register

pytestmark = pytest.mark.network

APP_ORIGIN = "https://app.example"
WAIT_S = 30.0
TIMEOUT = aiohttp.ClientTimeout(total=WAIT_S)


@dataclass
class World:
    """One server; alice's gateway with an HTTP door, bob's with the Unix socket only."""

    alice: Path
    bob: Path
    carol: Path
    gateway: GatewayProcess
    bob_gateway: GatewayProcess

    @property
    def url(self) -> str:
        return str(self.gateway.ready["http"])

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def token(self) -> str:
        return paths.read_token(self.alice)

    def auth(self, **more: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **more}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("http")
    server = ServerProcess(root / "server", free_port())
    server.start()
    alice = bob = None
    started: list[GatewayProcess] = []
    try:
        alice = register(server, "alice", root)
        bob = register(server, "bob", root)
        carol = register(server, "carol", root)
        befriend(alice, "alice", bob, "bob")
        gateway = GatewayProcess(alice, "--http", "0")
        bob_gateway = GatewayProcess(bob)
        started += [gateway, bob_gateway]
        gateway.start()
        bob_gateway.start()
        yield World(alice, bob, carol, gateway, bob_gateway)
    finally:
        for gw in started:
            gw.kill()
        server.stop()


def upgrade(**more: str) -> dict[str, str]:
    """The headers of a WebSocket upgrade, to read a refusal's body with a plain GET."""
    key = base64.b64encode(os.urandom(16)).decode()
    return {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": key,
        **more,
    }


async def refused(
    response: aiohttp.ClientResponse, status: int, code: str | int, says: str
) -> dict[str, Any]:
    """Assert a refusal: its status, a JSON-RPC error body with the reason, the safe headers."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"
    assert "Access-Control-Allow-Origin" not in response.headers
    body: dict[str, Any] = await response.json()
    error = body["error"]
    assert error.get("data", {}).get("code", error["code"]) == code, body
    assert says in error["message"], body
    return body


async def test_every_check_refuses_with_its_status_and_a_reason(world: World) -> None:
    rpc = world.url + "/rpc"
    status = {"jsonrpc": "2.0", "id": 1, "method": "status"}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.post(rpc, json=status) as r:
            await refused(r, 401, "unauthorized", "no token")
        async with http.post(rpc, json=status, headers={"Authorization": "Bearer nope"}) as r:
            await refused(r, 401, "unauthorized", "wrong token")
        async with http.post(rpc, json=status, headers={"Authorization": "Basic abc"}) as r:
            await refused(r, 401, "unauthorized", "no token")
        evil_host = world.auth(Host=f"evil.example:{world.port}")
        async with http.post(rpc, json=status, headers=evil_host) as r:
            await refused(r, 421, "wrong_host", "DNS rebinding")
        async with http.post(rpc, json=status, headers=world.auth(Host="127.0.0.1:1")) as r:
            await refused(r, 421, "wrong_host", "Host header")
        foreign = world.auth(Origin="http://evil.example")
        async with http.post(rpc, json=status, headers=foreign) as r:
            await refused(r, 403, "forbidden_origin", "--http-origin")
        async with http.post(rpc, json=status, headers=world.auth(Origin="null")) as r:
            await refused(r, 403, "forbidden_origin", "origin")
        async with http.get(rpc, headers=world.auth()) as r:
            await refused(r, 405, "method_not_allowed", "POST")
        async with http.options(rpc, headers={"Origin": "http://evil.example"}) as r:
            await refused(r, 403, "forbidden_origin", "origin")
        async with http.post(
            rpc, data=b"{}", headers=world.auth(**{"Content-Type": "text/plain"})
        ) as r:
            await refused(r, 415, "unsupported_media_type", "application/json")
        big = b'{"pad":"' + b"x" * MAX_REQUEST_BYTES + b'"}'
        json_type = {"Content-Type": "application/json"}
        async with http.post(rpc, data=io.BytesIO(big), headers=world.auth(**json_type)) as r:
            await refused(r, 413, -32600, "too long")
        async with http.post(rpc, data=b"{not json", headers=world.auth(**json_type)) as r:
            assert r.status == 200
            assert (await r.json())["error"]["code"] == -32700
        unknown = {"jsonrpc": "2.0", "id": 2, "method": "launch_missiles"}
        async with http.post(rpc, json=unknown, headers=world.auth()) as r:
            assert (await r.json())["error"]["code"] == -32601
        bad = {"jsonrpc": "2.0", "id": 3, "method": "send", "params": {"to": "bob"}}
        async with http.post(rpc, json=bad, headers=world.auth()) as r:
            error = (await r.json())["error"]
            assert (error["code"], "text" in error["message"]) == (-32602, True)
        async with http.get(world.url + "/nowhere", headers=world.auth()) as r:
            await refused(r, 404, "http", "cannot answer")

        ws = world.url + "/ws"
        foreign_ws = upgrade(Origin="http://evil.example", **world.auth())
        async with http.get(ws, headers=foreign_ws) as r:
            await refused(r, 403, "forbidden_origin", "origin")
        async with http.get(ws, headers=upgrade(Host=f"evil.example:{world.port}")) as r:
            await refused(r, 421, "wrong_host", "Host")
        async with http.get(ws, headers=upgrade()) as r:
            await refused(r, 401, "unauthorized", "no token")
        wrong = upgrade(**{"Sec-WebSocket-Protocol": "bastion, bastion.token.nope"})
        async with http.get(ws, headers=wrong) as r:
            await refused(r, 401, "unauthorized", "wrong token")
        only_token = upgrade(**{"Sec-WebSocket-Protocol": f"bastion.token.{world.token}"})
        async with http.get(ws, headers=only_token) as r:
            await refused(r, 400, "subprotocol", "'bastion'")
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await http.ws_connect(ws, origin="http://evil.example", headers=world.auth())
        assert caught.value.status == 403


async def test_the_door_never_takes_a_token_in_the_url(world: World) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        status = {"jsonrpc": "2.0", "id": 1, "method": "status"}
        async with http.post(f"{world.url}/rpc?token={world.token}", json=status) as r:
            await refused(r, 401, "unauthorized", "no token")
    assert world.token not in world.gateway.log_text()


async def test_send_and_history_round_trip_over_http(world: World) -> None:
    rpc = world.url + "/rpc"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:

        async def call(method: str, **params: Any) -> Any:
            request = {"jsonrpc": "2.0", "id": method, "method": method, "params": params}
            async with http.post(rpc, json=request, headers=world.auth()) as r:
                assert r.status == 200
                assert r.headers["Cache-Control"] == "no-store"
                body = await r.json()
            assert "error" not in body, body
            return body["result"]

        await until_connected(call)
        sent = await call("send", to="bob", text="over http")
        assert (sent["type"], sent["to"], sent["state"]) == ("sent", "bob", "stored")
        texts = [m["text"] for m in await call("history", user="bob")]
        assert texts[-1] == "over http"
        assert "over http" not in world.gateway.log_text()

        same_origin = world.auth(Origin=f"http://127.0.0.1:{world.port}")
        batch = [
            {"jsonrpc": "2.0", "id": 1, "method": "whoami"},
            {"jsonrpc": "2.0", "method": "status"},
        ]
        async with http.post(rpc, json=batch, headers=same_origin) as r:
            answers = await r.json()
        assert [a["id"] for a in answers] == [1]
        assert answers[0]["result"]["user"] == "alice"
        notification = {"jsonrpc": "2.0", "method": "status"}
        async with http.post(rpc, json=notification, headers=world.auth()) as r:
            assert (r.status, await r.read()) == (204, b"")


async def until_connected(call: Callable[..., Awaitable[Any]], who: str = "alice") -> None:
    """Wait (bounded) until a gateway's kept connection is up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while (await call("status"))["connection"] != "connected":
        if loop.time() > deadline:
            raise AssertionError(f"{who}'s gateway did not connect")
        await asyncio.sleep(0.1)


async def test_subscribe_over_websocket_delivers_a_live_message(world: World) -> None:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as http,
        http.ws_connect(world.url + "/ws", headers=world.auth()) as ws,
    ):
        await ws.send_json({"jsonrpc": "2.0", "id": 1, "method": "subscribe"})
        seen: list[dict[str, Any]] = []
        while not any(m.get("id") == 1 for m in seen):
            seen.append(await ws.receive_json(timeout=WAIT_S))
        async with await world.bob_gateway.link() as link:
            await until_connected(link.call, "bob")
            await link.call("send", to="alice", text="live from bob")
        while True:
            message = await ws.receive_json(timeout=WAIT_S)
            if message.get("method") != "event":
                continue
            event = message["params"]
            if event.get("type") == "message" and event.get("text") == "live from bob":
                assert event["from"] == "bob"
                break
        await ws.send_str('{"jsonrpc":"2.0","id":9,"method":"nope"}')
        while True:
            answer = await ws.receive_json(timeout=WAIT_S)
            if answer.get("id") == 9:
                assert answer["error"]["code"] == -32601
                break


async def test_websocket_token_as_subprotocol(world: World) -> None:
    protocols = ("bastion", f"bastion.token.{world.token}")
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as http,
        http.ws_connect(world.url + "/ws", protocols=protocols) as ws,
    ):
        assert ws.protocol == "bastion"
        await ws.send_json({"jsonrpc": "2.0", "id": "w", "method": "whoami"})
        answer = await ws.receive_json(timeout=WAIT_S)
        assert answer["result"]["user"] == "alice"
        await ws.send_bytes(b'{"jsonrpc":"2.0","id":1,"method":"whoami"}')
        answer = await ws.receive_json(timeout=WAIT_S)
        assert answer["error"]["message"] == "send JSON-RPC in text frames"
        await ws.send_str(" " * (MAX_REQUEST_BYTES + 1))
        closing = await ws.receive(timeout=WAIT_S)
        assert closing.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


def test_files_and_folder_are_for_the_owner_only(world: World) -> None:
    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(world.alice / paths.TOKEN_FILE) == 0o600
    assert mode(world.alice / paths.SOCKET_FILE) == 0o600
    assert mode(world.alice) == 0o700


def test_off_loopback_without_tls_is_refused(tmp_path: Path) -> None:
    result = bastion(
        "gateway",
        "--http",
        "0",
        "--http-host",
        "0.0.0.0",
        "--profile",
        str(tmp_path / "nobody"),
        check=False,
    )
    assert result.returncode == 1
    assert "reachable from other machines, so it needs TLS" in result.stderr
    assert not (tmp_path / "nobody").exists()


def test_a_bad_origin_option_is_refused(tmp_path: Path) -> None:
    result = bastion(
        "gateway",
        "--http",
        "0",
        "--http-origin",
        "https://app.example/path",
        "--profile",
        str(tmp_path / "nobody"),
        check=False,
    )
    assert result.returncode == 1
    assert "is not an origin like https://app.example" in result.stderr


def self_signed(folder: Path) -> tuple[Path, Path, bytes]:
    """A certificate for 127.0.0.1 and its key, written to ``folder``; returns the PEM too."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = folder / "door.crt", folder / "door.key"
    cert_path.write_bytes(pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path, pem


async def test_tls_door_with_a_pinned_certificate_and_an_allowed_origin(
    world: World, tmp_path: Path
) -> None:
    cert, key, pem = self_signed(tmp_path)
    gateway = GatewayProcess(
        world.carol,
        *("--http", "0", "--tls-cert", str(cert), "--tls-key", str(key)),
        *("--http-origin", APP_ORIGIN),
    )
    try:
        ready = gateway.start()
        assert ready["http"].startswith("https://127.0.0.1:")
        pinned = ssl.create_default_context(cadata=pem.decode())
        token = paths.read_token(world.carol)
        auth = {"Authorization": f"Bearer {token}"}
        whoami = {"jsonrpc": "2.0", "id": 1, "method": "whoami"}
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            async with http.post(
                ready["http"] + "/rpc", json=whoami, headers=auth, ssl=pinned
            ) as r:
                assert (await r.json())["result"]["user"] == "carol"
            preflight = {
                "Origin": APP_ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            }
            async with http.options(ready["http"] + "/rpc", headers=preflight, ssl=pinned) as r:
                assert r.status == 204
                assert r.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
                assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
            from_app = {**auth, "Origin": APP_ORIGIN}
            async with http.post(
                ready["http"] + "/rpc", json=whoami, headers=from_app, ssl=pinned
            ) as r:
                assert r.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
                assert (await r.json())["result"]["user"] == "carol"
            protocols = ("bastion", f"bastion.token.{token}")
            wss = "wss" + ready["http"].removeprefix("https") + "/ws"
            async with http.ws_connect(
                wss, protocols=protocols, ssl=pinned, origin=APP_ORIGIN
            ) as ws:
                await ws.send_json(whoami)
                assert (await ws.receive_json(timeout=WAIT_S))["result"]["user"] == "carol"
            plain = "http" + ready["http"].removeprefix("https") + "/rpc"
            with pytest.raises(aiohttp.ClientError):
                async with http.post(plain, json=whoami, headers=auth) as r:
                    await r.read()
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with http.post(ready["http"] + "/rpc", json=whoami, headers=auth) as r:
                    await r.read()
        assert gateway.stop() == 0
    finally:
        gateway.kill()


def test_a_certificate_that_cannot_load_is_refused_before_unlocking(tmp_path: Path) -> None:
    (tmp_path / "door.crt").write_text("not a certificate\n")
    (tmp_path / "door.key").write_text("not a key\n")
    result = bastion(
        "gateway",
        *("--http", "0", "--tls-cert", str(tmp_path / "door.crt")),
        *("--tls-key", str(tmp_path / "door.key"), "--profile", str(tmp_path / "nobody")),
        passphrase=None,
        check=False,
    )
    assert result.returncode == 1
    assert "cannot be used" in result.stderr
    assert "passphrase" not in result.stderr


def test_a_port_in_use_stops_the_gateway_cleanly(world: World) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = bastion(
            "gateway",
            "--json",
            "--no-notify",
            "--http",
            str(port),
            "--profile",
            str(world.carol),
            check=False,
        )
    assert result.returncode == 1
    assert f"the HTTP door cannot listen on 127.0.0.1 port {port}" in result.stderr
    assert not (world.carol / paths.TOKEN_FILE).exists()  # a token for no gateway is not left
