"""The audit log on real files: chaining, checkpoints, the head file, and tampering."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.crypto.signing import AccountIdentity
from bastion.errors import ConfigError, StateError, StorageError
from bastion.server.audit.log import (
    HEAD_NAME,
    LOG_NAME,
    AuditLog,
    AuditRefusedError,
    read_records,
    record_hash,
    verify_log,
)

T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def key() -> AccountIdentity:
    return AccountIdentity.generate()


def write_events(directory: Path, key: AccountIdentity, count: int, *, every: int = 10) -> None:
    log = AuditLog.open(directory, key, checkpoint_every=every, fsync_each_append=False)
    for i in range(count):
        log.append("signin.failed", T0 + i, device=f"dev-{i % 3}", reason="bad_signature")
    log.close(T0 + count)


def lines_of(directory: Path) -> list[bytes]:
    return (directory / LOG_NAME).read_bytes().splitlines(keepends=True)


def save_lines(directory: Path, lines: list[bytes]) -> None:
    (directory / LOG_NAME).write_bytes(b"".join(lines))


def rechain(lines: list[bytes], start: int) -> list[bytes]:
    """What an attacker without the key can do: recompute every hash from ``start`` on."""
    out = lines[:start]
    prev = json.loads(lines[start - 1])["hash"] if start else "0" * 64
    for raw in lines[start:]:
        rec: dict[str, Any] = json.loads(raw)
        rec["prev"] = prev
        if rec["event"] == "audit.checkpoint":
            rec["fields"]["covers_seq"] = rec["seq"] - 1
        rec["hash"] = record_hash(rec["seq"], rec["time"], rec["event"], rec["fields"], prev)
        prev = rec["hash"]
        out.append(json.dumps(rec, separators=(",", ":")).encode() + b"\n")
    return out


def test_appended_log_verifies_and_is_private(tmp_path: Path, key: AccountIdentity) -> None:
    write_events(tmp_path, key, 25)
    report = verify_log(tmp_path, key.public_bytes)
    # 25 events, checkpoints after 10 and 20, and one on close.
    assert report.ok, report.reason
    assert report.records_checked == 28
    assert report.checkpoints_checked == 3
    assert report.signed_through_seq == 28
    assert report.unsigned_tail == 0
    for name in (LOG_NAME, HEAD_NAME):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert (tmp_path / HEAD_NAME).read_bytes() == lines_of(tmp_path)[-1]
    first = json.loads(lines_of(tmp_path)[0])
    assert first == {
        "seq": 1,
        "time": "2023-11-14T22:13:20.000Z",
        "event": "signin.failed",
        "fields": {"device": "dev-0", "reason": "bad_signature"},
        "prev": "0" * 64,
        "hash": first["hash"],
    }
    assert [r.seq for r in read_records(tmp_path)] == list(range(1, 29))


def test_edited_field_is_named(tmp_path: Path, key: AccountIdentity) -> None:
    write_events(tmp_path, key, 25)
    lines = lines_of(tmp_path)
    lines[6] = lines[6].replace(b'"dev-0"', b'"dev-2"')
    save_lines(tmp_path, lines)
    report = verify_log(tmp_path, key.public_bytes)
    assert not report.ok
    assert (report.first_bad_line, report.first_bad_seq) == (7, 7)
    assert "edited" in report.reason


def test_edit_with_recomputed_hashes_breaks_the_next_checkpoint(
    tmp_path: Path, key: AccountIdentity
) -> None:
    write_events(tmp_path, key, 25)
    lines = lines_of(tmp_path)
    lines[6] = lines[6].replace(b'"dev-0"', b'"dev-2"')
    save_lines(tmp_path, rechain(lines, 6))
    report = verify_log(tmp_path, key.public_bytes)
    assert not report.ok
    assert report.first_bad_seq == 11  # the checkpoint covering seq 1..10
    assert "signature" in report.reason


def test_deleted_record_is_detected(tmp_path: Path, key: AccountIdentity) -> None:
    write_events(tmp_path, key, 25)
    lines = lines_of(tmp_path)
    del lines[4]
    save_lines(tmp_path, lines)
    report = verify_log(tmp_path, key.public_bytes)
    assert not report.ok
    assert (report.first_bad_line, report.first_bad_seq) == (5, 6)


def test_deleted_and_renumbered_record_is_detected(tmp_path: Path, key: AccountIdentity) -> None:
    write_events(tmp_path, key, 25)
    lines = [json.loads(line) for line in lines_of(tmp_path)]
    del lines[4]
    for rec in lines[4:]:
        rec["seq"] -= 1
    encoded = [json.dumps(rec, separators=(",", ":")).encode() + b"\n" for rec in lines]
    save_lines(tmp_path, rechain(encoded, 4))
    assert not verify_log(tmp_path, key.public_bytes).ok


def test_swapped_records_are_detected(tmp_path: Path, key: AccountIdentity) -> None:
    write_events(tmp_path, key, 25)
    lines = lines_of(tmp_path)
    lines[2], lines[3] = lines[3], lines[2]
    save_lines(tmp_path, lines)
    report = verify_log(tmp_path, key.public_bytes)
    assert not report.ok
    assert report.first_bad_line == 3


def test_inserted_forged_record_is_detected(tmp_path: Path, key: AccountIdentity) -> None:
    write_events(tmp_path, key, 25)
    lines = lines_of(tmp_path)
    forged = json.loads(lines[2])
    forged["fields"] = {"user": "mallory"}
    forged["event"] = "signin.ok"
    naive = [*lines[:3], json.dumps(forged).encode() + b"\n", *lines[3:]]
    save_lines(tmp_path, naive)
    report = verify_log(tmp_path, key.public_bytes)
    assert not report.ok
    assert report.first_bad_line == 4
    # Even renumbered and rechained, the forgery breaks the next checkpoint signature.
    records = [json.loads(line) for line in naive]
    for seq, rec in enumerate(records, start=1):
        rec["seq"] = seq
    encoded = [json.dumps(rec, separators=(",", ":")).encode() + b"\n" for rec in records]
    save_lines(tmp_path, rechain(encoded, 3))
    report = verify_log(tmp_path, key.public_bytes)
    assert not report.ok
    assert "signature" in report.reason


def test_tail_cut_after_a_checkpoint_is_detected_by_the_head(
    tmp_path: Path, key: AccountIdentity
) -> None:
    write_events(tmp_path, key, 25)
    lines = lines_of(tmp_path)
    assert json.loads(lines[21])["event"] == "audit.checkpoint"
    save_lines(tmp_path, lines[:22])  # ends neatly on the seq-22 checkpoint
    report = verify_log(tmp_path, key.public_bytes)
    assert not report.ok
    assert "cut from the end" in report.reason
    # Deleting the head as well does not hide it.
    (tmp_path / HEAD_NAME).unlink()
    report = verify_log(tmp_path, key.public_bytes)
    assert not report.ok
    assert "head file is missing" in report.reason


def test_forged_head_is_refused(tmp_path: Path, key: AccountIdentity) -> None:
    write_events(tmp_path, key, 5)
    head = json.loads((tmp_path / HEAD_NAME).read_bytes())
    head["fields"]["covers_seq"] = 99
    (tmp_path / HEAD_NAME).write_text(json.dumps(head, separators=(",", ":")) + "\n")
    report = verify_log(tmp_path, key.public_bytes)
    assert not report.ok
    assert "head" in report.reason


def test_wrong_public_key_fails(tmp_path: Path, key: AccountIdentity) -> None:
    write_events(tmp_path, key, 25)
    report = verify_log(tmp_path, AccountIdentity.generate().public_bytes)
    assert not report.ok
    assert "signature" in report.reason


def test_reopen_continues_the_chain(tmp_path: Path, key: AccountIdentity) -> None:
    write_events(tmp_path, key, 7, every=5)
    log = AuditLog.open(tmp_path, key, checkpoint_every=5)
    assert log.last_seq == 9
    record = log.append("device.added", T0 + 100, device="dev-9", by_device="dev-1")
    assert record.seq == 10
    assert record.prev == json.loads(lines_of(tmp_path)[8])["hash"]
    log.close(T0 + 101)
    report = verify_log(tmp_path, key.public_bytes)
    assert report.ok, report.reason
    assert report.records_checked == 11


def test_unsigned_tail_is_reported_and_signed_on_close(
    tmp_path: Path, key: AccountIdentity
) -> None:
    log = AuditLog.open(tmp_path, key, checkpoint_every=100)
    for i in range(3):
        log.append("limit.hit", T0 + i, limit="requests_per_second")
    report = verify_log(tmp_path, key.public_bytes)
    assert report.ok
    assert (report.signed_through_seq, report.unsigned_tail) == (0, 3)
    log.close(T0 + 5)
    with pytest.raises(StateError):
        log.append("limit.hit", T0 + 6, limit="requests_per_second")
    report = verify_log(tmp_path, key.public_bytes)
    assert (report.ok, report.signed_through_seq, report.unsigned_tail) == (True, 4, 0)


def test_rollback_of_both_files_needs_a_witness(tmp_path: Path, key: AccountIdentity) -> None:
    write_events(tmp_path, key, 5, every=100)
    old_lines, old_head = lines_of(tmp_path), (tmp_path / HEAD_NAME).read_bytes()
    write_events(tmp_path, key, 5, every=100)
    now = verify_log(tmp_path, key.public_bytes)
    witness = (now.signed_through_seq, now.signed_through_hash)
    assert witness == (12, json.loads(lines_of(tmp_path)[-1])["hash"])
    assert verify_log(tmp_path, key.public_bytes, known_checkpoint=witness).ok
    save_lines(tmp_path, old_lines)
    (tmp_path / HEAD_NAME).write_bytes(old_head)
    assert verify_log(tmp_path, key.public_bytes).ok  # undetectable without a witness
    report = verify_log(tmp_path, key.public_bytes, known_checkpoint=witness)
    assert not report.ok
    assert "known checkpoint" in report.reason
    # A witness for a record that is still there but different is caught too.
    report = verify_log(tmp_path, key.public_bytes, known_checkpoint=(3, witness[1]))
    assert not report.ok
    assert "differs" in report.reason
    with pytest.raises(ConfigError):
        verify_log(tmp_path, key.public_bytes, known_checkpoint=(3, "é" * 64))


def test_crash_mid_write_is_reported_then_recovered(tmp_path: Path, key: AccountIdentity) -> None:
    write_events(tmp_path, key, 3)
    with (tmp_path / LOG_NAME).open("ab") as handle:
        handle.write(b'{"seq":5,"time":"2023-')
    report = verify_log(tmp_path, key.public_bytes)
    assert (report.ok, report.first_bad_line) == (False, 5)
    log = AuditLog.open(tmp_path, key, now=T0 + 50)
    log.close()
    report = verify_log(tmp_path, key.public_bytes)
    assert report.ok, report.reason
    recovered = list(read_records(tmp_path))[4]
    assert (recovered.event, recovered.fields) == ("audit.recovered", {"dropped_bytes": 22})


def test_reopen_brings_a_lagging_head_up_to_date(tmp_path: Path, key: AccountIdentity) -> None:
    write_events(tmp_path, key, 3)
    old_head = (tmp_path / HEAD_NAME).read_bytes()
    write_events(tmp_path, key, 3)
    # As after a crash between logging the checkpoint and replacing the head.
    (tmp_path / HEAD_NAME).write_bytes(old_head)
    AuditLog.open(tmp_path, key).close()
    assert (tmp_path / HEAD_NAME).read_bytes() == lines_of(tmp_path)[-1]
    # A missing head is left missing, for verify to report.
    (tmp_path / HEAD_NAME).unlink()
    AuditLog.open(tmp_path, key).close()
    assert not (tmp_path / HEAD_NAME).exists()
    assert not verify_log(tmp_path, key.public_bytes).ok


def test_second_writer_is_refused(tmp_path: Path, key: AccountIdentity) -> None:
    log = AuditLog.open(tmp_path, key)
    with pytest.raises(StorageError, match="in use"):
        AuditLog.open(tmp_path, key)
    log.close(T0)


@pytest.mark.parametrize(
    ("event", "fields"),
    [
        ("message.sent", {}),
        ("audit.checkpoint", {}),
        ("signin.ok", {"body": b"hello"}),
        ("signin.ok", {"meta": {"nested": "dict"}}),
        ("signin.ok", {"items": ["a"]}),
        ("signin.ok", {"score": 1.5}),
        ("signin.ok", {"note": "x" * 257}),
        ("signin.ok", {"note": "line\nbreak"}),
        ("signin.ok", {"note": "evil\x1b[2J"}),
        ("signin.ok", {"name": "invoice\u202egpj.exe"}),
        ("signin.ok", {"count": 2**63}),
        ("signin.ok", {"Bad-Name": "x"}),
        ("signin.ok", {f"f{i}": i for i in range(17)}),
    ],
)
def test_content_like_values_are_refused(
    tmp_path: Path, key: AccountIdentity, event: str, fields: dict[str, object]
) -> None:
    log = AuditLog.open(tmp_path, key)
    log.append("registration", T0, user="alice")
    before = lines_of(tmp_path)
    with pytest.raises(AuditRefusedError):
        log.append(event, T0 + 1, **fields)
    assert lines_of(tmp_path) == before
    log.close()


def test_accepted_field_types_round_trip(tmp_path: Path, key: AccountIdentity) -> None:
    log = AuditLog.open(tmp_path, key)
    log.append("admin.action", T0, action="user.block", count=-3, forced=True, who="ß" * 256)
    log.close()
    (record, _) = read_records(tmp_path)
    assert dict(record.fields) == {
        "action": "user.block",
        "count": -3,
        "forced": True,
        "who": "ß" * 256,
    }
    assert verify_log(tmp_path, key.public_bytes).ok


def test_empty_directory_verifies_as_empty(tmp_path: Path, key: AccountIdentity) -> None:
    report = verify_log(tmp_path, key.public_bytes)
    assert (report.ok, report.records_checked) == (True, 0)
    assert list(read_records(tmp_path)) == []


def test_read_records_refuses_a_malformed_line(tmp_path: Path, key: AccountIdentity) -> None:
    write_events(tmp_path, key, 3)
    save_lines(tmp_path, [*lines_of(tmp_path), b"not json\n"])
    with pytest.raises(StorageError, match="line 5"):
        list(read_records(tmp_path))


@pytest.fixture(scope="module")
def good_log(
    tmp_path_factory: pytest.TempPathFactory, key: AccountIdentity
) -> tuple[list[bytes], bytes]:
    directory = tmp_path_factory.mktemp("good")
    write_events(directory, key, 12, every=5)
    assert verify_log(directory, key.public_bytes).ok
    return lines_of(directory), (directory / HEAD_NAME).read_bytes()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(position=st.integers(min_value=0, max_value=20), garbage=st.binary(max_size=200))
def test_verify_only_reports_garbage_never_raises(
    tmp_path: Path,
    key: AccountIdentity,
    good_log: tuple[list[bytes], bytes],
    position: int,
    garbage: bytes,
) -> None:
    lines, head = list(good_log[0]), good_log[1]
    lines.insert(min(position, len(lines)), garbage.replace(b"\n", b"") + b"\n")
    save_lines(tmp_path, lines)
    (tmp_path / HEAD_NAME).write_bytes(head)
    report = verify_log(tmp_path, key.public_bytes)
    assert not report.ok
    assert report.reason


DISK_FULL_CHILD = """
import os, resource, signal, sys
from bastion.crypto.signing import AccountIdentity
from bastion.errors import StorageError
from bastion.server.audit.log import AuditLog

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
key = AccountIdentity.generate()
print(key.public_bytes.hex(), flush=True)
log = AuditLog.open(sys.argv[1], key, checkpoint_every=1000)
log.append("registration", 1.0e9, user="alice")
limit = os.path.getsize(os.path.join(sys.argv[1], "audit.log")) + 700
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
for i in range(20):
    try:
        log.append("admin.action", 1.0e9 + i, note="x" * 200)
    except StorageError:
        print("refused", flush=True)
        break
"""


def test_a_failed_write_leaves_no_half_record(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", DISK_FULL_CHILD, str(tmp_path)],
        capture_output=True,
        env=env,
        check=True,
        timeout=30,
    )
    public_hex, outcome = result.stdout.decode().split()
    assert outcome == "refused"
    assert (tmp_path / LOG_NAME).read_bytes().endswith(b"\n")
    report = verify_log(tmp_path, bytes.fromhex(public_hex))
    assert report.ok, report.reason
    assert report.records_checked >= 2
