"""Sanitising received file names: traversal, device names, bidi tricks, disguises."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.files.names import (
    extension_of,
    hides_executable,
    sanitize_filename,
)

RLO = "\u202e"

CASES = [
    ("report.pdf", "report.pdf"),
    ("../../etc/passwd", "passwd"),
    ("/etc/shadow", "shadow"),
    ("..\\..\\Windows\\System32\\evil.dll", "evil.dll"),
    ("C:\\Users\\me\\notes.txt", "notes.txt"),
    ("dir/sub/", "sub"),
    ("..", "file"),
    ("", "file"),
    ("   ", "file"),
    ("...", "file"),
    ("a\x00b.txt", "ab.txt"),
    ("line\nbreak\r.txt", "linebreak.txt"),
    ("tab\there.txt", "tabhere.txt"),
    ("bell\x07\x7f\x9b.txt", "bell.txt"),
    (f"invoice{RLO}txt.exe", "invoicetxt.exe"),
    ("CON", "_CON"),
    ("CON.txt", "_CON.txt"),
    ("con.tar.gz", "_con.tar.gz"),
    ("nul", "_nul"),
    ("LPT1.doc", "_LPT1.doc"),
    ("COM9", "_COM9"),
    ("CONSOLE.txt", "CONSOLE.txt"),
    ("trailing. . .", "trailing"),
    ("name.txt   ", "name.txt"),
    (".bashrc", "bashrc"),
    ('what?<is>:this|"*.txt', "what__is__this___.txt"),
    ("photo.jpg        .scr", "photo.jpg .scr"),
    ("caf\u0065\u0301.txt", "caf\u00e9.txt"),  # NFC
    ("zero\u200bwidth.txt", "zerowidth.txt"),
    ("family\U0001f468\u200d\U0001f469.png", "family\U0001f468\u200d\U0001f469.png"),
]


@pytest.mark.parametrize(("raw", "expected"), CASES)
def test_sanitised_name(raw: str, expected: str) -> None:
    assert sanitize_filename(raw).name == expected


@pytest.mark.parametrize(
    "raw",
    [
        f"invoice{RLO}txt.exe",
        "photo\u2066gpj.exe\u2069",
        "a\u200fb.txt",
        "a\u061cb.txt",
        "a\u202ab.txt",
    ],
)
def test_bidi_trick_is_reported(raw: str) -> None:
    result = sanitize_filename(raw)
    assert result.bidi_trick
    assert not any(ch in result.name for ch in "\u202a\u202e\u2066\u2069\u200f\u061c")


def test_plain_name_reports_nothing() -> None:
    result = sanitize_filename("holiday photo.jpg")
    assert result.name == "holiday photo.jpg"
    assert not result.changed
    assert not result.bidi_trick
    assert not result.hidden_executable


@pytest.mark.parametrize(
    ("name", "hidden"),
    [
        ("invoice.pdf.exe", True),
        ("photo.jpg .scr", True),
        ("photo.jpg      .scr", True),
        ("Report.DOCX.js", True),
        ("archive.zip.lnk", True),
        ("setup.exe", False),
        ("my.program.exe", False),
        ("invoice.pdf", False),
        ("backup.tar.gz", False),
    ],
)
def test_double_extension_hiding_an_executable(name: str, hidden: bool) -> None:
    assert hides_executable(name) is hidden
    assert sanitize_filename(name).hidden_executable is hidden


@pytest.mark.parametrize("length", [256, 300, 1000])
def test_overlong_names_are_capped_keeping_the_extension(length: int) -> None:
    result = sanitize_filename("a" * length + ".pdf")
    assert len(result.name.encode("utf-8")) <= 255
    assert result.name.endswith(".pdf")
    assert result.name.startswith("aaaa")


def test_overlong_multibyte_name_is_cut_on_a_character_boundary() -> None:
    result = sanitize_filename("\u00e9" * 300 + ".txt")
    encoded = result.name.encode("utf-8")
    assert len(encoded) <= 255
    assert result.name.endswith(".txt")
    assert set(result.name[:-4]) == {"\u00e9"}


def test_extension_of() -> None:
    assert extension_of("a.PDF") == "pdf"
    assert extension_of(".pdf") == ""
    assert extension_of("noext") == ""
    assert extension_of("a.tar.gz") == "gz"


@given(st.text(max_size=400))
def test_any_name_gives_one_safe_component(raw: str) -> None:
    result = sanitize_filename(raw)
    name = result.name
    assert name
    assert "/" not in name
    assert "\\" not in name
    assert "\x00" not in name
    assert name not in (".", "..")
    assert not name.startswith((".", " "))
    assert not name.endswith((".", " "))
    assert len(name.encode("utf-8")) <= 255
    assert all(ch.isprintable() or ch in "\u200c\u200d" for ch in name)
    assert sanitize_filename(name).name == name  # stable
