"""Every gateway method against a real server and real gateway processes.

Each call's result is checked against the method's result schema in the
gateway's OpenRPC document, and the last test fails if a method of the
document was not called by this module: a method added without a test, or a
schema that no longer matches what the gateway answers, shows up here.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest

from bastion.client import devices
from bastion.errors import KeyChangedError, ServerRefusedError
from bastion.gateway import paths, rpc
from bastion.gateway.link import GatewayError, GatewayLink
from tests.conftest import PASSPHRASE, ServerProcess, free_port
from tests.gateway.support import GatewayProcess, gateways, pair, subscribed, until
from tests.test_cli import bastion, befriend, register
from tests.test_devices import replace_account_on_server

pytestmark = pytest.mark.network

CALLED: set[str] = set()
"""Every method this module called and whose result matched its schema."""


def method_document(name: str) -> dict[str, Any]:
    [method] = [m for m in rpc.schema_document()["methods"] if m["name"] == name]
    found: dict[str, Any] = method
    return found


def check_result(name: str, result: Any) -> None:
    """Fail unless ``result`` matches the result schema of ``name``."""
    # ``#/components/schemas/...`` references resolve against the whole document.
    document = rpc.schema_document()
    schema = {**method_document(name)["result"]["schema"], "components": document["components"]}
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    errors = sorted(validator.iter_errors(result), key=str)
    assert not errors, f"{name} answered {result!r}, which breaks its schema: {errors[0].message}"
    CALLED.add(name)


def check_events(seen: list[dict[str, Any]]) -> None:
    """Fail unless every live event matches ``components.schemas.Event``."""
    document = rpc.schema_document()
    schema = {"$ref": "#/components/schemas/Event", "components": document["components"]}
    validator = jsonschema.Draft202012Validator(schema)
    for event in seen:
        errors = list(validator.iter_errors(event))
        assert not errors, f"event {event['type']} breaks the Event schema: {errors[0].message}"


async def call(link: GatewayLink, method: str, /, **params: Any) -> Any:
    """Call ``method`` and check its result against the schema."""
    result = await link.call(method, **params)
    check_result(method, result)
    return result


async def raw(gw: GatewayProcess, request: dict[str, Any]) -> dict[str, Any]:
    """One request on a fresh socket connection, and the answer as it came."""
    reader, writer = await asyncio.open_unix_connection(str(paths.socket_path(gw.profile)))
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        answer: dict[str, Any] = json.loads(await asyncio.wait_for(reader.readline(), 20))
        return answer
    finally:
        writer.close()


async def refused(link: GatewayLink, method: str, /, **params: Any) -> GatewayError:
    """Call ``method`` expecting a Bastion refusal (-32000 with data.code)."""
    with pytest.raises(GatewayError) as caught:
        await link.call(method, **params)
    return caught.value


@dataclass
class World:
    """One server; alice and bob (accepted contacts) with gateways; carol with the CLI only."""

    server: ServerProcess
    root: Path
    alice: Path
    bob: Path
    carol: Path
    alice_gw: GatewayProcess
    bob_gw: GatewayProcess

    def cli(self, profile: Path, *args: str, check: bool = True) -> str:
        return bastion(*args, "--profile", str(profile), check=check).stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("methods")
    server = ServerProcess(root / "server", free_port())
    server.start()
    gateways: list[GatewayProcess] = []
    try:
        alice, bob = pair(server, root)
        carol = register(server, "carol", root)
        for profile in (alice, bob):
            gw = GatewayProcess(profile)
            gw.start()
            gateways.append(gw)
        yield World(server, root, alice, bob, carol, *gateways)
    finally:
        for gw in gateways:
            gw.kill()
        server.kill()


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` (a call to the gateway) until it holds; fail after 30 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def online(link: GatewayLink) -> None:
    async def connected() -> bool:
        return bool((await link.call("status"))["connection"] == "connected")

    await eventually(connected, "the gateway to connect")


# --- the protocol's own errors -----------------------------------------------------------------


async def test_unknown_method_and_bad_params_get_json_rpc_errors(world: World) -> None:
    unknown = await raw(world.alice_gw, {"jsonrpc": "2.0", "id": 1, "method": "groups.explode"})
    assert unknown["error"]["code"] == rpc.METHOD_NOT_FOUND
    assert "groups.explode" in unknown["error"]["message"]

    for method, params, says in (
        ("groups.create", {"name": 5}, "name: 5 is not of type 'string'"),
        ("groups.create", {"name": "x", "members": ["Not A Name"]}, "members.0"),
        ("files.send", {"path": "relative.txt", "to": "bob"}, "path:"),
        ("verify.sas_confirm", {}, "'id' is a required property"),
        ("devices.revoke", {"device": "d", "extra": 1}, "Additional properties"),
        ("search", {}, "'text' is a required property"),
        ("search", {"text": ""}, "text: "),
        ("search", {"text": "x" * 201}, "text: "),
        ("search", {"text": "x", "limit": 501}, "limit: 501 is greater than the maximum"),
        ("devices.link", {"history": "sometimes"}, "history: 'sometimes' does not match"),
    ):
        answer = await raw(
            world.alice_gw, {"jsonrpc": "2.0", "id": 2, "method": method, "params": params}
        )
        error = answer["error"]
        assert error["code"] == rpc.INVALID_PARAMS, (method, error)
        assert says in error["message"], (method, error)
        assert "\n" not in error["message"]
        assert "Traceback" not in error["message"]


async def test_a_refused_secret_is_not_quoted_back(world: World, tmp_path: Path) -> None:
    secret = "x" * 1025  # too long for the schema
    answer = await raw(
        world.alice_gw,
        {
            "jsonrpc": "2.0",
            "id": 4,
            "method": "account.export",
            "params": {"file": str(tmp_path / "export"), "passphrase": secret},
        },
    )
    assert answer["error"]["code"] == rpc.INVALID_PARAMS
    assert answer["error"]["message"].startswith("passphrase: ")
    assert "xxxx" not in json.dumps(answer)
    assert not (tmp_path / "export").exists()


async def test_the_method_checks_what_the_schema_cannot(world: World) -> None:
    """Either-or params and relative paths are refused with a sentence, as invalid params."""
    for method, params, says in (
        ("files.send", {"path": "/etc/hostname"}, "either to (a user) or group"),
        ("files.send", {"path": "/etc/hostname", "to": "bob", "group": "x"}, "not both"),
        ("verify.confirm", {"user": "bob"}, "give one of: the number"),
        ("search", {"text": "   "}, "the text is empty"),
    ):
        answer = await raw(
            world.alice_gw, {"jsonrpc": "2.0", "id": 3, "method": method, "params": params}
        )
        assert answer["error"]["code"] == rpc.INVALID_PARAMS, answer
        assert says in answer["error"]["message"]


# --- messages, contacts, presence --------------------------------------------------------------


async def test_messages_and_the_gateway_itself(world: World) -> None:
    async with subscribed(world.bob_gw) as (bob, bob_events), await world.alice_gw.link() as alice:
        await online(alice)
        await online(bob)
        assert (await call(alice, "status"))["user"] == "alice"
        assert (await call(alice, "whoami"))["user"] == "alice"
        sent = await call(alice, "send", to="bob", text="hello from the gateway")
        assert sent["type"] == "sent"
        await bob_events.wait_for(
            lambda e: e.get("text") == "hello from the gateway", "bob gets the message"
        )
        assert (await call(alice, "message", id=sent["id"]))["text"] == ("hello from the gateway")
        history = await call(bob, "history", user="alice")
        assert history[-1]["text"] == "hello from the gateway"
        found = await call(bob, "search", text="FROM THE Gateway")
        assert [(m["text"], m["conversation"]) for m in found] == [
            ("hello from the gateway", "dm:alice,bob")
        ]
        assert found[0]["id"] == sent["id"]
        await call(alice, "send", to="bob", text="hello again")
        newest = await call(alice, "search", text="HELLO", limit=1)
        assert [(m["text"], m["state"]) for m in newest] == [("hello again", "sent")]
        assert await call(alice, "search", text="no such words anywhere") == []
        assert await call(alice, "outbox") == []
        assert (await call(alice, "subscribe"))["type"] == "subscribed"
        assert (await call(alice, "unsubscribe"))["type"] == "unsubscribed"


async def test_contacts_and_presence(world: World) -> None:
    async with subscribed(world.alice_gw) as (alice, events):
        await online(alice)
        world.cli(world.carol, "contacts", "add", "alice", "--note", "hi, it's carol")
        await events.wait_for(
            lambda e: e["type"] == "contact_request" and e.get("from") == "carol",
            "carol's request",
        )
        listed = {c["user"]: c for c in await call(alice, "contacts.list")}
        assert listed["bob"]["state"] == "accepted"
        assert listed["carol"]["note"] == "hi, it's carol"
        assert (await call(alice, "contacts.decline", user="carol"))["user"] == "carol"
        await call(alice, "contacts.block", user="carol")
        await call(alice, "contacts.unblock", user="carol")
        added = await call(alice, "contacts.add", user="carol", note="hello carol")
        assert added["user"] == "carol"
        world.cli(world.carol, "contacts", "accept", "alice", check=False)
        await call(alice, "contacts.remove", user="carol")
        world.cli(world.carol, "contacts", "add", "alice")
        await until(lambda: len(events.of("contact_request")) >= 2, "carol's second request")
        accepted = await call(alice, "contacts.accept", user="carol")
        assert accepted["state"] == "accepted"

        told = await call(alice, "presence.set", state="busy", status="in a meeting")
        assert (told["state"], told["status"]) == ("busy", "in a meeting")
        shown = await call(alice, "presence.show")
        assert shown[0] == {"type": "presence_self", "state": "busy", "status": "in a meeting"}
        await call(alice, "presence.set", state="online")


# --- groups ------------------------------------------------------------------------------------


async def test_groups_from_creation_to_leaving(world: World) -> None:
    async with subscribed(world.bob_gw) as (bob, bob_events), await world.alice_gw.link() as alice:
        await online(alice)
        await online(bob)
        created = await call(alice, "groups.create", name="Book club", members=["bob"])
        assert (created["members"], created["admins"]) == (["alice", "bob"], ["alice"])
        group = created["group"]
        assert group in [g["group"] for g in await call(alice, "groups.list")]
        shown = await call(alice, "groups.show", group="Book club")
        assert set(shown["devices"]) == {"alice", "bob"}
        assert shown["devices"]["alice"]

        async def bob_knows() -> bool:
            return group in [g["group"] for g in await call(bob, "groups.list")]

        await eventually(bob_knows, "bob's gateway to learn of the group")

        # Bob is a plain member: the chain refuses his admin change, with a reason code.
        answer = await raw(
            world.bob_gw,
            {
                "jsonrpc": "2.0",
                "id": 9,
                "method": "groups.rename",
                "params": {"group": group, "name": "Bob's club"},
            },
        )
        assert answer["error"]["code"] == rpc.APP_ERROR, answer
        assert answer["error"]["data"]["code"] == "state"
        assert "only an admin may rename" in answer["error"]["message"]
        assert (await call(bob, "groups.show", group=group))["name"] == "Book club"

        promoted = await call(alice, "groups.promote", group=group, user="bob")
        assert promoted["admins"] == ["alice", "bob"]
        demoted = await call(alice, "groups.demote", group=group, user="bob")
        assert demoted["admins"] == ["alice"]
        renamed = await call(alice, "groups.rename", group=group, name="Readers")
        assert renamed["name"] == "Readers"

        sent = await call(alice, "groups.send", group=group, text="chapter 3 tonight")
        assert sent["conversation"] == f"group:{group}"
        await bob_events.wait_for(
            lambda e: e.get("text") == "chapter 3 tonight", "bob gets the group message"
        )
        history = await call(bob, "groups.history", group=group)
        assert [m["text"] for m in history] == ["chapter 3 tonight"]
        assert history[0]["from"] == "alice"
        found = await call(bob, "search", text="Chapter 3", limit=500)
        assert [(m["text"], m["from"], m["conversation"]) for m in found] == [
            ("chapter 3 tonight", "alice", f"group:{group}")
        ]

        # Carol became alice's contact in the contacts test: she is added at once.
        added = await call(alice, "groups.add", group=group, user="carol")
        assert added["members"] == ["alice", "bob", "carol"]
        removed = await call(alice, "groups.remove", group=group, user="carol")
        assert removed["members"] == ["alice", "bob"]
        # The signed history, as bob's device verified it, says who did what.
        await call(bob, "groups.show", group=group)
        changes = await call(bob, "groups.changes", group=group)
        assert [(c["by"], c["change"], c["user"]) for c in changes] == [
            ("alice", "create", None),
            ("alice", "promote", "bob"),
            ("alice", "demote", "bob"),
            ("alice", "rename", None),
            ("alice", "add_member", "carol"),
            ("alice", "remove_member", "carol"),
        ]
        assert [c["seq"] for c in changes] == sorted(c["seq"] for c in changes)
        assert changes[-1]["name"] == "Readers"
        left = await call(bob, "groups.leave", group=group)
        assert "bob" not in left["members"]


async def test_group_invitations_accept_and_decline(world: World) -> None:
    """Carol is not bob's contact: her groups wait for his answer."""
    async with subscribed(world.bob_gw) as (bob, events):
        await online(bob)
        world.cli(world.carol, "group", "create", "Garden", "--members", "bob")
        world.cli(world.carol, "group", "create", "Choir", "--members", "bob")
        await until(lambda: len(events.of("group_invite")) >= 2, "two invitations")
        invites = await call(bob, "groups.invites")
        assert sorted(i["name"] for i in invites) == ["Choir", "Garden"]
        assert all(i["by"] == "carol" for i in invites)
        joined = await call(bob, "groups.accept", group="Garden")
        assert "bob" in joined["members"]
        declined = await call(bob, "groups.decline", group="Choir")
        assert (declined["type"], declined["name"]) == ("group_declined", "Choir")
        assert await call(bob, "groups.invites") == []


