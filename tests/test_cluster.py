"""Two real server processes sharing one PostgreSQL database and one Redis.

Each test gets its own PostgreSQL schema (dropped afterwards) and its own
``redis-server`` on a free port, so it can kill and restart Redis without
touching anything else. Both nodes share one certificate and server name,
as nodes behind one load balancer must; where a test needs a client to move
between nodes, it connects through a small TCP forwarder written here (TLS
stays end to end between client and node).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from bastion.client import Client, MessageEvent, contacts, devices, files, presence
from bastion.client.presence import PresenceEvent
from bastion.crypto.olm import OlmDevice
from bastion.errors import BastionError, ServerRefusedError
from bastion.protocol import frames
from bastion.server.net.tls import CERT_FILE, KEY_FILE
from tests.conftest import PASSPHRASE, ServerProcess, free_port
from tests.contacts.support import next_of
from tests.file_transfer.conftest import next_offer
from tests.hardening.harness import admin
from tests.helpers import TcpForwarder, drain, next_events, texts
from tests.server.test_bus_contract import RedisProcess
from tests.server.test_store_contract import (
    POSTGRES_URL,
    drop_schema,
    fresh_schema,
    postgres_or_skip,
)
from tests.test_signin import RawAccount, connect, register_raw, signin_frame

pytestmark = pytest.mark.network


@dataclass
class Cluster:
    a: ServerProcess
    b: ServerProcess
    redis: RedisProcess
    root: Path
    schema: str

    async def register(self, username: str, url: str) -> Client:
        return await Client.register(
            self.root / "profiles" / username,
            PASSPHRASE,
            username=username,
            server_url=url,
            fingerprint=self.a.fingerprint,
        )


async def befriend(a: Client, b: Client) -> None:
    """Make two connected clients accepted contacts (strangers cannot message each other)."""
    await contacts.request(a, b.account.username, notify=False)
    await contacts.act(b, a.account.username, "accept")


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    server = RedisProcess(redis_dir)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def extra_limits() -> str:
    """More ``[limits]`` lines for both nodes; a test parametrizes this to change them."""
    return ""


@pytest.fixture
async def cluster(
    tmp_path: Path, private_redis: RedisProcess, extra_limits: str
) -> AsyncIterator[Cluster]:
    await postgres_or_skip()
    schema = fresh_schema()
    try:
        async with running_cluster(
            tmp_path, private_redis, f"{POSTGRES_URL}?schema={schema}", extra_limits, schema
        ) as running:
            yield running
    finally:
        await drop_schema(schema)


@contextlib.asynccontextmanager
async def running_cluster(
    tmp_path: Path, redis: RedisProcess, db_url: str, extra_limits: str, schema: str
) -> AsyncIterator[Cluster]:
    """Two nodes on ``db_url`` and ``redis``; both are killed at the end."""
    command = [sys.executable, "-m", "bastion", "server", "run"]
    # Node A finds the cluster in its config file, node B on its command line.
    a = ServerProcess(tmp_path / "node-a", free_port(), script=command)
    b = ServerProcess(
        tmp_path / "node-b",
        free_port(),
        script=[*command, "--db", db_url, "--bus", redis.url],
    )
    try:
        for node in (a, b):
            node.data_dir.mkdir(mode=0o700)
            # A dead node's users go offline within about two seconds, not thirty; four
            # registrations per address in all (the default burst is far above a test's).
            (node.data_dir / "bastion.toml").write_text(
                "[limits]\npresence_ttl_s = 1.5\nadmin_poll_s = 0.2\n"
                "registrations_per_address_burst = 4\nregistrations_per_address_per_hour = 1\n"
                + extra_limits
            )
        with (a.data_dir / "bastion.toml").open("a") as toml:
            toml.write(f'[cluster]\ndb = "{db_url}"\nbus = "{redis.url}"\n')
        a.start()
        for name in (CERT_FILE, KEY_FILE, "server-name", "policy.key"):
            shutil.copy2(a.data_dir / name, b.data_dir / name)
        b.start()
        assert a.fingerprint == b.fingerprint
        yield Cluster(a, b, redis, tmp_path, schema)
    finally:
        for node in (a, b):
            # ServerProcess.kill() cannot run twice (its second drain reads a closed pipe).
            if node.proc is not None and node.proc.poll() is None:
                node.kill()


async def test_a_message_sent_on_one_node_is_delivered_live_on_the_other(
    cluster: Cluster,
) -> None:
    alice = await cluster.register("alice", cluster.a.url)
    bob = await cluster.register("bob", cluster.b.url)
    try:
        await alice.connect(receive=False)
        await bob.connect()
        await befriend(alice, bob)
        assert texts([e async for e in bob.receive(until_synced=True)]) == []
        for n in range(5):
            await alice.send_text("bob", f"live {n}")
        assert texts(await next_events(bob, 5)) == [f"live {n}" for n in range(5)]
        await bob.send_text("alice", "and back")
        await alice.close()
        alice = Client.open(cluster.root / "profiles" / "alice", PASSPHRASE)
        await alice.connect()
        assert texts([e async for e in alice.receive(until_synced=True)]) == ["and back"]
    finally:
        await alice.close()
        await bob.close()


async def test_killing_the_receivers_node_loses_and_repeats_nothing(cluster: Cluster) -> None:
    balancer = TcpForwarder([cluster.a.port, cluster.b.port])
    await balancer.start()
    alice = await cluster.register("alice", cluster.b.url)
    bob = await cluster.register("bob", balancer.url)  # lands on node A while it lives
    total = 60
    shown: list[str] = []
    reconnects = 0

    async def bob_reads() -> None:
        nonlocal reconnects
        while True:
            async for event in bob.receive():
                if isinstance(event, MessageEvent):
                    shown.append(event.record.text)
                    if len(shown) >= total:
                        return
            # The node went away: reconnect through the balancer, as `bastion listen` would.
            reconnects += 1
            if bob.conn is not None:
                await bob.conn.aclose()
            for _ in range(50):
                try:
                    await bob.connect()
                    break
                except (BastionError, OSError):  # not up yet: try again
                    await asyncio.sleep(0.1)

    try:
        await alice.connect(receive=False)
        await bob.connect()
        await befriend(alice, bob)
        reading = asyncio.create_task(bob_reads())
        sent: list[str] = []
        for n in range(total):
            await alice.send_text("bob", f"stream {n}")  # returns once the server acknowledged
            sent.append(f"stream {n}")
            if n == total // 3:
                cluster.a.kill()
            await asyncio.sleep(0.01)
        await asyncio.wait_for(reading, 30)
        assert reconnects >= 1
        assert shown == sent
        assert [r.text for r in bob.history("alice")] == sent
    finally:
        await alice.close()
        await bob.close()
        await balancer.close()


async def test_after_a_redis_restart_nodes_catch_up_from_the_database(cluster: Cluster) -> None:
    alice = await cluster.register("alice", cluster.a.url)
    bob = await cluster.register("bob", cluster.b.url)
    try:
        await alice.connect(receive=False)
        await bob.connect()
        await befriend(alice, bob)
        assert texts([e async for e in bob.receive(until_synced=True)]) == []
        await alice.send_text("bob", "before")
        assert texts(await next_events(bob, 1)) == ["before"]
        bob_connection = bob.conn

        cluster.redis.kill()
        await asyncio.sleep(0.3)
        during = [f"during {n}" for n in range(5)]
        for text in during:
            await alice.send_text("bob", text)  # stored in PostgreSQL; the live hop is lost
        cluster.redis.start()
        assert texts(await next_events(bob, 5, wait_s=20)) == during
        await alice.send_text("bob", "after")
        assert texts(await next_events(bob, 1)) == ["after"]
        assert bob.conn is bob_connection  # caught up without reconnecting
    finally:
        with contextlib.suppress(Exception):
            await alice.close()
        with contextlib.suppress(Exception):
            await bob.close()


class PostgresProcess:
    """A private PostgreSQL server (``initdb`` in a temporary folder) that a test may restart.

    The machine's PostgreSQL is shared; this one is the test's own, on a free port.
    As root, the server runs as the ``postgres`` user (PostgreSQL refuses root).
    """

    def __init__(self) -> None:
        bindir = _postgres_bindir()
        if bindir is None:
            pytest.skip("PostgreSQL's initdb and pg_ctl are not installed")
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="bastion-pg-"))
        self.data = self.root / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as = []
        if os.geteuid() == 0:
            owner = "postgres"
            shutil.chown(self.root, owner)
            self._as = ["runuser", "-u", owner, "--"]

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self._as, str(self.bindir / tool), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )

    def create(self) -> None:
        """initdb with trust on loopback only, no fsync (a test's data need not survive)."""
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\nfsync = off\n"
            )

    def start(self) -> None:
        """Start on the same port as before and wait until it accepts connections."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "start")

    def stop(self) -> None:
        """A fast shutdown: clients are disconnected, open transactions rolled back."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        """Stop (if running) and delete its folder."""
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are (Debian keeps them out of the PATH), or None."""
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        return Path(str(shutil.which("initdb"))).parent
    if shutil.which("pg_config"):
        done = subprocess.run(["pg_config", "--bindir"], capture_output=True, check=False)
        bindir = Path(done.stdout.decode().strip())
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    return None


