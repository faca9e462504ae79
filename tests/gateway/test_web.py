"""The browser app, used as two people would, in real Chromium on real gateways and server.

alice and bob each run ``bastion gateway --web`` on a new profile, open the
printed link, create their accounts in the page, become contacts, chat live,
send files (one clean, one EICAR), make a group, verify each other by scanning
the other's QR code with a (fake) camera; then bob reinstalls, and alice's
conversation must stop her with a banner she cannot dismiss. Along the way:
no peer-chosen string runs as HTML, every answer carries the CSP, and axe-core
finds nothing serious on the main screens.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from playwright.async_api import FilePayload, Page, expect

from tests.conftest import ServerProcess
from tests.gateway.support import GatewayProcess, gateways
from tests.gateway.web_support import (
    STRONG_PASSPHRASE,
    XSS,
    Person,
    axe_problems,
    browsers,
    chromium_or_skip,
    shot,
    write_camera,
)
from tests.test_cli import bastion, register
from tests.test_devices import replace_account_on_server

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(420)]

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
WAIT_MS = 30_000


def screenshots(tmp_path: Path) -> Path:
    """Where the screenshots go: docs/screenshots when BASTION_SCREENSHOTS says so."""
    chosen = os.environ.get("BASTION_SCREENSHOTS")
    return Path(chosen) if chosen else tmp_path / "screenshots"


async def create_account(page: Page, link: str, server: ServerProcess, name: str) -> None:
    if page.url != link.split("#", maxsplit=1)[0] + "":
        await page.goto(link)
    await expect(page.get_by_role("heading", name="Create your Bastion account")).to_be_visible()
    assert "#token" not in page.url  # the token left the address bar at once
    await page.get_by_label("Server address").fill(server.url)
    await page.get_by_label("Server fingerprint").fill(server.fingerprint)
    await page.get_by_label("Username").fill(name)
    await page.get_by_label("Passphrase (long").fill(STRONG_PASSPHRASE)
    await page.get_by_label("Passphrase again").fill(STRONG_PASSPHRASE)
    await page.get_by_role("button", name="Create account").click()
    await expect(page.locator("#connection")).to_have_text("Connected", timeout=WAIT_MS)
    await expect(page.locator("#me")).to_contain_text(name)


async def open_chat(page: Page, name: str) -> None:
    await page.locator("#side button.conv", has_text=name).first.click()
    await expect(page.locator("#conv-title")).to_contain_text(name)


async def say(page: Page, text: str) -> None:
    await page.get_by_label("Message to").fill(text)
    await page.get_by_role("button", name="Send", exact=True).click()


def nothing_ran(*people: Person) -> None:
    for person in people:
        assert person.dialogs == [], (person.name, person.dialogs)
        assert person.errors == [], (person.name, person.errors)


async def no_injected_image(page: Page) -> None:
    assert await page.locator('img[src="x"]').count() == 0


async def test_two_people_in_the_browser(
    server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chromium_or_skip()
    monkeypatch.setenv("XDG_DOWNLOAD_DIR", str(tmp_path / "Downloads"))
    shots = screenshots(tmp_path)
    alice_gw = GatewayProcess(tmp_path / "alice", "--web", "--reconnect-delay", "0.2")
    bob_gw = GatewayProcess(tmp_path / "bob", "--web")
    with gateways(alice_gw, bob_gw):
        waiting = alice_gw.start(passphrase=None, expect="gateway_waiting")
        assert waiting["state"] == "new"
        bob_waiting = bob_gw.start(passphrase=None, expect="gateway_waiting")
        async with browsers(tmp_path, "alice", "bob") as people:
            alice, bob = people["alice"].page, people["bob"].page

            # Create both accounts in the page; nothing but the page is used.
            await alice.goto(waiting["web"])
            await shot(alice, shots, "web-create")
            assert await axe_problems(alice) == []
            await create_account(alice, waiting["web"], server, "alice")
            await create_account(bob, bob_waiting["web"], server, "bob")

            # A contact request whose note tries to be HTML.
            await alice.get_by_text("Add a contact or start a group").click()
            await alice.get_by_label("Username", exact=True).fill("bob")
            await alice.get_by_label("Note to them").fill(XSS)
            await alice.get_by_role("button", name="Send request").click()
            request = bob.locator(".request", has_text="alice")
            await expect(request).to_contain_text(XSS, timeout=WAIT_MS)
            await no_injected_image(bob)
            await request.get_by_role("button", name="Accept alice").click()
            await expect(alice.locator("#side button.conv", has_text="bob")).to_be_visible(
                timeout=WAIT_MS
            )

            # Chat, live both ways, with what happened to each message.
            await open_chat(alice, "bob")
            await say(alice, "hello bob")
            await expect(bob.locator("#side .badge")).to_have_text(", unread: 1", timeout=WAIT_MS)
            await expect(bob).to_have_title("(1) Bastion")
            await open_chat(bob, "alice")
            await expect(bob.locator(".msg .text")).to_have_text(["hello bob"])
            await say(bob, "hi alice")
            await expect(alice.locator(".msg:not(.mine) .text")).to_have_text(
                ["hi alice"], timeout=WAIT_MS
            )
            await expect(alice.locator(".msg.mine .state")).to_have_text(
                ["Delivered"], timeout=WAIT_MS
            )
            await say(alice, XSS)
            await expect(bob.locator(".msg .text").last).to_have_text(XSS, timeout=WAIT_MS)
            await no_injected_image(bob)
            await shot(alice, shots, "web-chat")
            assert await axe_problems(alice) == []

            # A clean file: a progress bar, then bob sees the verdict before saving it.
            clean = tmp_path / "notes.txt"
            clean.write_bytes(b"minutes of the meeting\n" * 1000)
            await alice.locator("#file-input").set_input_files(
                files=[
                    FilePayload(name=f"{XSS}.txt", mimeType="text/plain", buffer=clean.read_bytes())
                ]
            )
            await expect(alice.locator(".transfers progress")).to_be_visible()
            await expect(alice.locator("#toast")).to_contain_text(
                "was encrypted and sent", timeout=WAIT_MS
            )
            # bob's side shows the name made safe for a file system: <, > became _.
            offered = bob.locator(".file", has_text="_img src=x onerror=alert(1)_.txt")
            await expect(offered).to_contain_text("Not checked yet", timeout=WAIT_MS)
            await no_injected_image(bob)
            await offered.get_by_role("button").click()
            await expect(offered).to_contain_text("Checked: clean. Saved.", timeout=WAIT_MS)
            async with bob.expect_download() as waiting_download:
                await offered.get_by_role("link").click()
            download = await waiting_download.value
            saved = await download.path()
            assert await asyncio.to_thread(saved.read_bytes) == clean.read_bytes()

            # EICAR: blocked, with the reason, and never offered for download.
            await alice.locator("#file-input").set_input_files(
                files=[
                    FilePayload(name="eicar.com", mimeType="application/octet-stream", buffer=EICAR)
                ]
            )
            bad = bob.locator(".file", has_text="eicar.com")
            await expect(bad).to_contain_text("Not checked yet", timeout=WAIT_MS)
            await bad.get_by_role("button").click()
            await expect(bad).to_contain_text("Blocked — not saved", timeout=WAIT_MS)
            assert await bad.get_by_role("link").count() == 0
            await shot(bob, shots, "web-files")

            # A group whose name tries to be HTML; its signed history is shown.
            await alice.get_by_text("Add a contact or start a group").click()
            await alice.get_by_label("Group name").fill(XSS)
            await alice.get_by_label("Members (usernames").fill("bob")
            await alice.get_by_role("button", name="Create group").click()
            await expect(alice.locator("#conv-title")).to_have_text(f"Group: {XSS}")
            # bob is alice's contact, so he is in at once (strangers get an invitation).
            await expect(bob.locator("#side button.conv", has_text=XSS)).to_be_visible(
                timeout=WAIT_MS
            )
            await say(alice, "group hello")
            await bob.locator("#side button.conv", has_text=XSS).click()
            await expect(bob.locator(".msg .text")).to_contain_text(
                ["group hello"], timeout=WAIT_MS
            )
            await alice.get_by_role("button", name="Members and history").click()
            history = alice.locator(".changes li")
            await expect(history.first).to_contain_text("alice created the group")
            await shot(alice, shots, "web-group")
            assert await axe_problems(alice) == []
            await no_injected_image(alice)
            await no_injected_image(bob)

            # Verify by scanning bob's QR code with alice's (fake) camera.
            await open_chat(alice, "bob")
            await alice.get_by_role("button", name="Verify bob").click()
            await open_chat(bob, "alice")
            await bob.get_by_role("button", name="Verify alice").click()
            await expect(bob.locator("img.qr")).to_be_visible()
            write_camera(people["alice"].camera, await people["bob"].qr_png())
            await alice.get_by_role("button", name="Start the camera").click()
            await expect(alice.locator("#verify-result")).to_have_text(
                "✓ bob is verified.", timeout=WAIT_MS
            )
            await shot(alice, shots, "web-verify")
            assert await axe_problems(alice) == []
            await alice.get_by_role("button", name="Back to the conversation").click()
            await expect(alice.locator(".conv-head .verified")).to_have_text("✓ Verified")
            await alice.get_by_role("button", name="Safety number").click()

            # bob verifies alice by comparing emoji: alice's page is asked, both say they match.
            await bob.get_by_role("button", name="Compare emoji").click()
            await alice.get_by_role("button", name="Back to the conversation").click()
            asked = alice.locator(".notice", has_text="bob asks to compare emoji")
            await asked.get_by_role("button", name="Compare emoji").click(timeout=WAIT_MS)
            for page in (alice, bob):
                await expect(page.locator(".emoji li")).to_have_count(7, timeout=WAIT_MS)
            assert (
                await alice.locator(".emoji").inner_text()
                == await bob.locator(".emoji").inner_text()
            )
            await shot(bob, shots, "web-emoji")
            await alice.get_by_role("button", name="They match").click()
            await bob.get_by_role("button", name="They match").click()
            await expect(bob.locator("#verify-result")).to_have_text(
                "✓ alice is verified.", timeout=WAIT_MS
            )
            await bob.get_by_role("button", name="Back to the conversation").click()
            await alice.get_by_role("button", name="Back to the conversation").click()

            # A status another person chose is text too; bob writes with the keyboard only.
            await bob.get_by_label("Status message").fill(XSS)
            await bob.get_by_role("button", name="Set", exact=True).click()
            await expect(alice.locator("#side")).to_contain_text(XSS, timeout=WAIT_MS)
            await no_injected_image(alice)
            await bob.locator("body").click(position={"x": 5, "y": 5})
            for _ in range(60):
                await bob.keyboard.press("Tab")
                focused = await bob.evaluate("document.activeElement.id")
                if focused == "composer-text":
                    break
            else:
                raise AssertionError("the message box cannot be reached with Tab")
            await bob.keyboard.type("typed without a mouse")
            await bob.keyboard.press("Enter")
            await expect(alice.locator(".msg:not(.mine) .text").last).to_have_text(
                "typed without a mouse", timeout=WAIT_MS
            )

            # bob links a second device from his page; alice's conversation says so.
            await bob.get_by_role("button", name="Devices").click()
            await bob.get_by_role("button", name="Show a link code").click()
            command = (await bob.locator("#link-command").inner_text()).split()
            assert command[:2] == ["bastion", "link"]
            bastion(*command[1:], "--profile", str(tmp_path / "bob-laptop"))
            await expect(bob.locator("#toast")).to_contain_text(
                "A new device joined your account", timeout=WAIT_MS
            )
            await bob.get_by_role("button", name="Devices").click()  # the list, as it is now
            await expect(bob.locator("#conversation .list li")).to_have_count(2, timeout=WAIT_MS)
            await say(alice, "which device is this?")
            await expect(alice.locator(".notices")).to_contain_text(
                "bob added a new device", timeout=WAIT_MS
            )

            # Search across conversations, and a result opens its conversation.
            await alice.get_by_label("Search all conversations").fill("HELLO")
            await alice.get_by_label("Search all conversations").press("Enter")
            hits = alice.locator(".hits li")
            await expect(hits).to_have_count(2, timeout=WAIT_MS)  # "hello bob", "group hello"
            await hits.filter(has_text="hello bob").get_by_role("button").click()
            await expect(alice.locator("#conv-title")).to_have_text("bob")

            # A message while alice looks elsewhere: a notification without the text, a badge.
            await alice.get_by_role("button", name="Notifications").click()
            await expect(alice.locator("#toast")).to_contain_text("Notifications are on")
            await alice.locator("#side button.conv", has_text="2 members").click()
            await bob.get_by_role("button", name="Back to the conversation").click()
            await say(bob, "the secret is in the shed")
            await expect(alice).to_have_title("(1) Bastion", timeout=WAIT_MS)
            shown = await alice.evaluate("window.shown")
            assert {"title": "New message from bob", "body": ""} in shown
            assert "shed" not in str(shown)
            await open_chat(alice, "bob")
            await expect(alice).to_have_title("Bastion")

            # Phone width, dark: still no serious accessibility problem.
            await alice.set_viewport_size({"width": 390, "height": 844})
            await alice.emulate_media(color_scheme="dark")
            await shot(alice, shots, "web-phone-dark")
            assert await axe_problems(alice) == []
            await alice.set_viewport_size({"width": 1280, "height": 860})
            await alice.emulate_media(color_scheme="light")

            # bob reinstalls: alice is stopped by a banner with the two choices, and cannot send.
            server.stop()
            replace_account_on_server(server, "bob")
            server.start()
            register(server, "bob", tmp_path / "reinstalled")
            await expect(alice.locator("#connection")).to_have_text("Connected", timeout=WAIT_MS)
            await say(alice, "are you still you?")
            banner = alice.get_by_role("alert")
            await expect(banner).to_contain_text("bob's security key changed", timeout=WAIT_MS)
            await expect(banner.get_by_role("button")).to_have_text(
                ["Accept the new key and verify now", "Accept the new key without verifying"]
            )
            await expect(alice.get_by_label("Message to bob")).to_be_disabled()
            await expect(alice.get_by_role("button", name="Send", exact=True)).to_be_disabled()
            await shot(alice, shots, "web-key-changed")
            assert await axe_problems(alice) == []

            # Every answer of both doors carried the CSP; nothing ran that was not the app.
            for person in people.values():
                assert person.responses
                for response in person.responses:
                    policy = await response.header_value("content-security-policy")
                    assert policy is not None, response.url
                    assert "script-src 'self'" in policy, response.url
                    assert "unsafe-inline" not in policy
                    assert "unsafe-eval" not in policy
            nothing_ran(*people.values())
