"""``bastion gateway`` as a process: private doors, JSON-RPC errors, live events, reconnects.

Everything runs against a real server process and real gateway processes; the
front end is :class:`~bastion.gateway.link.GatewayLink` on the Unix socket, or
a raw socket where the test is about what goes over it.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from bastion.gateway import paths, rpc
from bastion.gateway.link import GatewayError
from tests.conftest import ServerProcess
from tests.gateway.support import GatewayProcess, gateways, pair, subscribed, until
from tests.test_cli import bastion

pytestmark = pytest.mark.network


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def is_socket(path: Path) -> bool:
    return stat.S_ISSOCK(os.stat(path).st_mode)


def exists(path: Path) -> bool:
    return os.path.exists(path)


def event_schema() -> dict[str, Any]:
    document = rpc.schema_document()
    return {"$ref": "#/components/schemas/Event", "components": document["components"]}


def check_event(event: dict[str, Any]) -> None:
    jsonschema.validate(event, event_schema())


async def raw_call(profile: Path, *lines: bytes) -> list[dict[str, Any] | list[Any]]:
    """Write ``lines`` to the gateway's socket as they are; return the answers that come back."""
    reader, writer = await asyncio.open_unix_connection(str(paths.socket_path(profile)))
    try:
        answers = []
        for line in lines:
            writer.write(line + b"\n")
            await writer.drain()
            try:
                answer = await asyncio.wait_for(reader.readline(), 2.0)
            except TimeoutError:
                continue  # a notification: nothing comes back
            if answer:
                answers.append(json.loads(answer))
        return answers
    finally:
        writer.close()


async def test_the_doors_are_private_and_vanish_when_the_gateway_stops(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = tmp_path / "alice"
    bastion(
        "register",
        "alice",
        "--server",
        server.url,
        "--fingerprint",
        server.fingerprint,
        "--profile",
        str(alice),
    )
    with gateways(GatewayProcess(alice)) as (gw,):
        ready = gw.start()
        sock = Path(ready["socket"])
        assert sock == paths.socket_path(alice)
        assert is_socket(sock)
        assert mode(sock) == 0o600
        assert mode(alice) == 0o700
        token_file = alice / paths.TOKEN_FILE
        assert mode(token_file) == 0o600
        first_token = token_file.read_text().strip()
        assert len(first_token) >= 40

        second = GatewayProcess(alice)
        with pytest.raises(RuntimeError, match="already running for this profile"):
            second.start(wait_s=20)

        assert gw.stop() == 0
        assert not exists(sock)
        assert not exists(token_file)  # a token read before is void, and none is left behind

        gw.start()
        assert (alice / paths.TOKEN_FILE).read_text().strip() != first_token


async def test_a_profile_folder_others_may_enter_is_refused(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = tmp_path / "alice"
    bastion(
        "register",
        "alice",
        "--server",
        server.url,
        "--fingerprint",
        server.fingerprint,
        "--profile",
        str(alice),
    )
    alice.chmod(0o755)
    gw = GatewayProcess(alice)
    with pytest.raises(RuntimeError, match="open to other users"):
        gw.start(wait_s=20)
    assert not paths.socket_path(alice).exists()


async def test_bad_requests_get_json_rpc_errors_and_the_link_stays_usable(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice, _bob = pair(server, tmp_path)
    with gateways(GatewayProcess(alice)) as (gw,):
        gw.start()
        answers = await raw_call(
            alice,
            b"{not json",
            b'{"id": 1, "method": "status"}',
            b'{"jsonrpc": "2.0", "id": 2, "method": "no.such.method"}',
            b'{"jsonrpc": "2.0", "id": 3, "method": "send", "params": {"to": "Bob!", "text": "x"}}',
            b'{"jsonrpc": "2.0", "id": 4, "method": "send", "params": {"to": "bob"}}',
            b'{"jsonrpc": "2.0", "id": 5, "method": "send", "params": ["bob", "x"]}',
            b'{"jsonrpc": "2.0", "id": 6, "method": "history", "params": {"user": "bob", "x": 1}}',
            b'{"jsonrpc": "2.0", "method": "status"}',  # a notification: no answer
            b'[{"jsonrpc": "2.0", "id": 7, "method": "whoami"}, {"jsonrpc": "2.0", "id": 8}]',
            b"[]",
            b'{"jsonrpc": "2.0", "id": 9, "method": "status"}',
        )
    codes = [a["error"]["code"] if isinstance(a, dict) and "error" in a else a for a in answers]
    assert codes[:7] == [-32700, -32600, -32601, -32602, -32602, -32602, -32602]
    assert "does not match" in answers[3]["error"]["message"]  # type: ignore[call-overload]
    assert "'text' is a required property" in answers[4]["error"]["message"]  # type: ignore[call-overload]
    batch = answers[7]
    assert isinstance(batch, list)
    assert batch[0]["result"]["user"] == "alice"
    assert batch[1]["error"]["code"] == -32600
    assert codes[8] == -32600  # the empty batch
    assert answers[9]["result"]["type"] == "gateway"  # type: ignore[call-overload]
    assert len(answers) == 10  # the notification got no answer


async def test_live_events_reach_every_subscriber_and_match_the_schema(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice, bob = pair(server, tmp_path)
    with gateways(GatewayProcess(alice), GatewayProcess(bob)) as (ga, gb):
        ga.start()
        gb.start()
        async with (
            subscribed(gb) as (_blink, bob_first),
            subscribed(gb) as (_blink2, bob_second),
            subscribed(ga) as (alink, alice_events),
        ):
            status = await alink.call("status")
            if status["connection"] != "connected":
                await alice_events.wait_for(
                    lambda e: e == {"type": "connection", "state": "connected"}, "alice online"
                )
            sent = await alink.call("send", to="bob", text="hello through two gateways")
            assert sent["type"] == "sent"
            assert sent["state"] == "stored"
            for events in (bob_first, bob_second):
                got = await events.wait_for(
                    lambda e: e.get("text") == "hello through two gateways", "bob's event"
                )
                assert got["from"] == "alice"
                assert got["id"] == sent["id"]
            receipt = await alice_events.wait_for(
                lambda e: e.get("type") == "delivered", "the delivery receipt"
            )
            assert receipt["ids"] == [sent["id"]]
            assert (await alink.call("message", id=sent["id"]))["state"] == "delivered"
            for event in [*bob_first.seen, *alice_events.seen]:
                check_event(event)
            history = await alink.call("history", user="bob")
            assert [m["text"] for m in history] == ["hello through two gateways"]


async def test_the_gateway_refuses_to_reconnect_to_a_server_that_is_not_the_pinned_one(
    server_factory: Any, tmp_path: Path
) -> None:
    server = server_factory()
    alice, _bob = pair(server, tmp_path)
    with gateways(GatewayProcess(alice)) as (gw,):
        gw.start()
        async with subscribed(gw) as (link, events):
            server.kill()
            await events.wait_for(lambda e: e.get("state") == "reconnecting", "the loss")
            impostor = ServerProcess(tmp_path / "impostor", server.port)
            impostor.start()  # same address, another certificate
            try:
                proc = gw.proc
                assert proc is not None
                await until(lambda: proc.poll() is not None, "the gateway to stop", wait_s=60)
            finally:
                impostor.kill()
        assert proc.returncode == 1
        assert "certificate" in gw.log_text() or "pinned" in gw.log_text()
        assert not paths.socket_path(alice).exists()
        with pytest.raises(GatewayError):
            await link.call("status")
