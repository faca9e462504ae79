"""The error codes: the enum, the table in docs/protocol.md §4.4 and the server agree.

Codes reach the wire from call sites spread over the server (``refuse``, ``frames_error``,
``ContactError``, a ``code`` attribute of an exception class...); an AST walk over them
finds every code they write, so a new refusal cannot ship without a row in the docs.
The server writes each code as an ``ErrorCode`` member (mypy --strict rejects a misspelled
one); the walker still reads string literals, so one slipped in is checked as well.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from bastion.protocol import frames
from bastion.protocol.codes import ErrorCode

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "bastion"
PROTOCOL_MD = ROOT / "docs" / "protocol.md"

# Where codes are written: the server, and the exception classes whose ``code`` it sends.
CODE_SOURCES = (
    *sorted((SRC / "server").rglob("*.py")),
    SRC / "errors.py",
    SRC / "groups" / "chain.py",
)

# Calls that take a code, and the position of the code among their arguments.
CODE_ARGUMENT = {
    "frames_error": 0,
    "refuse": 1,
    "_refuse_upload": 3,
    "ContactError": 0,
    "_fail": 1,
}


def table_codes(markdown: str) -> list[str]:
    """The codes in the first column of the table under "### 4.4 Error codes"."""
    section = markdown.split("### 4.4 Error codes", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE)


def _code_of(node: ast.expr) -> str | None:
    """The code an expression spells: a string literal or ``ErrorCode.MEMBER``.

    A name that is no member comes back as ``ErrorCode.NAME``, which no code equals:
    the member check then reports it rather than the walker failing on it.
    """
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "ErrorCode"
    ):
        member = ErrorCode.__members__.get(node.attr)
        return f"ErrorCode.{node.attr}" if member is None else member.value
    return None


def code_expressions(source: str) -> Iterator[ast.expr]:
    """Every expression of ``source`` in a code position (what the walker reads)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            position = CODE_ARGUMENT.get(name or "")
            if position is not None and len(node.args) > position:
                yield node.args[position]
            yield from (kw.value for kw in node.keywords if kw.arg == "code")
        elif isinstance(node, ast.AnnAssign):
            if isinstance(node.target, ast.Name) and node.target.id == "code" and node.value:
                yield node.value
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id == "code":
                    yield node.value
                elif (
                    isinstance(target, ast.Tuple)
                    and isinstance(node.value, ast.Tuple)
                    and len(target.elts) == len(node.value.elts)
                ):
                    yield from (
                        value
                        for name, value in zip(target.elts, node.value.elts, strict=True)
                        if isinstance(name, ast.Name) and name.id == "code"
                    )
                elif (
                    isinstance(target, ast.Name)
                    and target.id.endswith("REFUSAL_MESSAGES")
                    and isinstance(node.value, ast.Dict)
                ):
                    yield from (k for k in node.value.keys if k is not None)


def sent_codes(source: str) -> set[str]:
    """Every code written in a code position of ``source``."""
    found = {_code_of(node) for node in code_expressions(source)}
    return {code for code in found if code is not None}