async def test_after_a_postgresql_restart_mid_stream_nothing_acknowledged_is_lost_or_shown_twice(
    tmp_path: Path, private_redis: RedisProcess
) -> None:
    postgres = PostgresProcess()
    try:
        postgres.create()
        postgres.start()
        async with running_cluster(
            tmp_path, private_redis, f"{postgres.url}?schema=bastion", "", "bastion"
        ) as cluster:
            await _stream_across_a_postgres_restart(cluster, postgres)
    finally:
        postgres.remove()


async def _stream_across_a_postgres_restart(cluster: Cluster, postgres: PostgresProcess) -> None:
    alice = await cluster.register("alice", cluster.a.url)
    bob = await cluster.register("bob", cluster.b.url)
    total = 40
    shown: list[str] = []

    async def bob_reads() -> None:
        async for event in bob.receive():
            if isinstance(event, MessageEvent):
                shown.append(event.record.text)
                if len(shown) >= total:
                    return

    try:
        await alice.connect(receive=False)
        await bob.connect()
        await befriend(alice, bob)
        reading = asyncio.create_task(bob_reads())
        sent: list[str] = []
        refused = 0
        restarting: asyncio.Task[None] | None = None
        for n in range(total):
            text = f"stream {n}"
            if n == total // 3:
                await asyncio.to_thread(postgres.stop)
                restarting = asyncio.create_task(asyncio.to_thread(postgres.start))
            for _ in range(100):
                try:
                    await alice.send_text("bob", text)  # returns once the server committed it
                    break
                except ServerRefusedError:
                    refused += 1  # the database is away; the same text is retried (same id)
                    await asyncio.sleep(0.1)
            else:
                pytest.fail(f"{text!r} was never acknowledged")
            sent.append(text)
        if restarting is not None:
            await restarting
        await asyncio.wait_for(reading, 30)
        assert refused >= 1  # the restart was noticed
        assert shown == sent
        assert [r.text for r in bob.history("alice")] == sent
    finally:
        with contextlib.suppress(Exception):
            await alice.close()
        with contextlib.suppress(Exception):
            await bob.close()


