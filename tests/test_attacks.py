"""A lying server against real clients: every lie is a warning, never a message.

Each test runs ``tests/malicious_server.py`` (the real relay with a tampering
delivery path) and real client profiles. The receiving client must drop what
was tampered with, count it and say so, and keep showing honest messages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bastion.client import Client, Event, MessageEvent, WarningEvent
from bastion.crypto.olm import NORMAL, PRE_KEY
from bastion.protocol import frames
from tests.conftest import Profiles, ServerProcess
from tests.helpers import next_events, texts, warnings
from tests.malicious_server import (
    INJECTED_SEQ_BASE,
    ONLY_ENV,
    RECORD_ENV,
    SCRIPT,
    TAMPER_ENV,
    read_record,
)

pytestmark = pytest.mark.network


class LyingRelay:
    """Starts the tampering server and registers clients on it."""

    def __init__(
        self,
        tmp_path: Path,
        server_factory: Callable[..., ServerProcess],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        self.tmp_path = tmp_path
        self.server_factory = server_factory
        self.monkeypatch = monkeypatch
        self.record_path = tmp_path / "frames.txt"
        self.profiles: Profiles | None = None

    def start(self, *modes: str, only: tuple[int, ...] = ()) -> Profiles:
        """Start a server tampering in ``modes`` with the deliveries numbered ``only``."""
        self.monkeypatch.setenv(TAMPER_ENV, ",".join(modes))
        self.monkeypatch.setenv(ONLY_ENV, ",".join(str(n) for n in only))
        self.monkeypatch.setenv(RECORD_ENV, str(self.record_path))
        server = self.server_factory("lying-server", script=SCRIPT)
        self.profiles = Profiles(self.tmp_path, server)
        return self.profiles

    def record(self) -> list[tuple[str, frames.Frame]]:
        """Every frame the server received ("in") or sent ("out"), decoded."""
        decoded: list[tuple[str, frames.Frame]] = []
        for direction, data in read_record(self.record_path):
            if direction == "in":
                decoded.append((direction, frames.decode_client_frame(data)))
            else:
                decoded.append((direction, frames.decode_server_frame(data)))
        return decoded


@pytest.fixture
async def relay(
    tmp_path: Path,
    server_factory: Callable[..., ServerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[LyingRelay]:
    lying = LyingRelay(tmp_path, server_factory, monkeypatch)
    yield lying
    if lying.profiles is not None:
        await lying.profiles.close()


def history_texts(client: Client, peer: str) -> list[str]:
    return [r.text for r in client.history(peer)]


def kinds(events: list[Event]) -> list[str]:
    return ["message" if isinstance(e, MessageEvent) else "warning" for e in events]


async def meet(alice: Client, bob: Client) -> list[str]:
    """alice and bob exchange a message each, so that what follows are normal Olm messages.

    Returns the texts exchanged (one delivery each).
    """
    await alice.send_text("bob", "ping")
    assert texts(await next_events(bob, 1)) == ["ping"]
    await bob.send_text("alice", "pong")
    assert texts(await next_events(alice, 1)) == ["pong"]
    return ["ping", "pong"]


def delivered_kind(relay: LyingRelay, delivery: int) -> int:
    """The Olm message kind of the ``delivery``-th real delivery, as recorded."""
    delivered = [
        f
        for d, f in relay.record()
        if d == "out" and isinstance(f, frames.Deliver) and f.seq < INJECTED_SEQ_BASE
    ]
    return delivered[delivery - 1].kind


SESSION_STATES = pytest.mark.parametrize(
    "established", [False, True], ids=["pre-key-message", "normal-message"]
)


@SESSION_STATES
async def test_server_cannot_pass_off_a_message_as_from_someone_else(
    relay: LyingRelay, established: bool
) -> None:
    # alice's second message after the warm-up is handed to bob as if carol's device sent it.
    tampered = (4 if established else 2) + 1
    profiles = relay.start("rewrite-sender", only=(tampered,))
    bob = await profiles.online("bob")
    carol = await profiles.online("carol", receive=False)
    alice = await profiles.online("alice")
    await profiles.befriend("carol", "bob")
    await profiles.befriend("alice", "bob")
    await carol.send_text("bob", "hello from carol")  # bob now has a session with carol
    assert texts(await next_events(bob, 1)) == ["hello from carol"]
    warm_up = await meet(alice, bob) if established else []
    for text in ["before", "wire 5000 to account 42", "after"]:
        await alice.send_text("bob", text)

    events = await next_events(bob, 3)
    assert kinds(events) == ["message", "warning", "message"]
    assert texts(events) == ["before", "after"]
    [warning] = warnings(events)
    assert (warning.sender, warning.device) == ("carol", carol.account.device_id)
    assert history_texts(bob, "carol") == ["hello from carol"]
    assert history_texts(bob, "alice") == [*warm_up, "before", "after"]
    assert bob.stats().rejected == 1
    assert delivered_kind(relay, tampered) == (NORMAL if established else PRE_KEY)


@SESSION_STATES
async def test_flipped_ciphertext_byte_is_rejected(relay: LyingRelay, established: bool) -> None:
    tampered = (2 if established else 0) + 2
    profiles = relay.start("flip-byte", only=(tampered,))
    bob = await profiles.online("bob")
    alice = await profiles.online("alice")
    await profiles.befriend("alice", "bob")
    warm_up = await meet(alice, bob) if established else []
    for text in ["before", "tampered in transit", "after"]:
        await alice.send_text("bob", text)

    events = await next_events(bob, 3)
    assert kinds(events) == ["message", "warning", "message"]
    assert texts(events) == ["before", "after"]
    assert warnings(events)[0].sender == "alice"
    assert history_texts(bob, "alice") == [*warm_up, "before", "after"]
    assert bob.stats().rejected == 1
    assert delivered_kind(relay, tampered) == (NORMAL if established else PRE_KEY)


@SESSION_STATES
async def test_replayed_ciphertext_is_shown_once(relay: LyingRelay, established: bool) -> None:
    # The second of three messages is delivered twice (the copy under a new seq).
    tampered = (2 if established else 0) + 2
    profiles = relay.start("replay", only=(tampered,))
    bob = await profiles.online("bob")
    alice = await profiles.online("alice")
    await profiles.befriend("alice", "bob")
    warm_up = await meet(alice, bob) if established else []
    sent = ["first", "second", "third"]
    for text in sent:
        await alice.send_text("bob", text)

    events = await next_events(bob, 4)
    assert kinds(events) == ["message", "message", "warning", "message"]
    assert texts(events) == sent
    assert history_texts(bob, "alice") == [*warm_up, *sent]
    assert bob.stats().rejected == 1
    assert delivered_kind(relay, tampered) == (NORMAL if established else PRE_KEY)

    # Nothing is left to deliver after a reconnect: every envelope was acknowledged.
    await bob.close()
    bob_again = await profiles.online("bob")
    await alice.send_text("bob", "fourth")
    assert texts(await next_events(bob_again, 1)) == ["fourth"]
    assert history_texts(bob_again, "alice")[-4:] == [*sent, "fourth"]
    assert bob_again.stats().rejected == 1


async def test_ciphertext_redirected_to_a_third_user_is_rejected(relay: LyingRelay) -> None:
    # Delivery 2 (alice's second message to bob) is also handed to carol.
    profiles = relay.start("redirect", only=(2,))
    bob = await profiles.online("bob")
    carol = await profiles.online("carol")
    alice = await profiles.online("alice", receive=False)
    await profiles.befriend("alice", "bob")
    await profiles.befriend("alice", "carol")
    await alice.send_text("bob", "hello bob")
    await alice.send_text("bob", "for bob's eyes only")

    assert texts(await next_events(bob, 2)) == ["hello bob", "for bob's eyes only"]
    [copy] = await next_events(carol, 1)
    assert isinstance(copy, WarningEvent)
    assert copy.sender == "alice"
    assert history_texts(carol, "alice") == []
    assert carol.stats().rejected == 1
    assert bob.stats().rejected == 0

    # carol's own conversation with alice still works afterwards.
    await alice.send_text("carol", "hello carol")
    assert texts(await next_events(carol, 1)) == ["hello carol"]
    assert history_texts(carol, "alice") == ["hello carol"]


async def test_server_cannot_add_a_device_to_an_account(relay: LyingRelay) -> None:
    # Every key query answer carries an extra device the server made up, with a
    # certificate signed by a key the server holds; every key claim offers a
    # one-time key for it, signed by the ghost device itself. A client that
    # accepted it would encrypt to it (and the real store would then refuse the
    # send with device_mismatch).
    profiles = relay.start("ghost-device")
    bob = await profiles.online("bob")
    alice = await profiles.online("alice", receive=False)
    await profiles.befriend("alice", "bob")
    await alice.send_text("bob", "only bob's real device may read this")

    assert texts(await next_events(bob, 1)) == ["only bob's real device may read this"]
    bob_device = bob.account.device_id
    assert [d.device_id for d in await alice.devices_of("bob")] == [bob_device]
    assert [d.device_id for d in await alice.devices_of("alice")] == [alice.account.device_id]

    record = relay.record()
    offered = {
        (frame.user, d.device_id)
        for direction, frame in record
        if direction == "out" and isinstance(frame, frames.KeysResult)
        for d in frame.devices
    }
    real = {("bob", bob_device), ("alice", alice.account.device_id)}
    ghosts = offered - real
    assert {user for user, _ in ghosts} == {"alice", "bob"}, "no ghost was offered"
    claimable = {
        (frame.user, k.device_id)
        for direction, frame in record
        if direction == "out" and isinstance(frame, frames.ClaimResult)
        for k in frame.keys
    }
    assert claimable & ghosts, "no one-time key was offered for the ghost"
    sends = [f for d, f in record if d == "in" and isinstance(f, frames.Send)]
    assert len(sends) == 1, "alice's Send frame was not recorded"
    assert [(c.user, c.device_id) for c in sends[0].ciphertexts] == [("bob", bob_device)]
    assert [f for d, f in record if d == "out" and isinstance(f, frames.Error)] == []


async def test_message_from_uncertified_device_is_rejected(relay: LyingRelay) -> None:
    # Delivery 2 claims to come from a device of alice that only the server vouches for.
    profiles = relay.start("ghost-device", "ghost-sender", only=(2,))
    bob = await profiles.online("bob")
    alice = await profiles.online("alice", receive=False)
    await profiles.befriend("alice", "bob")
    for text in ["before", "from a device alice never had", "after"]:
        await alice.send_text("bob", text)

    events = await next_events(bob, 3)
    assert kinds(events) == ["message", "warning", "message"]
    [warning] = warnings(events)
    assert warning.sender == "alice"
    assert warning.device != alice.account.device_id
    assert "certificate" in warning.reason
    assert history_texts(bob, "alice") == ["before", "after"]
    assert bob.stats().rejected == 1
    contact = bob.contact("alice")
    assert contact is not None
    assert [d.device_id for d in contact.devices] == [alice.account.device_id]