def literal_codes(source: str) -> list[str]:
    """Codes ``source`` writes as string literals rather than ``ErrorCode`` members."""
    return sorted(
        {
            node.value
            for node in code_expressions(source)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
    )


def opaque_code_arguments(source: str) -> list[str]:
    """Code arguments the walker cannot read: neither a code nor a ``code`` passed along."""
    opaque: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        position = CODE_ARGUMENT.get(name or "")
        arguments = [kw.value for kw in node.keywords if kw.arg == "code"]
        if position is not None and len(node.args) > position:
            arguments.append(node.args[position])
        for argument in arguments:
            passed_along = (isinstance(argument, ast.Name) and argument.id == "code") or (
                isinstance(argument, ast.Attribute) and argument.attr == "code"
            )
            if _code_of(argument) is None and not passed_along:
                opaque.append(ast.unparse(argument))
    return opaque


def server_codes() -> dict[str, list[str]]:
    """Each code the server sends, and the files that write it."""
    where: dict[str, list[str]] = {}
    for path in CODE_SOURCES:
        for code in sent_codes(path.read_text()):
            where.setdefault(code, []).append(path.relative_to(ROOT).as_posix())
    return where


def not_members(where: dict[str, list[str]]) -> dict[str, list[str]]:
    """The codes of ``where`` that are no ``ErrorCode`` member, with their files."""
    members = {code.value for code in ErrorCode}
    return {code: files for code, files in where.items() if code not in members}


# --- the checkers find what they look for ------------------------------------------------------

SYNTHETIC = """
class SlotError(ProtocolError):
    code = "slot_gone"

class BaseError(Exception):
    code: ErrorCode = ErrorCode.BAD_OFFSET

REFUSAL_MESSAGES = {"policy_off": "off"}

def handler(conn, frame):
    conn.refuse(frame.req, "from_refuse", "no")
    conn.refuse(frame.req, ErrorCode.UNKNOWN_BLOB, "no")
    self._refuse(None, frames_error("from_frames_error", "no"))
    _refuse_upload(conn, frame.req, user, "from_upload", "no")
    raise ContactError("from_contact_error", "no")
    _fail(pair, "from_fail", "no")
    frames.Error(req=None, code="from_keyword", message="no")
    code, message = "from_tuple", "no"
    conn.refuse(frame.req, code, message)
    log.info("not.a.code", extra={"code": 1})
    other = "not_a_code"
"""


def test_code_walker_finds_every_kind_of_call_site() -> None:
    assert sent_codes(SYNTHETIC) == {
        "slot_gone",
        "policy_off",
        "from_refuse",
        "unknown_blob",
        "bad_offset",
        "from_frames_error",
        "from_upload",
        "from_contact_error",
        "from_fail",
        "from_keyword",
        "from_tuple",
    }


def test_code_walker_catches_a_code_that_is_no_member() -> None:
    source = (
        "conn.refuse(req, ErrorCode.UNKNOWN_BLOB, m)\n"
        "conn.refuse(req, ErrorCode.UNKNOWN_BLOBS, m)\n"
        'raise ContactError("unknown_blobs", m)\n'
    )
    where = {code: ["x.py"] for code in sent_codes(source)}
    assert not_members(where) == {
        "ErrorCode.UNKNOWN_BLOBS": ["x.py"],
        "unknown_blobs": ["x.py"],
    }
    assert literal_codes(source) == ["unknown_blobs"]


def test_code_walker_reports_what_it_cannot_read() -> None:
    source = "conn.refuse(req, code, m)\nframes_error(exc.code, m)\nconn.refuse(req, pick(), m)"
    assert opaque_code_arguments(SYNTHETIC) == []
    assert opaque_code_arguments(source) == ["pick()"]


def test_table_parser_reads_the_first_column_only() -> None:
    markdown = (
        "### 4.4 Error codes\n\n| code | meaning |\n| --- | --- |\n"
        "| `one` | see `two` |\n| `three` | x |\n\n## 5. Next\n\n| `four` | y |\n"
    )
    assert table_codes(markdown) == ["one", "three"]


# --- the rules hold ----------------------------------------------------------------------------


def test_enum_is_the_table_in_the_protocol_docs() -> None:
    documented = table_codes(PROTOCOL_MD.read_text())
    assert len(documented) == len(set(documented)), "a code is listed twice"
    assert documented == [code.value for code in ErrorCode]


def test_every_code_the_server_sends_is_a_member() -> None:
    assert not_members(server_codes()) == {}


def test_the_server_writes_codes_as_members() -> None:
    # A member is checked by mypy --strict where it is written; a literal only here.
    literals = {
        path.relative_to(ROOT).as_posix(): literal_codes(path.read_text()) for path in CODE_SOURCES
    }
    assert {k: v for k, v in literals.items() if v} == {}


def test_every_code_argument_in_the_server_is_readable() -> None:
    # Otherwise a code could reach the wire past the walker (a variable, a lookup...).
    opaque = {
        path.relative_to(ROOT).as_posix(): opaque_code_arguments(path.read_text())
        for path in CODE_SOURCES
    }
    assert {k: v for k, v in opaque.items() if v} == {}


def test_every_member_is_sent_somewhere() -> None:
    # A code nobody sends would be a row of the docs that promises nothing.
    assert {code.value for code in ErrorCode} - server_codes().keys() == set()


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_member_fits_the_wire_type(code: ErrorCode) -> None:
    # The wire keeps its open pattern (a client decodes a newer server's codes);
    # every code this server sends must pass it.
    frame = frames.Error(req=1, code=code, message="m")
    as_text = frames.Error(req=1, code=code.value, message="m")
    assert frames.encode(frame) == frames.encode(as_text)  # the same bytes on the wire
    assert frames.decode_server_frame(frames.encode(frame)) == as_text


def test_the_wire_type_still_takes_codes_it_does_not_know() -> None:
    frame = frames.Error(req=None, code="from_the_future", message="m")
    assert frames.decode_server_frame(frames.encode(frame)) == frame
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"code": "Not-A-Code"}, type=_CodeOnly)


class _CodeOnly(msgspec.Struct):
    code: frames.ErrorCode
