"""Two gateways through a server that is killed with SIGKILL and restarted.

What the issue asks: every acknowledged message is delivered once, in order;
messages written while the server was down are sent when it is back, and
marked so (queued, then stored, then delivered).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bastion.gateway.link import GatewayLink
from tests.conftest import ServerProcess
from tests.gateway.support import Events, GatewayProcess, gateways, pair, subscribed, until

pytestmark = pytest.mark.network
QUICK = ("--reconnect-delay", "0.05")


async def online(link: GatewayLink, events: Events) -> None:
    if (await link.call("status"))["connection"] != "connected":
        await events.wait_for(lambda e: e == {"type": "connection", "state": "connected"}, "up")


def connected_count(events: Events) -> int:
    return sum(1 for e in events.of("connection") if e["state"] == "connected")


async def test_kill_9_while_two_gateways_talk_loses_nothing_and_shows_nothing_twice(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice, bob = pair(server, tmp_path)
    texts = [f"message {i:02d}" for i in range(30)]
    answers: list[dict[str, Any]] = []
    with gateways(GatewayProcess(alice, *QUICK), GatewayProcess(bob, *QUICK)) as (ga, gb):
        ga.start()
        gb.start()
        async with subscribed(ga) as (alink, alice_events), subscribed(gb) as (blink, bob_events):
            await online(alink, alice_events)
            await online(blink, bob_events)

            async def sender() -> None:
                for text in texts:
                    answers.append(await alink.call("send", to="bob", text=text))
                    await asyncio.sleep(0.05)

            sending = asyncio.create_task(sender())
            await until(lambda: len(bob_events.texts_in()) >= 6, "the first messages at bob")
            server.kill()  # SIGKILL in the middle of the stream
            await bob_events.wait_for(lambda e: e.get("state") == "reconnecting", "bob to notice")
            await until(lambda: any(a["type"] == "queued" for a in answers), "a queued send")
            await asyncio.to_thread(server.start)  # same data folder, same port
            await asyncio.wait_for(sending, 60)
            await until(lambda: len(bob_events.texts_in()) >= len(texts), "every message at bob")
            await asyncio.sleep(1.0)  # anything shown twice would arrive now

            assert bob_events.texts_in() == texts  # once each, in order
            assert [m["text"] for m in await blink.call("history", user="alice")] == texts
            states = {a["type"] for a in answers}
            assert "queued" in states  # written while the server was down
            assert states <= {"sent", "queued", "kept"}
            # Each message alice wrote while the server was down is marked sent once it went out,
            # and none stays queued or kept.
            went_out = {e["id"] for e in alice_events.of("message") if e.get("state") == "sent"}
            for answer in answers:
                if answer["type"] != "sent":
                    assert answer["id"] in went_out
            history = await alink.call("history", user="bob")
            assert [m["text"] for m in history] == texts
            assert {m["state"] for m in history} <= {"sent", "delivered"}
            assert await alink.call("outbox") == []
            assert connected_count(alice_events) >= 1
            assert connected_count(bob_events) >= 1
            status = await alink.call("status")
            assert status["connection"] == "connected"
            assert status["queued"] == 0


async def test_messages_written_while_the_server_is_down_are_queued_then_sent_in_order(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice, bob = pair(server, tmp_path)
    with gateways(GatewayProcess(alice, *QUICK), GatewayProcess(bob, *QUICK)) as (ga, gb):
        ga.start()
        gb.start()
        async with subscribed(ga) as (alink, alice_events), subscribed(gb) as (blink, bob_events):
            await online(alink, alice_events)
            await online(blink, bob_events)
            server.stop()
            await alice_events.wait_for(lambda e: e.get("state") == "reconnecting", "the loss")
            queued = [await alink.call("send", to="bob", text=f"offline {i}") for i in range(3)]
            assert [q["type"] for q in queued] == ["queued"] * 3
            outbox = await alink.call("outbox")
            assert [(m["text"], m["state"]) for m in outbox] == [
                (f"offline {i}", "queued") for i in range(3)
            ]
            status = await alink.call("status")
            assert status["connection"] == "reconnecting"
            assert status["queued"] == 3

            await asyncio.to_thread(server.start)
            await until(lambda: len(bob_events.texts_in()) >= 3, "the queued messages at bob")
            assert bob_events.texts_in() == ["offline 0", "offline 1", "offline 2"]
            for q in queued:

                def marked_sent(e: dict[str, Any], i: str = q["id"]) -> bool:
                    return bool(e.get("id") == i and e.get("state") == "sent")

                event = await alice_events.wait_for(marked_sent, "marked sent")
                assert event["text"].startswith("offline")
            await until(lambda: len(alice_events.of("delivered")) >= 1, "delivered receipts")
            await until(
                lambda: (
                    {q["id"] for q in queued}
                    <= {i for e in alice_events.of("delivered") for i in e["ids"]}
                ),
                "every queued message delivered",
            )
            assert await alink.call("outbox") == []
            assert (await alink.call("message", id=queued[0]["id"]))["state"] == "delivered"