# --- files -------------------------------------------------------------------------------------


def elf() -> bytes:
    """The header of a 64-bit Linux program: a scan blocks it whatever its name says."""
    return b"\x7fELF\x02\x01\x01" + b"\x00" * 9 + struct.pack("<HHI", 2, 0x3E, 1) + b"\x00" * 40


async def test_files_send_list_get_through_quarantine(world: World, tmp_path: Path) -> None:
    source = tmp_path / "minutes.txt"
    source.write_text("minutes of the meeting\n")
    disguised = tmp_path / "cute-cat.jpg"
    disguised.write_bytes(elf())
    saved_to = tmp_path / "saved"
    saved_to.mkdir()
    async with subscribed(world.bob_gw) as (bob, events), await world.alice_gw.link() as alice:
        await online(alice)
        await online(bob)
        sent = await call(alice, "files.send", to="bob", path=str(source))
        assert (sent["to"], sent["name"], sent["size"]) == ("bob", "minutes.txt", 23)
        cat = await call(alice, "files.send", to="bob", path=str(disguised))
        await until(lambda: len(events.of("file")) >= 2, "bob is offered both files")
        listed = {f["id"]: f for f in await call(bob, "files.list")}
        assert (listed[sent["id"]]["state"], listed[sent["id"]]["verdict"]) == (
            "offered",
            None,
        )

        got = await call(bob, "files.get", id=sent["id"], to=str(saved_to))
        assert (got["state"], got["verdict"]) == ("saved", "clean")
        assert (saved_to / "minutes.txt").read_text() == "minutes of the meeting\n"

        blocked = await call(bob, "files.get", id=cat["id"], to=str(saved_to))
        assert blocked["state"] == "blocked"
        assert blocked["saved_to"] is None
        assert any("Linux program" in r for r in blocked["reasons"])
        assert sorted(p.name for p in saved_to.iterdir()) == ["minutes.txt"]

        group = await call(alice, "groups.create", name="Files", members=["bob"])
        to_group = await call(alice, "files.send", group=group["group"], path=str(source))
        assert to_group["to"] == f"group:{group['group']}"


