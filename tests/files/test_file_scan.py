"""The scan verdict on received files: each blocked class, clean files, bombs, fail-closed."""

from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.files.content_type import ContentType, sniff
from bastion.files.scan import ArchiveLimits, Verdict, VerdictKind, scan_file

# --- samples, built here ------------------------------------------------------------


def eicar() -> bytes:
    # The standard 68-byte anti-virus test string, assembled so this file does not contain it.
    first = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$"
    second = b"EICAR-STANDARD-ANTIVIRUS-" + b"TEST-FILE!$H+H*"
    data = first + second
    assert len(data) == 68
    return data


def elf() -> bytes:
    # 64-bit little-endian ELF header of an x86-64 executable, no sections.
    return b"\x7fELF\x02\x01\x01" + b"\x00" * 9 + struct.pack("<HHI", 2, 0x3E, 1) + b"\x00" * 40


def pe() -> bytes:
    dos = bytearray(b"MZ" + b"\x00" * 0x3E)
    dos[0x3C:0x40] = struct.pack("<I", 0x40)
    return bytes(dos) + b"PE\x00\x00" + struct.pack("<HH", 0x8664, 0) + b"\x00" * 200


def png() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def pdf() -> bytes:
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def ooxml(*, macros: bool) -> bytes:
    members = {
        "[Content_Types].xml": b'<?xml version="1.0"?><Types/>',
        "_rels/.rels": b"<Relationships/>",
        "word/document.xml": b"<w:document/>",
    }
    if macros:
        members["word/vbaProject.bin"] = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 100
    return make_zip(members)


def ole(*names: str) -> bytes:
    # An OLE compound file header with directory entry names as UTF-16LE.
    header = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 504
    entries = b"".join(n.encode("utf-16-le").ljust(64, b"\x00") + b"\x00" * 64 for n in names)
    return header + entries


