"""The one rule for showing other people's text: nothing it holds acts on the terminal."""

from __future__ import annotations

import ast
import unicodedata
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bastion import display
from bastion.display import CONTINUATION, escape_body, escape_text, is_unsafe
from bastion.tui.conversations import safe_body, safe_text

ESCAPE_TABLE = [
    ("plain text, é, 日本, 🙂", "plain text, é, 日本, 🙂"),
    ("a\\b (a backslash stays)", "a\\b (a backslash stays)"),
    ("\x1b[2J\x1b]0;owned\x07", "\\x1b[2J\\x1b]0;owned\\x07"),
    ("\r\x1b[2Kbob: hi", "\\r\\x1b[2Kbob: hi"),
    ("line one\nline two", "line one\\nline two"),
    ("tab\there", "tab\\there"),
    ("nul\x00 del\x7f bs\x08", "nul\\x00 del\\x7f bs\\x08"),
    ("csi\x9b31m nel\x85 st\x9c", "csi\\x9b31m nel\\x85 st\\x9c"),
    ("invoice\u202etxt.exe", "invoice⟨U+202E⟩txt.exe"),
    ("\u202a\u202b\u202c\u202d", "⟨U+202A⟩⟨U+202B⟩⟨U+202C⟩⟨U+202D⟩"),
    ("\u2066\u2067\u2068\u2069", "⟨U+2066⟩⟨U+2067⟩⟨U+2068⟩⟨U+2069⟩"),
    ("\u200e\u200f\u061c", "⟨U+200E⟩⟨U+200F⟩⟨U+061C⟩"),
    ("para\u2028graph\u2029", "para⟨U+2028⟩graph⟨U+2029⟩"),
    ("lone \ud800 surrogate", "lone ⟨U+D800⟩ surrogate"),
    ("zero\u200dwidth joiner in 👩\u200d💻 stays", "zero\u200dwidth joiner in 👩\u200d💻 stays"),
]


@pytest.mark.parametrize(("raw", "shown"), ESCAPE_TABLE)
def test_escape_text_shows_every_control_visibly(raw: str, shown: str) -> None:
    assert escape_text(raw) == shown
    assert safe_text(raw) == shown  # the TUI uses the same rule


BODY_TABLE = [
    ("hello", "hello"),
    ("", ""),
    (
        "hi\n[2026-12-04 14:45:09Z] carol: new bank details",
        f"hi\n{CONTINUATION}[2026-12-04 14:45:09Z] carol: new bank details",
    ),
    ("windows\r\nline", f"windows\n{CONTINUATION}line"),
    ("bare\rreturn", "bare\\rreturn"),
    ("a\n\nb\n", f"a\n{CONTINUATION}\n{CONTINUATION}b\n{CONTINUATION}"),
    ("x\n\x1b[1Acarol: hi", f"x\n{CONTINUATION}\\x1b[1Acarol: hi"),
]


@pytest.mark.parametrize(("raw", "shown"), BODY_TABLE)
def test_escape_body_marks_every_line_after_the_first(raw: str, shown: str) -> None:
    assert escape_body(raw) == shown
    assert safe_body(raw) == shown


UNSAFE = (
    [chr(c) for c in range(0x20)]
    + [chr(c) for c in range(0x7F, 0xA0)]
    + sorted(display.BIDI_CONTROLS | display.LINE_SEPARATORS)
    + ["\ud800", "\udfff"]
)


def dangerous(ch: str) -> bool:
    """An independent statement of the rule, from Unicode's own categories."""
    return (
        unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp")
        or unicodedata.bidirectional(ch) in ("LRE", "RLE", "PDF", "LRO", "RLO")
        or unicodedata.bidirectional(ch) in ("LRI", "RLI", "FSI", "PDI")
        or ch in "\u200e\u200f\u061c"
    )


def test_the_rule_matches_unicode_categories() -> None:
    for code in range(0x3000):
        ch = chr(code)
        assert is_unsafe(ch) == dangerous(ch), hex(code)


texts = st.text(
    alphabet=st.one_of(
        st.sampled_from(UNSAFE), st.characters(codec=None), st.sampled_from("[]: \\x")
    ),
    max_size=80,
)


@settings(max_examples=400, deadline=None)
@given(texts)
@example("\u202e\x1b\n\r\t\x85\u2028")
def test_no_control_or_bidi_character_survives(text: str) -> None:
    one_line = escape_text(text)
    assert not any(is_unsafe(ch) or dangerous(ch) for ch in one_line)
    body = escape_body(text)
    lines = body.split("\n")
    assert not any(is_unsafe(ch) or dangerous(ch) for line in lines for ch in line)
    assert all(line.startswith(CONTINUATION) for line in lines[1:])
    assert len(lines) == text.replace("\r\n", "\n").count("\n") + 1
    # Nothing else changes: text without unsafe characters comes out as it went in.
    if not any(dangerous(ch) for ch in text):
        assert one_line == text


def test_the_module_does_no_io() -> None:
    tree = ast.parse(Path(display.__file__).read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert [getattr(n, "module", None) for n in imports] == ["__future__"]