# --- identity ----------------------------------------------------------------------------------


async def test_safety_number_qr_and_confirming_it(world: World) -> None:
    async with await world.alice_gw.link() as alice:
        await online(alice)
        shown = await call(alice, "verify.number", user="bob", qr=True)
        assert shown["trust"] in ("unverified", "verified")
        assert base64.b64decode(shown["qr_png"]).startswith(b"\x89PNG\r\n\x1a\n")
        wrong = shown["safety_number"][:-1] + ("1" if shown["safety_number"][-1] != "1" else "2")
        mismatch = await refused(alice, "verify.confirm", user="bob", number=wrong)
        assert mismatch.code == "comparison_mismatch", mismatch.code
        confirmed = await call(alice, "verify.confirm", user="bob", number=shown["safety_number"])
        assert confirmed["trust"] == "verified"
        assert "qr_png" not in await call(alice, "verify.number", user="bob")


async def test_confirming_with_a_picture_of_the_qr_code(world: World, tmp_path: Path) -> None:
    async with await world.bob_gw.link() as bob:
        await online(bob)
        before = await call(bob, "verify.number", user="alice")
        shown = await call(bob, "verify.number", user="alice", qr=True)
        picture = tmp_path / "alices-screen.png"
        async with await world.alice_gw.link() as alice:
            alices = await call(alice, "verify.number", user="bob", qr=True)
        picture.write_bytes(base64.b64decode(alices["qr_png"]))
        confirmed = await call(bob, "verify.confirm", user="alice", qr_image=str(picture))
        assert confirmed["trust"] == "verified"
        assert confirmed["safety_number"] == shown["safety_number"] == before["safety_number"]


