"""What ``bastion send`` says happened is what happened: stored, refused, or kept.

Real server process, real profiles, the real command in a child process. A
forwarder between the sender and the server cuts the connection at the moment
the message goes up, the way a dropped Wi-Fi link does.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from bastion.client import Client, contacts
from tests.conftest import PASSPHRASE, ServerProcess
from tests.helpers import TcpForwarder

pytestmark = pytest.mark.network

EXIT_KEPT = 75
BIG_CHUNK = 4000  # bytes: only a message frame is this large once signed in
LONG_TEXT = "a message long enough to spot on the wire " * 150


class CuttingForwarder(TcpForwarder):
    """Forwards to the server; once armed, cuts the connection that carries a message up.

    ``cut`` is "before" (the server never sees the message) or "after" (the server
    gets it, its answer is lost). ``down`` refuses every new connection;
    ``down_after_cut`` sets it at the cut.
    """

    def __init__(self, port: int) -> None:
        super().__init__([port])
        self.cut: str | None = None
        self.down = False
        self.down_after_cut = False
        self.cuts = 0
        self.connections = 0

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.close()
            return
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backends[0])
        loop = asyncio.get_running_loop()
        for task in (
            loop.create_task(self._client_to_server(reader, up_writer, writer)),
            loop.create_task(self._pipe(up_reader, writer)),
        ):
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _client_to_server(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        client: asyncio.StreamWriter,
    ) -> None:
        try:
            while data := await src.read(65536):
                if self.cut is not None and len(data) >= BIG_CHUNK:
                    cut, self.cut = self.cut, None
                    self.cuts += 1
                    self.down = self.down_after_cut
                    client.transport.abort()  # the sender hears nothing more
                    if cut == "after":
                        dst.write(data)
                        await dst.drain()
                        await asyncio.sleep(0.5)  # the server stores it; its answer is lost
                        return  # closed gracefully below, after the server read it all
                    dst.transport.abort()
                    return
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()


async def bastion(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_PASSPHRASE"] = PASSPHRASE
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bastion",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def make_pair(
    server: ServerProcess,
    root: Path,
    alice_url: str,
    *,
    friends: bool = True,
    bob_url: str | None = None,
) -> tuple[Path, Path]:
    """alice (through ``alice_url``) and bob (through ``bob_url``), contacts if ``friends``."""
    made = {}
    for name, url in (("alice", alice_url), ("bob", bob_url or server.url)):
        made[name] = await Client.register(
            root / name, PASSPHRASE, username=name, server_url=url, fingerprint=server.fingerprint
        )
    try:
        if friends:
            await befriend(made["alice"], made["bob"])
    finally:
        for client in made.values():
            await client.close()
    return root / "alice", root / "bob"


async def befriend(alice: Client, bob: Client) -> None:
    await alice.connect(receive=False)
    await bob.connect(receive=False)
    await contacts.request(alice, "bob", notify=False)
    await contacts.act(bob, "alice", "accept")
    for client in (alice, bob):
        assert client.conn is not None
        await client.conn.aclose()
        client.conn = None


async def texts_received(bob: Path) -> list[str]:
    code, out, err = await bastion("inbox", "--json", "--profile", str(bob))
    assert code == 0, err
    return [e["text"] for e in map(json.loads, out.splitlines()) if e["type"] == "message"]


async def history(profile: Path, peer: str) -> list[dict[str, object]]:
    code, out, err = await bastion("history", peer, "--json", "--profile", str(profile))
    assert code == 0, err
    return [e for e in map(json.loads, out.splitlines()) if e["type"] == "message"]


async def test_a_refused_message_is_marked_not_sent_and_a_retry_replaces_it(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice, bob = await make_pair(server, tmp_path, server.url, friends=False)

    code, out, err = await bastion("send", "bob", "hello bob", "--profile", str(alice))
    assert code == 1
    assert out == ""
    assert err.startswith("error: not sent: the server refused it: ")
    assert "not accepted you as a contact" in err
    [refused] = await history(alice, "bob")
    assert refused["state"] == "failed"
    assert "not accepted you as a contact" in str(refused["reason"])
    code, shown, _ = await bastion("history", "bob", "--profile", str(alice))
    assert "you -> bob: hello bob  [NOT SENT: " in shown

    code, out, err = await bastion("send", "bob", "hello bob", "--json", "--profile", str(alice))
    assert code == 1
    assert json.loads(out)["type"] == "refused"
    assert len(await history(alice, "bob")) == 1  # the retry replaced the failed copy

    clients = [
        Client.open(alice, PASSPHRASE),
        Client.open(bob, PASSPHRASE),
    ]
    try:
        await befriend(clients[0], clients[1])
    finally:
        for client in clients:
            await client.close()
    code, out, err = await bastion("send", "bob", "hello bob", "--profile", str(alice))
    assert code == 0, err
    assert out == "stored on the server for bob; their devices receive it as they connect\n"
    [sent] = await history(alice, "bob")
    assert (sent["state"], sent["text"]) == ("sent", "hello bob")
    assert "reason" not in sent
    assert await texts_received(bob) == ["hello bob"]


async def test_send_reconnects_and_confirms_when_the_answer_is_lost(
    server: ServerProcess, tmp_path: Path
) -> None:
    forwarder = CuttingForwarder(server.port)
    await forwarder.start()
    try:
        alice, bob = await make_pair(server, tmp_path, forwarder.url)
        forwarder.cut = "after"
        before = forwarder.connections
        code, out, err = await bastion("send", "bob", LONG_TEXT, "--profile", str(alice))
        assert forwarder.cuts == 1
        assert forwarder.connections == before + 2  # it reconnected on its own
        assert code == 0, err
        assert out.startswith("stored on the server for bob")
        [record] = await history(alice, "bob")
        assert record["state"] == "sent"
        assert await texts_received(bob) == [LONG_TEXT]
    finally:
        await forwarder.close()


@pytest.mark.parametrize("cut", ["before", "after"])
async def test_a_kept_message_is_listed_and_the_natural_retry_sends_it_once(
    server: ServerProcess, tmp_path: Path, cut: str
) -> None:
    forwarder = CuttingForwarder(server.port)
    await forwarder.start()
    try:
        alice, bob = await make_pair(server, tmp_path, forwarder.url)
        forwarder.cut = cut
        forwarder.down_after_cut = True
        code, out, err = await bastion("send", "bob", LONG_TEXT, "--profile", str(alice))
        assert forwarder.cuts == 1
        assert code == EXIT_KEPT, err
        assert "it is kept and goes out on the next connection" in err
        assert "Traceback" not in err
        assert f"'bastion outbox --profile {alice}'" in err
        code, kept, _ = await bastion("outbox", "--profile", str(alice))
        assert code == 0
        assert f"you -> bob: {LONG_TEXT}  [kept" in kept

        forwarder.down = False
        code, out, err = await bastion("send", "bob", LONG_TEXT, "--profile", str(alice))
        assert code == 0, err
        assert out.startswith("stored on the server for bob")
        assert (await bastion("outbox", "--profile", str(alice)))[1] == ""
        [record] = await history(alice, "bob")
        assert record["state"] == "sent"
        assert await texts_received(bob) == [LONG_TEXT]
    finally:
        await forwarder.close()
