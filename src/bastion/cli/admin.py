"""``bastion admin --data DIR ...``: operator commands on a stopped or running server.

Changes go to the server's database with an ``admin_events`` row: the SQLite
file in ``DIR``, or the PostgreSQL database of a cluster named by ``--db`` or
by the node's config file. Every running node applies them within about a
second (see :mod:`bastion.server.admin.policy`). When no running node holds the audit
log in ``DIR``, the command writes the events to it itself.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from bastion.cli._common import Subcommands
from bastion.display import escape_text
from bastion.errors import ConfigError, StorageError

EXIT_BAD_LOG = 1
_DURATION = re.compile(r"^(\d{1,9})([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION_S = 366 * 86400


def parse_duration(text: str) -> int:
    """Seconds in ``90s``, ``30m``, ``12h``, ``7d`` or a bare number of seconds.

    Raises :class:`ConfigError` for anything else, zero, or more than a year.
    """
    match = _DURATION.match(text.strip())
    if match is None:
        raise ConfigError(f"not a duration: {text!r} (use e.g. 90s, 30m, 12h, 7d)")
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
    if not 0 < seconds <= MAX_DURATION_S:
        raise ConfigError("a duration must be more than 0 and at most a year")
    return seconds


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data) if args.json else text, flush=True)


async def _audit_pending(data_dir: Path, backend: Any, cursor: Any) -> None:
    """Write new admin events to this node's audit log if no running node holds it."""
    from bastion.server.admin.watch import (  # noqa: PLC0415 - clients need not load the server
        audit_pending_events,
    )
    from bastion.server.audit.log import (  # noqa: PLC0415 - clients need not load the server
        AUDIT_DIR,
        AuditLog,
        ensure_audit_key,
    )

    try:
        log = AuditLog.open(data_dir / AUDIT_DIR, ensure_audit_key(data_dir), now=time.time())
    except StorageError:
        return  # a running node holds the log; it audits the events on its next poll
    try:
        await audit_pending_events(backend, cursor, log, now=time.time())
    finally:
        log.close(time.time())


def _database_url(args: argparse.Namespace, data_dir: Path) -> str | None:
    """``--db``, else the ``[cluster]`` db of the node's config file, else None (SQLite)."""
    from bastion.server.app import (  # noqa: PLC0415 - clients need not load the server
        server_settings,
    )

    if args.db is not None:
        return str(args.db)
    return server_settings(data_dir, Path(args.config) if args.config else None).db


def _data_dir(args: argparse.Namespace) -> Path:
    data_dir = Path(args.data)
    if not data_dir.is_dir():
        raise ConfigError(f"there is no server data folder at {data_dir}")
    return data_dir


async def _with_db(args: argparse.Namespace, work: Any) -> int:
    """Run ``work`` on the node's operator tables, then audit what it changed."""
    from bastion.server.admin.watch import (  # noqa: PLC0415 - clients need not load the server
        EventCursor,
        open_admin_backend,
    )

    data_dir = _data_dir(args)
    backend = await open_admin_backend(data_dir, _database_url(args, data_dir))
    try:
        cursor = EventCursor(data_dir)
        await cursor.start(backend)  # so this node's log gets the change made now
        result = int(await work(backend))
        await _audit_pending(data_dir, backend, cursor)
    finally:
        await backend.close()
    return result


# --- users ---------------------------------------------------------------------------------------


async def cmd_users_list(args: argparse.Namespace) -> int:
    async def work(db: Any) -> int:
        for user in await db.users():
            _emit(
                args,
                {
                    "type": "user",
                    "user": user.username,
                    "created_at": user.created_at,
                    "disabled": user.disabled,
                    "devices": user.devices,
                },
                f"{user.username}\t{'disabled' if user.disabled else 'active'}"
                f"\t{user.devices} device(s)",
            )
        return 0

    return await _with_db(args, work)


async def cmd_users_disable(args: argparse.Namespace) -> int:
    disabled = args.admin_action == "disable"

    async def work(db: Any) -> int:
        await db.set_disabled(args.user, disabled, now_ms=_now_ms())
        state = "disabled" if disabled else "enabled"
        _emit(
            args, {"type": "user", "user": args.user, "disabled": disabled}, f"{state} {args.user}"
        )
        return 0

    return await _with_db(args, work)


# --- invites and policy --------------------------------------------------------------------------


async def cmd_invites_create(args: argparse.Namespace) -> int:
    expires_s = parse_duration(args.expires)

    async def work(db: Any) -> int:
        now = _now_ms()
        code = await db.create_invite(
            uses=args.uses, expires_at_ms=now + expires_s * 1000, now_ms=now
        )
        _emit(
            args,
            {"type": "invite", "code": code, "uses": args.uses, "expires_in_s": expires_s},
            code,
        )
        return 0

    return await _with_db(args, work)