async def test_confirming_with_the_bytes_a_camera_scan_decoded(world: World) -> None:
    """What the browser app sends after scanning: only the other side's own code verifies."""
    async with await world.bob_gw.link() as bob, await world.alice_gw.link() as alice:
        await online(bob)
        alices = await call(alice, "verify.number", user="bob", qr=True)
        own = await call(bob, "verify.number", user="alice", qr=True)
        payload = decode_qr(base64.b64decode(alices["qr_png"]))
        # bob's own code (what an attacker could replay to him) and garbage do not verify.
        for wrong in (decode_qr(base64.b64decode(own["qr_png"])), b"not a code at all"):
            mismatch = await refused(
                bob, "verify.confirm", user="alice", qr_payload=base64.b64encode(wrong).decode()
            )
            assert mismatch.code == "comparison_mismatch", mismatch.code
        bad = await raw(
            world.bob_gw,
            {"jsonrpc": "2.0", "id": 1, "method": "verify.confirm",
             "params": {"user": "alice", "qr_payload": "%%%"}},
        )  # fmt: skip
        assert bad["error"]["code"] == rpc.INVALID_PARAMS
        confirmed = await call(
            bob, "verify.confirm", user="alice", qr_payload=base64.b64encode(payload).decode()
        )
        assert confirmed["trust"] == "verified"