async def becomes(client: Client, user: str, state: str) -> bool:
    """Whether ``client`` is told that ``user`` is in ``state`` within ten seconds."""
    for _ in range(10):
        event = await next_of(client, PresenceEvent)
        assert isinstance(event, PresenceEvent)
        if event.user == user and event.state == state:
            return True
    return False


async def test_presence_is_the_same_on_every_node_and_a_dead_nodes_users_go_offline(
    cluster: Cluster,
) -> None:
    alice = await cluster.register("alice", cluster.a.url)
    bob = await cluster.register("bob", cluster.b.url)
    try:
        await alice.connect()
        await bob.connect()
        await befriend(alice, bob)
        assert texts([e async for e in bob.receive(until_synced=True)]) == []
        # Bob's snapshot, taken on node B, sees Alice connected to node A.
        snapshot = await presence.watch(bob)
        assert [(e.user, e.state) for e in snapshot] == [("alice", "online")]
        await alice.close()
        assert await becomes(bob, "alice", "offline")
        alice = Client.open(cluster.root / "profiles" / "alice", PASSPHRASE)
        await alice.connect()
        assert await becomes(bob, "alice", "online")
        cluster.a.kill()  # kill -9: node A says nothing more
        assert await becomes(bob, "alice", "offline")  # swept by node B
    finally:
        await alice.close()
        await bob.close()