async def cmd_policy_show(args: argparse.Namespace) -> int:
    async def work(db: Any) -> int:
        policy = (await db.policy()).as_dict()
        text = "\n".join(
            f"{key}={'on' if value is True else 'off' if value is False else value}"
            for key, value in policy.items()
        )
        _emit(args, {"type": "policy", **policy}, text)
        return 0

    return await _with_db(args, work)


async def cmd_policy_set(args: argparse.Namespace) -> int:
    async def work(db: Any) -> int:
        policy = (await db.set_policy(args.setting, now_ms=_now_ms())).as_dict()
        _emit(args, {"type": "policy", **policy}, f"set {args.setting}")
        return 0

    return await _with_db(args, work)


# --- audit ---------------------------------------------------------------------------------------


def cmd_audit_show(args: argparse.Namespace) -> int:
    from bastion.server.audit.log import (  # noqa: PLC0415 - clients need not load the server
        AUDIT_DIR,
        read_records,
    )

    for record in read_records(Path(args.data) / AUDIT_DIR):
        fields = dict(record.fields)
        if args.json:
            print(
                json.dumps(
                    {
                        "seq": record.seq,
                        "time": record.time,
                        "event": record.event,
                        "fields": fields,
                        "hash": record.hash,
                    }
                ),
                flush=True,
            )
        else:
            fields.pop("signature", None)
            detail = " ".join(f"{k}={v}" for k, v in sorted(fields.items()))
            line = f"{record.seq:>6} {record.time} {record.event} {detail}".rstrip()
            print(escape_text(line), flush=True)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from bastion.server.audit.log import (  # noqa: PLC0415 - clients need not load the server
        AUDIT_DIR,
        audit_public_key,
        verify_log,
    )

    data_dir = Path(args.data)
    report = verify_log(data_dir / AUDIT_DIR, audit_public_key(data_dir))
    if args.json:
        print(
            json.dumps(
                {
                    "type": "audit_verify",
                    "ok": report.ok,
                    "records": report.records_checked,
                    "checkpoints": report.checkpoints_checked,
                    "signed_through_seq": report.signed_through_seq,
                    "signed_through_hash": report.signed_through_hash,
                    "unsigned_tail": report.unsigned_tail,
                    "first_bad_seq": report.first_bad_seq,
                    "first_bad_line": report.first_bad_line,
                    "reason": report.reason,
                }
            )
        )
    elif report.ok:
        print(
            f"audit log intact: {report.records_checked} records, signed through seq "
            f"{report.signed_through_seq} ({report.unsigned_tail} after the last checkpoint)"
        )
    else:
        print(f"audit log damaged: {report.reason}", file=sys.stderr)
    return 0 if report.ok else EXIT_BAD_LOG


# --- parser --------------------------------------------------------------------------------------


def add_commands(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Add ``bastion admin ...`` to the top-level subparsers (no profile: ``common`` is unused)."""
    del common
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="one JSON object per line")

    admin = sub.add_parser("admin", help="operate a server (stopped or running)")
    admin.add_argument("--data", required=True, help="the server's data folder")
    admin.add_argument(
        "--config", help="the node's config file (default: bastion.toml in the data folder)"
    )
    admin.add_argument(
        "--db",
        help="postgresql://... of a cluster (default: the config file's [cluster] db,"
        " else the SQLite file in the data folder)",
    )
    groups = admin.add_subparsers(dest="admin_group", required=True)

    users = groups.add_parser("users", help="list, disable or enable accounts")
    users_sub = users.add_subparsers(dest="admin_action", required=True)
    users_sub.add_parser("list", parents=[out]).set_defaults(run=cmd_users_list)
    for action in ("disable", "enable"):
        p = users_sub.add_parser(action, parents=[out], help=f"{action} an account")
        p.add_argument("user")
        p.set_defaults(run=cmd_users_disable)

    invites = groups.add_parser("invites", help="create invite codes")
    invites_sub = invites.add_subparsers(dest="admin_action", required=True)
    create = invites_sub.add_parser("create", parents=[out], help="print a new invite code")
    create.add_argument("--uses", type=int, default=1, help="registrations it allows (1)")
    create.add_argument("--expires", default="7d", help="lifetime, e.g. 12h or 7d (7d)")
    create.set_defaults(run=cmd_invites_create)

    policy = groups.add_parser("policy", help="show or change the organisation policy")
    policy_sub = policy.add_subparsers(dest="admin_action", required=True)
    policy_sub.add_parser("show", parents=[out]).set_defaults(run=cmd_policy_show)
    setter = policy_sub.add_parser(
        "set", parents=[out], help="registration=open|invite|closed, file_transfer=on|off, ..."
    )
    setter.add_argument("setting", help="KEY=VALUE")
    setter.set_defaults(run=cmd_policy_set)

    audit = groups.add_parser("audit", help="show or verify the audit log")
    audit_sub = audit.add_subparsers(dest="admin_action", required=True)
    audit_sub.add_parser("show", parents=[out]).set_defaults(sync=cmd_audit_show)
    audit_sub.add_parser("verify", parents=[out]).set_defaults(sync=cmd_audit_verify)