def decode_qr(png: bytes) -> bytes:
    import io

    import zxingcpp
    from PIL import Image

    [found] = zxingcpp.read_barcodes(Image.open(io.BytesIO(png)).convert("L"))
    return bytes(found.bytes)


async def test_sas_verification_as_a_multi_call_flow(world: World) -> None:
    async with (
        subscribed(world.alice_gw) as (alice, alice_events),
        subscribed(world.bob_gw) as (bob, bob_events),
    ):
        await online(alice)
        await online(bob)
        started = await call(bob, "verify.sas_start", user="alice")
        assert started["type"] == "verification_started"
        await alice_events.wait_for(
            lambda e: e["type"] == "verification_request" and e["from"] == "bob",
            "bob's request",
        )
        answering = await call(alice, "verify.sas_start", user="bob")
        theirs = await bob_events.wait_for(
            lambda e: e["type"] == "verification_codes", "bob's codes"
        )
        mine = await alice_events.wait_for(
            lambda e: e["type"] == "verification_codes", "alice's codes"
        )
        assert (mine["emoji"], mine["decimals"]) == (theirs["emoji"], theirs["decimals"])
        assert len(mine["emoji"]) == 7
        assert len(mine["decimals"]) == 3
        assert (mine["id"], theirs["id"]) == (answering["id"], started["id"])
        done = await asyncio.gather(
            call(alice, "verify.sas_confirm", id=answering["id"]),
            call(bob, "verify.sas_confirm", id=started["id"]),
        )
        assert [d["trust"] for d in done] == ["verified", "verified"]
        assert (await call(bob, "verify.number", user="alice"))["trust"] == "verified"
        await bob_events.wait_for(lambda e: e["type"] == "verification_done", "the done event")

        # Nobody answers: cancelling stops it, and the id is gone.
        lonely = await call(bob, "verify.sas_start", user="alice")
        stopped = await call(bob, "verify.sas_cancel", id=lonely["id"])
        assert stopped["type"] == "verification_cancelled"
        gone = await refused(bob, "verify.sas_confirm", id=lonely["id"])
        assert gone.code == "not_found"
        check_events(alice_events.seen + bob_events.seen)


