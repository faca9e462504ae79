"""Driving the browser app as a person would: Debian's chromium through playwright.

Each person has their own gateway (``bastion gateway --web``) and their own
browser process, so each can have their own fake camera: Chromium plays a
Y4M file as the camera, and the tests write into it the QR code the other
person's page shows.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image
from playwright.async_api import (
    Browser,
    BrowserContext,
    Dialog,
    Error,
    Page,
    Response,
    async_playwright,
)

CHROMIUM = Path("/usr/bin/chromium")
FRAME = (640, 480)
STRONG_PASSPHRASE = "quiver-lantern-orchard-57-basalt"
XSS = "<img src=x onerror=alert(1)>"
# Records each desktop notification the page shows (title and body) in window.shown.
NOTIFICATION_SPY = """
window.shown = [];
const Real = window.Notification;
class Recorded extends Real {
  constructor(title, options) {
    super(title, options);
    window.shown.push({ title, body: (options && options.body) || "" });
  }
}
Recorded.requestPermission = (...a) => Real.requestPermission(...a);
Object.defineProperty(Recorded, "permission", { get: () => Real.permission });
window.Notification = Recorded;
"""


def chromium_or_skip() -> None:
    if not CHROMIUM.exists() or shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (apt install chromium; .ci/run does)")


def write_camera(path: Path, png: bytes) -> None:
    """A Y4M video (what Chromium's fake camera plays) showing ``png`` on a white frame."""
    width, height = FRAME
    picture = Image.open(io.BytesIO(png)).convert("L")
    side = min(width, height) - 80
    picture = picture.resize((side, side), Image.Resampling.NEAREST)
    frame = Image.new("L", FRAME, 255)
    frame.paste(picture, ((width - side) // 2, (height - side) // 2))
    luma = frame.tobytes()
    chroma = bytes([128]) * ((width // 2) * (height // 2))
    header = f"YUV4MPEG2 W{width} H{height} F10:1 Ip A1:1 C420jpeg\n".encode()
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as out:
        out.write(header)
        for _ in range(5):
            out.write(b"FRAME\n" + luma + chroma + chroma)
    tmp.replace(path)


def blank_camera(path: Path) -> None:
    buf = io.BytesIO()
    Image.new("L", (64, 64), 255).save(buf, "PNG")
    write_camera(path, buf.getvalue())


@dataclass
class Person:
    """One person's browser tab on their gateway, and what the page did."""

    name: str
    page: Page
    camera: Path
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)

    async def qr_png(self) -> bytes:
        src = await self.page.get_attribute("img.qr", "src")
        assert src is not None
        assert src.startswith("data:image/png;base64,")
        return base64.b64decode(src.split(",", 1)[1])


@asynccontextmanager
async def browsers(tmp_path: Path, *names: str) -> AsyncIterator[dict[str, Person]]:
    """A browser process per person (each with its own fake camera file)."""
    chromium_or_skip()
    people: dict[str, Person] = {}
    opened: list[Browser] = []
    async with async_playwright() as pw:
        try:
            for name in names:
                camera = tmp_path / f"{name}-camera.y4m"
                blank_camera(camera)
                browser = await pw.chromium.launch(
                    executable_path=str(CHROMIUM),
                    args=[
                        "--no-sandbox",
                        "--use-fake-ui-for-media-stream",
                        "--use-fake-device-for-media-stream",
                        f"--use-file-for-fake-video-capture={camera}",
                    ],
                    env={**os.environ, "LANG": "en_GB.UTF-8"},
                )
                opened.append(browser)
                context: BrowserContext = await browser.new_context(
                    viewport={"width": 1280, "height": 860}, accept_downloads=True
                )
                await context.grant_permissions(["notifications"])
                await context.add_init_script(NOTIFICATION_SPY)
                page = await context.new_page()
                person = Person(name, page, camera)
                watch(person)
                people[name] = person
            yield people
        finally:
            for browser in opened:
                await browser.close()


def watch(person: Person) -> None:
    """Record every dialog (an alert would mean injected script ran), error and answer."""

    async def dialog(shown: Dialog) -> None:
        person.dialogs.append(f"{shown.type}: {shown.message}")
        if shown.type == "confirm":
            await shown.accept()
        else:
            await shown.dismiss()

    def error(exc: Error) -> None:
        person.errors.append(str(exc))

    def response(answer: Response) -> None:
        person.responses.append(answer)

    person.page.on("dialog", dialog)
    person.page.on("pageerror", error)
    person.page.on("response", response)


async def axe_problems(page: Page) -> list[str]:
    """axe-core's serious and critical violations on the page as it is now."""
    from axe_playwright_python.async_playwright import Axe

    results = await Axe().run(page)
    found = results.response["violations"]
    return [
        f"{v['id']} ({v['impact']}): {v['help']} — {[n['target'] for n in v['nodes']][:3]}"
        for v in found
        if v.get("impact") in ("serious", "critical")
    ]


async def shot(page: Page, folder: Path, name: str) -> None:
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    await page.screenshot(path=str(folder / f"{name}.png"), full_page=False)