async def test_an_address_limit_counts_registrations_on_every_node(cluster: Cluster) -> None:
    made: list[Client] = []
    try:
        for name, node in (("ann", cluster.a), ("ben", cluster.b), ("cat", cluster.a)):
            made.append(await cluster.register(name, node.url))
        made.append(await cluster.register("dan", cluster.b.url))  # the fourth, on either node
        for name, node in (("eve", cluster.a), ("fay", cluster.b)):
            with pytest.raises(ServerRefusedError) as caught:
                await cluster.register(name, node.url)
            assert caught.value.code == "rate_limited"
    finally:
        for client in made:
            await client.close()


def admin_ok(node: ServerProcess, *args: str) -> str:
    """``bastion admin`` on a node's data folder; node A finds the cluster in its config file."""
    result = admin(node.data_dir, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_bastion_admin_disables_a_user_on_every_node(cluster: Cluster) -> None:
    """A user disabled through one node is signed out of both and kept out of both."""
    db = ("--db", f"{POSTGRES_URL}?schema={cluster.schema}")
    balancer = TcpForwarder([cluster.a.port])  # the test steers it node by node
    await balancer.start()
    made: list[Client] = []
    try:
        for name, node in (("alice", cluster.a), ("bob", cluster.b), ("carol", cluster.b)):
            balancer.backends = [node.port]
            client = await cluster.register(name, balancer.url)
            made.append(client)
            await client.connect(receive=True)
        alice, bob, carol = made
        admin_ok(cluster.a, "users", "disable", "bob")
        admin_ok(cluster.b, *db, "users", "disable", "alice")
        for client in (alice, bob):  # one on each node, each disabled through the other node
            assert client.conn is not None
            await asyncio.wait_for(client.conn.disconnected.wait(), 5.0)
            assert "disabled" in (client.conn.close_reason or "")
        assert carol.conn is not None
        assert not carol.conn.disconnected.is_set()
        for client in (alice, bob):
            for node in (cluster.a, cluster.b):
                balancer.backends = [node.port]
                with pytest.raises(ServerRefusedError) as caught:
                    await client.connect(receive=False)
                assert caught.value.code == "auth_failed"
        listed = admin_ok(cluster.b, *db, "users", "list")
        assert "alice\tdisabled" in listed
        assert "bob\tdisabled" in listed
        assert "carol\tactive" in listed
        admin_ok(cluster.a, "users", "enable", "bob")
        balancer.backends = [cluster.b.port]
        await bob.connect(receive=False)  # let back in, on either node
    finally:
        for client in made:
            await client.close()
        await balancer.close()
    # Each running node wrote both changes to its own audit log.
    await asyncio.sleep(1.0)
    for node in (cluster.a, cluster.b):
        audit = admin_ok(node, "audit", "show")
        assert "admin.action action=user.disabled target=bob" in audit
        assert "admin.action action=user.disabled target=alice" in audit
        assert "admin.action action=user.enabled target=bob" in audit


async def test_registration_policy_and_invites_hold_across_nodes(cluster: Cluster) -> None:
    db = ("--db", f"{POSTGRES_URL}?schema={cluster.schema}")
    admin_ok(cluster.a, "policy", "set", "registration=invite")
    assert "registration=invite" in admin_ok(cluster.b, *db, "policy", "show")
    await asyncio.sleep(1.0)  # both nodes poll every 0.2 s
    for node in (cluster.a, cluster.b):
        with pytest.raises(ServerRefusedError) as caught:
            await cluster.register(f"walk_in_{node.port}", node.url)
        assert caught.value.code == "invite_required"
    code = admin_ok(cluster.a, "invites", "create", "--uses", "1").strip()
    invited = await Client.register(
        cluster.root / "profiles" / "invited",
        PASSPHRASE,
        username="invited",
        server_url=cluster.b.url,
        fingerprint=cluster.a.fingerprint,
        invite=code,
    )
    await invited.close()
    with pytest.raises(ServerRefusedError):  # used up, whichever node is asked
        await Client.register(
            cluster.root / "profiles" / "second",
            PASSPHRASE,
            username="second",
            server_url=cluster.a.url,
            fingerprint=cluster.a.fingerprint,
            invite=code,
        )


async def test_a_file_uploaded_to_one_node_is_downloaded_from_the_other(cluster: Cluster) -> None:
    alice = await cluster.register("alice", cluster.a.url)
    bob = await cluster.register("bob", cluster.b.url)
    try:
        await alice.connect(receive=False)
        await bob.connect(receive=True)
        await befriend(alice, bob)
        await drain(bob)
        data = os.urandom(1_600_000).hex().encode()  # several 1 MiB pieces in the database
        source = cluster.root / "notes.txt"
        source.write_bytes(data)
        await files.send_file(alice, "bob", source)
        offer = await next_offer(bob)
        assert not list((cluster.b.data_dir / "blobs").glob("*"))  # nothing on bob's node
        downloads = cluster.root / "downloads"
        downloads.mkdir()
        result = await files.get_file(bob, offer.id, downloads)
        assert result.saved_to is not None
        assert result.saved_to.read_bytes() == data
    finally:
        await alice.close()
        await bob.close()
    # Every recipient has it: the ciphertext is gone from the database too.
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        left = await conn.fetchval(f'SELECT count(*) FROM "{cluster.schema}".blob_pieces')
    finally:
        await conn.close()
    assert left == 0
    assert not list((cluster.a.data_dir / "blobs").glob("*"))


async def test_a_device_links_through_another_node_then_signs_in_and_talks(
    cluster: Cluster,
) -> None:
    """The existing device is on node A; the new one reaches the cluster through node B."""
    alice = await cluster.register("alice", cluster.a.url)
    bob = await cluster.register("bob", cluster.b.url)
    laptop: Client | None = None
    try:
        await alice.connect(receive=False)
        await bob.connect()
        await befriend(alice, bob)
        assert texts([e async for e in bob.receive(until_synced=True)]) == []
        codes: asyncio.Queue[str] = asyncio.Queue()
        offer = asyncio.create_task(devices.offer_link(alice, codes.put_nowait))
        code = await asyncio.wait_for(codes.get(), 10)
        laptop = await devices.join_with_code(
            cluster.root / "profiles" / "alice-laptop",
            PASSPHRASE,
            code=code,
            server_url=cluster.b.url,
            fingerprint=cluster.b.fingerprint,
        )
        linked = await asyncio.wait_for(offer, 10)
        assert linked.device_id == laptop.account.device_id
        assert laptop.account.username == "alice"
        listed = {d.device_id for d in await devices.list_devices(alice)}
        assert listed == {alice.account.device_id, laptop.account.device_id}

        await laptop.connect()  # signs in on node B with its own device key
        assert texts([e async for e in laptop.receive(until_synced=True)]) == []
        await laptop.send_text("bob", "from the new laptop")
        assert texts(await next_events(bob, 1)) == ["from the new laptop"]
        await bob.send_text("alice", "hello laptop")
        assert texts(await next_events(laptop, 1)) == ["hello laptop"]
    finally:
        for client in (alice, bob, laptop):
            if client is not None:
                await client.close()


async def attempt_signin(
    node: ServerProcess, account: RawAccount, signer: OlmDevice
) -> frames.ServerFrame | ServerRefusedError:
    """One sign-in to ``account`` signed by ``signer``, on a connection of its own."""
    conn = await connect(node)
    try:
        challenge = await conn.fresh_challenge()
        req = conn.next_req()
        frame = signin_frame(
            challenge, req, username=account.username, device_id=account.device_id, signer=signer
        )
        try:
            return await conn.request(frame, req)
        except ServerRefusedError as exc:
            return exc
    finally:
        await conn.aclose()


async def test_failed_sign_ins_on_one_node_hold_back_the_next_on_the_other(
    cluster: Cluster,
) -> None:
    alice = await register_raw(cluster.a, "alice")
    wrong_key = OlmDevice.create()
    # The five free failures, then three more (the last two wait out 1 s and 2 s of
    # back-off first), all on node A, which now blocks this address and account for 4 s.
    failures = 0
    while failures < 8:
        refused = await attempt_signin(cluster.a, alice, wrong_key)
        assert isinstance(refused, ServerRefusedError)
        if refused.code == "rate_limited":
            await asyncio.sleep(0.25)
            continue
        assert refused.code == "auth_failed"
        failures += 1

    # Node B refuses even the right key for now, and says how long to wait.
    on_b = await attempt_signin(cluster.b, alice, alice.device)
    assert isinstance(on_b, ServerRefusedError)
    assert on_b.code == "rate_limited"
    assert "try again in" in str(on_b)

    # Once the wait is over, the owner signs in on node B.
    for _ in range(80):
        on_b = await attempt_signin(cluster.b, alice, alice.device)
        if not isinstance(on_b, ServerRefusedError):
            break
        assert on_b.code == "rate_limited"
        await asyncio.sleep(0.25)
    assert isinstance(on_b, frames.SignedIn)


async def send_codes(client: Client, bodies: list[str]) -> list[str]:
    """Send each text to bob; "sent" or the refusal code of each.

    A refused message stays in the client's outbox: the next ``connect`` sends it again.
    """
    codes = []
    for body in bodies:
        try:
            await client.send_text("bob", body)
            codes.append("sent")
        except ServerRefusedError as exc:
            codes.append(exc.code)
    return codes


# Five messages at once, then one every two seconds, per device.
SLOW_SENDER = "messages_burst = 5\nmessages_per_second = 0.5\n"


@pytest.mark.parametrize("extra_limits", [SLOW_SENDER], ids=["slow-sender"])
async def test_a_device_that_moves_to_another_node_brings_its_spent_burst(
    cluster: Cluster,
) -> None:
    balancer = TcpForwarder([cluster.a.port])
    await balancer.start()
    alice = await cluster.register("alice", balancer.url)
    bob = await cluster.register("bob", cluster.b.url)
    try:
        await alice.connect(receive=False)
        await bob.connect()
        await befriend(alice, bob)
        burst = [f"on A {n}" for n in range(5)]
        assert await send_codes(alice, burst) == ["sent"] * 5
        await alice.close()
        alice = Client.open(cluster.root / "profiles" / "alice", PASSPHRASE)
        balancer.backends = [cluster.b.port]
        await alice.connect(receive=False)  # node B: no fresh burst here
        assert await send_codes(alice, ["on B, too soon"]) == ["rate_limited"]
        await asyncio.sleep(2.2)  # one token back, at the rate
        assert await send_codes(alice, ["on B, later", "on B, again"]) == ["sent", "rate_limited"]
        assert texts(await next_events(bob, 6)) == [*burst, "on B, later"]
    finally:
        await alice.close()
        await bob.close()
        await balancer.close()


@pytest.mark.parametrize("extra_limits", [SLOW_SENDER], ids=["slow-sender"])
async def test_signing_in_on_another_node_before_the_old_connection_closes_brings_it_too(
    cluster: Cluster,
) -> None:
    """The old connection, on node A, closes only when node B's sign-in pushes it out."""
    balancer = TcpForwarder([cluster.a.port])
    await balancer.start()
    alice = await cluster.register("alice", balancer.url)
    bob = await cluster.register("bob", cluster.b.url)
    try:
        await alice.connect()
        await bob.connect()
        await befriend(alice, bob)
        assert await send_codes(alice, [f"on A {n}" for n in range(5)]) == ["sent"] * 5
        on_a = alice.conn
        assert on_a is not None
        balancer.backends = [cluster.b.port]
        await alice.connect()  # node B, while node A still holds the device
        await asyncio.wait_for(on_a.disconnected.wait(), 5.0)
        await asyncio.sleep(0.5)  # node A hands the bucket over as it closes the old one
        assert await send_codes(alice, ["on B, too soon"]) == ["rate_limited"]
        await on_a.aclose()
    finally:
        await alice.close()
        await bob.close()
        await balancer.close()