async def test_devices_link_list_revoke_export_and_server_info(
    world: World, tmp_path: Path
) -> None:
    async with subscribed(world.alice_gw) as (alice, events):
        await online(alice)
        info = await call(alice, "server.info")
        assert info["server"] == world.server.url
        [only] = await call(alice, "devices.list")
        assert only["this_device"] is True

        text = f"before the laptop {secrets.token_hex(4)}"
        await call(alice, "send", to="bob", text=text)
        offered = await call(alice, "devices.link", history="30")
        laptop = tmp_path / "alice-laptop"
        joined = await asyncio.to_thread(
            bastion, "link", offered["code"], "--server", offered["server"], "--profile",
            str(laptop),
        )  # fmt: skip
        assert "linked as alice" in joined.stdout
        linked = await events.wait_for(lambda e: e["type"] == "linked", "the linked event")
        sent = linked["history"]
        assert sent["messages"] >= 1
        assert f"received {sent['messages']} message" in joined.stdout
        shown = bastion("history", "bob", "--json", "--profile", str(laptop)).stdout
        assert text in [json.loads(line)["text"] for line in shown.splitlines()]
        listed = {d["device"]: d for d in await call(alice, "devices.list")}
        assert set(listed) == {only["device"], linked["device"]}
        revoked = await call(alice, "devices.revoke", device=linked["device"])
        assert revoked == {"type": "revoked", "device": linked["device"]}
        assert [d["device"] for d in await call(alice, "devices.list")] == [only["device"]]

        secret = "export passphrase for the test"
        export = tmp_path / "alice.export"
        done = await call(alice, "account.export", file=str(export), passphrase=secret)
        assert done == {"type": "exported", "file": str(export)}
        assert export.stat().st_mode & 0o777 == 0o600
        again = await refused(alice, "account.export", file=str(export), passphrase=secret)
        assert "never overwrites" in again.message
        assert secret not in world.alice_gw.log_text()
        opened = await asyncio.to_thread(devices.read_export, export, secret)
        assert (opened.username, opened.server_url) == ("alice", world.server.url)
        check_events(events.seen)


async def test_accepting_a_changed_key(server: ServerProcess, tmp_path: Path) -> None:
    """A reinstalled contact: sending is refused until the shown key is accepted."""
    alice = register(server, "alice", tmp_path)
    dave = register(server, "dave", tmp_path)
    befriend(alice, "alice", dave, "dave")
    bastion("verify", "dave", "--profile", str(alice))  # pin dave's key
    server.stop()
    replace_account_on_server(server, "dave")
    server.start()
    register(server, "dave", tmp_path / "reinstalled")
    gw = GatewayProcess(alice)
    gw.start()
    try:
        async with subscribed(gw) as (link, events):
            await online(link)
            with pytest.raises(KeyChangedError):
                await link.call("send", to="dave", text="who are you?")
            shown = await call(link, "verify.number", user="dave")
            assert shown["trust"] == "changed"
            assert shown["fingerprint"]
            wrong = await refused(link, "trust.accept_new_key", user="dave", key="0" * 60)
            assert "nothing was accepted" in wrong.message
            accepted = await call(
                link, "trust.accept_new_key", user="dave", key=shown["fingerprint"]
            )
            assert accepted == {"type": "key_accepted", "user": "dave", "trust": "unverified"}
            assert (await call(link, "verify.number", user="dave"))["trust"] == "unverified"

            # Offline: what needs the server says so clearly; what the profile holds still works.
            # A link code offered just before is reported as failed, not left waiting.
            await call(link, "devices.link")
            server.stop()
            failed = await events.wait_for(lambda e: e["type"] == "link_failed", "link_failed")
            assert failed["reason"]
            check_events(events.seen)

            async def reconnecting() -> bool:
                return bool((await link.call("status"))["connection"] == "reconnecting")

            await eventually(reconnecting, "the gateway to notice the server is gone")
            for method, params in (
                ("groups.invites", {}),
                ("groups.create", {"name": "Offline"}),
                ("devices.list", {}),
                ("files.get", {"id": "00000000"}),
            ):
                with pytest.raises(ServerRefusedError) as gone:
                    await link.call(method, **params)
                assert gone.value.code == "disconnected", (method, gone.value.code)
                assert "cannot be reached" in gone.value.message
            assert await call(link, "groups.list") == []
            assert await call(link, "files.list") == []
            assert (await call(link, "server.info"))["server"] == server.url
    finally:
        gw.kill()