def make_tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zeros_gzip(size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\x00" * (1024 * 1024)
    parts = [compressor.compress(block) for _ in range(size // len(block))]
    return b"".join(parts) + compressor.flush()


def zeros_zip(name: str, size: int) -> bytes:
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open(name, "w", force_zip64=True) as member,
    ):
        block = b"\x00" * (1024 * 1024)
        for _ in range(size // len(block)):
            member.write(block)
    return buffer.getvalue()


def scan(tmp_path: Path, name: str, data: bytes, mime: str | None = None, **kw: object) -> Verdict:
    path = tmp_path / "quarantined"
    path.write_bytes(data)
    return scan_file(path, name, mime, **kw)  # type: ignore[arg-type]


def assert_blocked(verdict: Verdict, *words: str) -> None:
    assert verdict.kind is VerdictKind.BLOCKED, verdict
    text = " | ".join(verdict.reasons).lower()
    for word in words:
        assert word.lower() in text, (word, verdict.reasons)


# --- blocked classes ------------------------------------------------------------------


BLOCKED = [
    ("eicar", "eicar.txt", eicar, ["EICAR"]),
    ("elf", "tool", elf, ["Linux program"]),
    ("pe", "report", pe, ["Windows program"]),
    ("pe named pdf", "report.pdf", pe, ["named .pdf but is really a Windows program"]),
    ("zip named pdf", "report.pdf", lambda: make_zip({"a.txt": b"hi"}), ["named .pdf"]),
    ("invoice.pdf.exe", "invoice.pdf.exe", pdf, ["double extension", ".exe"]),
    ("photo.jpg .scr", "photo.jpg .scr", png, ["double extension"]),
    ("rtlo name", "invoice\u202etxt.exe", lambda: b"hello", ["right-to-left"]),
    ("docx with vba", "letter.docx", lambda: ooxml(macros=True), ["VBA macros"]),
    ("docm", "letter.docm", lambda: ooxml(macros=False), [".docm"]),
    (
        "zip holding js",
        "photos.zip",
        lambda: make_zip({"photos/view.js": b"WScript.Echo(1)"}),
        [".js"],
    ),
    (
        "nested zip holding exe",
        "bundle.zip",
        lambda: make_zip({"inner.zip": make_zip({"setup.exe": pe()})}),
        ["setup.exe", "Windows program"],
    ),
    (
        "exe disguised inside a zip",
        "docs.zip",
        lambda: make_zip({"manual.txt": pe()}),
        ["named .txt but is really a Windows program"],
    ),
    (
        "tar.gz holding elf",
        "tools.tar.gz",
        lambda: make_tar_gz({"bin/tool": elf()}),
        ["Linux program"],
    ),
    ("shebang script", "notes.txt", lambda: b"#!/bin/sh\nrm -rf ~\n", ["script"]),
    ("mach-o", "app", lambda: b"\xcf\xfa\xed\xfe" + b"\x00" * 60, ["macOS program"]),
    (
        "universal mach-o",
        "app",
        lambda: b"\xca\xfe\xba\xbe\x00\x00\x00\x02" + b"\x00" * 60,
        ["macOS"],
    ),
    (
        "java class",
        "Main",
        lambda: b"\xca\xfe\xba\xbe\x00\x00\x00\x34" + b"\x00" * 60,
        ["Java class"],
    ),
    (
        "windows shortcut",
        "readme",
        lambda: bytes.fromhex("4c0000000114020000000000c000000000000046") + b"\x00" * 60,
        ["shortcut"],
    ),
    (
        "ole with vba",
        "budget.xls",
        lambda: ole("Root Entry", "_VBA_PROJECT", "dir"),
        ["VBA macros"],
    ),
    (
        "msi by content",
        "update.doc",
        lambda: ole("Root Entry") + bytes.fromhex("84100c0000000000c000000000000046"),
        ["Windows Installer"],
    ),
    (
        "jar",
        "game.zip",
        lambda: make_zip({"META-INF/MANIFEST.MF": b"x", "a/B.class": b"x"}),
        ["JAR"],
    ),
    (
        "apk",
        "app.zip",
        lambda: make_zip({"AndroidManifest.xml": b"x", "classes.dex": b"x"}),
        ["APK"],
    ),
    ("eicar inside zip", "test.zip", lambda: make_zip({"a/readme.txt": eicar()}), ["EICAR"]),
    ("zip slip", "a.zip", lambda: make_zip({"../../.bashrc": b"echo hi"}), ["escapes"]),
    ("7z", "a.7z", lambda: b"7z\xbc\xaf\x27\x1c" + b"\x00" * 40, ["cannot be checked"]),
    ("hta", "page.hta", lambda: b"<html><HTA:APPLICATION id=x></html>", [".hta", "HTA"]),
    ("pdf launch", "doc.pdf", lambda: pdf() + b"<< /S /Launch /F (cmd.exe) >>", ["launch"]),
]


@pytest.mark.parametrize(("case", "name", "build", "words"), BLOCKED, ids=[c[0] for c in BLOCKED])
def test_blocked(tmp_path: Path, case: str, name: str, build: object, words: list[str]) -> None:
    data = build()  # type: ignore[operator]
    assert_blocked(scan(tmp_path, name, data), *words)


@pytest.mark.parametrize(
    ("name", "build", "mime", "kind"),
    [
        ("paper.pdf", pdf, "application/pdf", ContentType.PDF),
        ("dot.png", png, "image/png", ContentType.PNG),
        (
            "notes.txt",
            lambda: "Hello, world. Caf\u00e9.\n".encode(),
            "text/plain",
            ContentType.TEXT,
        ),
        ("letter.docx", lambda: ooxml(macros=False), None, ContentType.OOXML),
        ("photos.zip", lambda: make_zip({"a/b.txt": b"hi", "c.png": png()}), None, ContentType.ZIP),
        ("src.tar.gz", lambda: make_tar_gz({"a/readme.md": b"# hi\n"}), None, ContentType.GZIP),
        ("empty.txt", lambda: b"", None, ContentType.EMPTY),
        (
            "film.mp4",
            lambda: b"\x00\x00\x00\x18ftypmp42" + os.urandom(100),
            None,
            ContentType.UNKNOWN,
        ),
    ],
)
def test_clean(
    tmp_path: Path, name: str, build: object, mime: str | None, kind: ContentType
) -> None:
    verdict = scan(tmp_path, name, build(), mime)  # type: ignore[operator]
    assert verdict.kind is VerdictKind.CLEAN, verdict.reasons
    assert verdict.is_clean
    assert verdict.reasons == ()
    assert verdict.content_type is kind


def test_declared_type_mismatch_is_blocked(tmp_path: Path) -> None:
    assert_blocked(scan(tmp_path, "photo", pe(), "image/png"), "image/png", "Windows program")
    assert_blocked(scan(tmp_path, "x", b"hello", "application/x-msdownload"), "runs code")


def test_every_reason_is_one_line(tmp_path: Path) -> None:
    verdict = scan(tmp_path, "a\nb.pdf.exe", make_zip({"x\ny.js": pe()}))
    assert len(verdict.reasons) >= 3
    assert all("\n" not in reason for reason in verdict.reasons)


# --- archive bombs --------------------------------------------------------------------


def test_zip_bomb_is_refused_by_ratio(tmp_path: Path) -> None:
    bomb = zeros_zip("big.txt", 40 * 1024 * 1024)
    assert len(bomb) < 200_000
    assert_blocked(scan(tmp_path, "bomb.zip", bomb), "archive bomb")


def test_gzip_bomb_is_refused_while_streaming(tmp_path: Path) -> None:
    # gzip declares no trustworthy size: the ratio is checked as bytes come out.
    assert_blocked(scan(tmp_path, "bomb.gz", zeros_gzip(40 * 1024 * 1024)), "archive bomb")


def test_total_size_limit_applies_across_members(tmp_path: Path) -> None:
    data = make_zip({f"part{i}.bin": os.urandom(50_000) for i in range(10)})
    limits = ArchiveLimits(max_total_bytes=200_000)
    assert_blocked(scan(tmp_path, "parts.zip", data, limits=limits), "unpacks to more than")
    assert scan(tmp_path, "parts.zip", data).is_clean


def test_member_count_limit(tmp_path: Path) -> None:
    data = make_zip({f"f{i}.txt": b"x" for i in range(50)})
    assert_blocked(scan(tmp_path, "many.zip", data, limits=ArchiveLimits(max_members=20)), "files")


def test_nesting_depth_limit(tmp_path: Path) -> None:
    data = b"just text"
    for level in range(3):
        data = make_zip({f"level{level}.zip" if level else "a.txt": data})
    assert scan(tmp_path, "nested.zip", data).is_clean  # three levels: allowed
    deeper = make_zip({"level3.zip": data})
    assert_blocked(scan(tmp_path, "nested.zip", deeper), "nested more than 3 deep")


def test_lying_zip_header_is_caught_while_reading(tmp_path: Path) -> None:
    real = make_zip({"a.txt": b"A" * 5000})
    # Patch the declared uncompressed size (local header and central directory) to 10.
    lying = bytearray(real)
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = lying.find(signature)
        lying[at + offset : at + offset + 4] = struct.pack("<I", 10)
    verdict = scan(tmp_path, "a.zip", bytes(lying))
    assert verdict.kind is VerdictKind.BLOCKED


def test_damaged_archive_is_blocked_not_clean(tmp_path: Path) -> None:
    broken = make_zip({"a.txt": b"hello" * 100})[:-30]
    assert_blocked(scan(tmp_path, "a.zip", broken), "damaged")
    assert_blocked(scan(tmp_path, "a.gz", gzip.compress(b"hello" * 100)[:-10]), "damaged")


# --- fail closed ----------------------------------------------------------------------


def test_missing_yara_gives_error_not_clean(tmp_path: Path) -> None:
    sample = tmp_path / "q"
    sample.write_bytes(b"plain text\n")
    program = (
        "import sys; sys.modules['yara'] = None\n"
        "from pathlib import Path\n"
        "from bastion.files.scan import scan_file\n"
        f"v = scan_file(Path({str(sample)!r}), 'notes.txt', 'text/plain')\n"
        "print(v.kind.value); print(v.reasons[0])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=env, check=True
    ).stdout.splitlines()
    assert out[0] == "error"
    assert "yara" in out[1].lower()


def test_missing_rules_give_error(tmp_path: Path) -> None:
    empty = tmp_path / "rules"
    empty.mkdir()
    verdict = scan(tmp_path, "notes.txt", b"hello\n", rules_dir=empty)
    assert verdict.kind is VerdictKind.ERROR


def test_unreachable_clamd_gives_error(tmp_path: Path) -> None:
    verdict = scan(tmp_path, "notes.txt", b"hello\n", clamd_socket=tmp_path / "no-such.sock")
    assert verdict.kind is VerdictKind.ERROR
    assert "virus scanner" in verdict.reasons[0]


def test_unreadable_file_gives_error(tmp_path: Path) -> None:
    verdict = scan_file(tmp_path / "missing", "notes.txt")
    assert verdict.kind is VerdictKind.ERROR


def test_oversize_file_is_blocked(tmp_path: Path) -> None:
    assert_blocked(scan(tmp_path, "a.txt", b"x" * 100, max_file_bytes=50), "too big")


def test_sniff_prefers_content_over_everything() -> None:
    assert sniff(b"") is ContentType.EMPTY
    assert sniff(pe()) is ContentType.PE
    assert sniff(b"junk before %PDF-1.7") is ContentType.PDF
    assert sniff(os.urandom(16) + b"\x00") is not ContentType.TEXT


# --- hostile input never escapes as an exception --------------------------------------

_ARCHIVE_PREFIXES = st.sampled_from(
    [b"", b"PK\x03\x04", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"]
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=_ARCHIVE_PREFIXES, body=st.binary(max_size=3000), name=st.text(max_size=60))
def test_arbitrary_bytes_and_names_give_a_verdict(
    tmp_path_factory: pytest.TempPathFactory, prefix: bytes, body: bytes, name: str
) -> None:
    folder = tmp_path_factory.mktemp("h")
    verdict = scan(folder, name, prefix + body)
    assert verdict.kind in VerdictKind
    if verdict.kind is not VerdictKind.CLEAN:
        assert verdict.reasons


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    members=st.dictionaries(
        st.text(
            st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]),
            min_size=1,
            max_size=30,
        ),
        st.binary(max_size=300),
        max_size=5,
    ),
    cut=st.integers(0, 400),
)
def test_damaged_zips_give_a_verdict(
    tmp_path_factory: pytest.TempPathFactory, members: dict[str, bytes], cut: int
) -> None:
    data = make_zip(members)
    damaged = data[: max(0, len(data) - cut)]
    verdict = scan(tmp_path_factory.mktemp("z"), "a.zip", damaged)
    if cut:
        assert verdict.kind is not VerdictKind.CLEAN or not damaged
