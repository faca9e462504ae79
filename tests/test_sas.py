"""Interactive (SAS) verification between two real clients through a real server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from bastion.client import Client, Event, MessageEvent, verification
from bastion.client.verification import SasCodes, VerificationFailed, VerificationRequestEvent
from tests.conftest import Profiles
from tests.helpers import drain

pytestmark = pytest.mark.network


@contextlib.asynccontextmanager
async def receiving(client: Client) -> AsyncIterator[list[Event]]:
    """Run the client's receive loop in the background; yields the events seen."""
    events: list[Event] = []

    async def pump() -> None:
        async for event in client.receive():
            events.append(event)

    assert await drain(client) == []
    task = asyncio.create_task(pump())
    try:
        yield events
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def answering(
    seen: dict[str, SasCodes], name: str, *, says_match: bool = True
) -> Callable[[SasCodes], Awaitable[bool]]:
    async def compare(codes: SasCodes) -> bool:
        seen[name] = codes
        return says_match

    return compare


async def pair(profiles: Profiles) -> tuple[Client, Client]:
    alice = await profiles.online("alice")
    bob = await profiles.online("bob")
    await profiles.befriend("alice", "bob")
    return alice, bob


async def test_both_start_at_once_codes_match_and_both_become_verified(
    profiles: Profiles,
) -> None:
    alice, bob = await pair(profiles)
    seen: dict[str, SasCodes] = {}
    async with receiving(alice), receiving(bob):
        await asyncio.wait_for(
            asyncio.gather(
                verification.verify_interactively(
                    alice, "bob", answering(seen, "alice"), step_timeout_s=10
                ),
                verification.verify_interactively(
                    bob, "alice", answering(seen, "bob"), step_timeout_s=10
                ),
            ),
            30,
        )
    assert seen["alice"] == seen["bob"]
    assert len(seen["alice"].emoji) == 7
    assert all(0 <= n <= 9999 for n in seen["alice"].decimals)
    for client, other in ((alice, "bob"), (bob, "alice")):
        contact = client.contact(other)
        assert contact is not None
        assert contact.trust == "verified"


async def test_answering_a_request_that_arrived_first(profiles: Profiles) -> None:
    alice, bob = await pair(profiles)
    seen: dict[str, SasCodes] = {}
    async with receiving(alice), receiving(bob) as bob_events:
        started = asyncio.create_task(
            verification.verify_interactively(
                alice, "bob", answering(seen, "alice"), step_timeout_s=10
            )
        )
        for _ in range(200):
            if any(isinstance(e, VerificationRequestEvent) for e in bob_events):
                break
            await asyncio.sleep(0.02)
        [request] = [e for e in bob_events if isinstance(e, VerificationRequestEvent)]
        assert request.user == "alice"
        assert request.to_json()["type"] == "verification_request"
        await verification.verify_interactively(
            bob, "alice", answering(seen, "bob"), step_timeout_s=10
        )
        await asyncio.wait_for(started, 10)
    assert seen["alice"] == seen["bob"]


async def test_codes_that_do_not_match_verify_nobody(profiles: Profiles) -> None:
    alice, bob = await pair(profiles)
    seen: dict[str, SasCodes] = {}
    async with receiving(alice), receiving(bob):
        results = await asyncio.wait_for(
            asyncio.gather(
                verification.verify_interactively(
                    alice, "bob", answering(seen, "alice"), step_timeout_s=10
                ),
                verification.verify_interactively(
                    bob, "alice", answering(seen, "bob", says_match=False), step_timeout_s=10
                ),
                return_exceptions=True,
            ),
            30,
        )
    assert all(isinstance(r, VerificationFailed) for r in results), results
    assert "did not match" in str(results[1])
    for client, other in ((alice, "bob"), (bob, "alice")):
        contact = client.contact(other)
        assert contact is not None
        assert contact.trust == "unverified"


async def test_an_unanswered_verification_times_out(profiles: Profiles) -> None:
    alice, bob = await pair(profiles)
    async with receiving(alice):
        with pytest.raises(VerificationFailed, match="timed out"):
            await verification.verify_interactively(
                alice, "bob", answering({}, "alice"), step_timeout_s=1
            )
    contact = alice.contact("bob")
    assert contact is not None
    assert contact.trust == "unverified"
    del bob