# --- before the profile is open (bastion gateway --web) -----------------------------------------


async def web_rpc(
    http: aiohttp.ClientSession, base: str, token: str, method: str, **params: Any
) -> dict[str, Any]:
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    headers = {"Authorization": f"Bearer {token}"}
    async with http.post(f"{base}/rpc", json=body, headers=headers) as answer:
        found: dict[str, Any] = await answer.json()
        return found


async def test_a_locked_web_gateway_creates_or_unlocks_and_nothing_else(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Until the page unlocks the profile, only profile.* answer; a wrong passphrase fails."""
    new = GatewayProcess(tmp_path / "newcomer", "--web")
    existing = register(server, "dora", tmp_path)
    locked = GatewayProcess(existing, "--web")
    with gateways(new, locked):
        waiting = locked.start(passphrase=None, expect="gateway_waiting")
        assert waiting["state"] == "locked"
        base, _, token = waiting["web"].partition("/#token=")
        async with aiohttp.ClientSession() as http:
            state = await web_rpc(http, base, token, "profile.state")
            check_result("profile.state", state["result"])
            assert state["result"] == {"type": "profile", "state": "locked"}
            status = await web_rpc(http, base, token, "status")
            assert status["error"]["code"] == rpc.METHOD_NOT_FOUND
            exists = await web_rpc(
                http, base, token, "profile.create",
                server=server.url, username="dora", passphrase="x" * 20,
            )  # fmt: skip
            assert exists["error"]["data"]["code"] == "exists"
            wrong = await web_rpc(http, base, token, "profile.unlock", passphrase="not it at all")
            assert "wrong passphrase" in wrong["error"]["message"]
            assert "not it at all" not in json.dumps(wrong)
            opened = await web_rpc(http, base, token, "profile.unlock", passphrase=PASSPHRASE)
            check_result("profile.unlock", opened["result"])
            assert opened["result"] == {"type": "unlocked", "user": "dora"}
            ready = json.loads(await asyncio.to_thread(locked.next_line))
            assert ready["type"] == "gateway_ready"
            assert ready["web"] == waiting["web"]
            after = await web_rpc(http, base, token, "profile.state")
            assert after["result"] == {"type": "profile", "state": "unlocked", "user": "dora"}
            again = await web_rpc(http, base, token, "profile.unlock", passphrase=PASSPHRASE)
            assert again["error"]["data"]["code"] == "unlocked"
            assert (await web_rpc(http, base, token, "status"))["result"]["user"] == "dora"

        # A new profile: a weak passphrase is refused, a good one registers and pins.
        fresh = new.start(passphrase=None, expect="gateway_waiting")
        assert fresh["state"] == "new"
        base, _, token = fresh["web"].partition("/#token=")
        async with aiohttp.ClientSession() as http:
            weak = await web_rpc(
                http, base, token, "profile.create",
                server=server.url, username="newcomer", passphrase="password123",
            )  # fmt: skip
            assert weak["error"]["code"] == rpc.INVALID_PARAMS
            assert not (tmp_path / "newcomer" / "profile.db").exists()
            made = await web_rpc(
                http, base, token, "profile.create", server=server.url, username="newcomer",
                passphrase=PASSPHRASE + " orchard", fingerprint=server.fingerprint,
            )  # fmt: skip
            check_result("profile.create", made["result"])
            assert made["result"]["fingerprint"] == server.fingerprint
        for gw in (new, locked):
            assert PASSPHRASE not in gw.log_text()


def test_every_method_in_the_schema_was_called() -> None:
    """Runs last: a method of the OpenRPC document this module never called is a failure."""
    described = {m["name"] for m in rpc.schema_document()["methods"]}
    assert described - CALLED == set()
