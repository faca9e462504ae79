"""Structured server logs: one JSON object per line, with an event name and extra fields.

Callers log an event name as the message (``log.info("signin.failed", extra={...})``)
and counts or reasons as extra fields. Fields that identify a user, device or
address are kept only in DEBUG records, whatever the caller passed, so an INFO
log can be shipped to a log service without handing it who talked when.
Message content and keys never reach a log call in the first place.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Final

IDENTIFYING_FIELDS: Final = frozenset(
    {"user", "username", "device", "device_id", "address", "peer", "sender", "recipient"}
)

# Attributes every LogRecord has; anything else came from ``extra=``.
_STANDARD: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """Formats a record as ``{"time", "level", "logger", "event", ...extra fields}``."""

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line for the record (identifying fields only at DEBUG)."""
        out: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        debug = record.levelno <= logging.DEBUG
        for name, value in record.__dict__.items():
            if name in _STANDARD or name in out or (name in IDENTIFYING_FIELDS and not debug):
                continue
            out[name] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))