async def test_verification_is_bound_to_the_key_pinned_at_the_start(profiles: Profiles) -> None:
    alice, bob = await pair(profiles)
    seen: dict[str, SasCodes] = {}
    async with receiving(alice), receiving(bob):
        session = await verification.start(alice, "bob", step_timeout_s=10)
        answer = asyncio.create_task(
            verification.verify_interactively(
                bob, "alice", answering(seen, "bob"), step_timeout_s=10
            )
        )
        await session.exchange()
        # As if bob's account key had been swapped after the verification began: the MAC
        # bob sends covers his real key, which is no longer the one alice's session holds.
        session.pinned_key = bytes(32)
        with pytest.raises(VerificationFailed, match="not the one pinned"):
            await session.confirm()
        # Bob checked alice's real key against his pin, so his side may succeed.
        with contextlib.suppress(VerificationFailed):
            await asyncio.wait_for(answer, 10)
    contact = alice.contact("bob")
    assert contact is not None
    assert contact.trust == "unverified"


async def test_cli_verify_sas_in_a_terminal(profiles: Profiles) -> None:
    await profiles.register("alice")
    bob = await profiles.online("bob")
    await profiles.befriend("alice", "bob")
    primary, secondary = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_PASSPHRASE"] = "correct horse battery staple"
    cli = subprocess.Popen(  # noqa: ASYNC220 - started once; its output is read off the loop
        [sys.executable, "-m", "bastion", "verify", "bob", "--sas",
         "--profile", str(profiles.path("alice"))],
        stdin=secondary, stdout=secondary, stderr=secondary, env=env,
    )  # fmt: skip
    os.close(secondary)
    screen = b""

    async def read_until(marker: bytes) -> None:
        nonlocal screen
        loop = asyncio.get_running_loop()
        while marker not in screen:
            chunk = await asyncio.wait_for(loop.run_in_executor(None, os.read, primary, 4096), 20)
            screen += chunk

    seen: dict[str, SasCodes] = {}
    try:
        async with receiving(bob):
            await read_until(b"Waiting for bob")
            answer = asyncio.create_task(
                verification.verify_interactively(
                    bob, "alice", answering(seen, "bob"), step_timeout_s=20
                )
            )
            await read_until(b"Do they match exactly?")
            os.write(primary, b"y\n")
            await asyncio.wait_for(answer, 20)
            await read_until(b"bob is verified.")
        assert await asyncio.to_thread(cli.wait, 20) == 0
    finally:
        cli.kill()
        cli.wait()
        os.close(primary)
    shown = screen.decode()
    assert " ".join(f"{n:04d}" for n in seen["bob"].decimals) in shown
    assert seen["bob"].emoji[0][1] in shown
    contact = bob.contact("alice")
    assert contact is not None
    assert contact.trust == "verified"


async def test_a_peer_spamming_verification_requests_is_prompted_once_and_capped(
    profiles: Profiles,
) -> None:
    alice, bob = await pair(profiles)
    carol = await profiles.online("carol")
    await profiles.befriend("carol", "alice")
    verification.set_limits(alice, max_requests_total=1)

    async def start_from(sender: Client) -> str:
        body = verification.VerificationBody(
            txn=os.urandom(16).hex(), from_device=sender.account.device_id, to_device="*"
        )
        raw = verification._encode(body)
        await sender.send_payload("alice", "verify.start", raw, history=False)
        return body.txn

    sent = [await start_from(bob) for _ in range(12)]  # a flood from one device, new ids
    await start_from(carol)
    await bob.send_text("alice", "that was all")  # order is kept per conversation
    await carol.send_text("alice", "me too")
    events: list[Event] = []

    async def until_both_texts() -> None:
        async for event in alice.receive():
            events.append(event)
            if len([e for e in events if isinstance(e, MessageEvent)]) == 2:
                return

    await asyncio.wait_for(until_both_texts(), 15)
    prompts = [e for e in events if isinstance(e, VerificationRequestEvent)]
    assert [e.user for e in prompts] == ["bob"]  # one prompt, not twelve; carol over the total
    assert len(verification._state(alice).requests) == 1  # no pile of state either
    assert verification.pending_request(alice, "carol") is None
    # The one kept is bob's newest, the verification he is waiting in.
    assert verification.pending_request(alice, "bob") == sent[-1]
