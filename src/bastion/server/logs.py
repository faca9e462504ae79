"""Structured server logs: one JSON object per line, with an event name and extra fields.

Callers log an event name as the message (``log.info("signin.failed", extra={...})``)
and counts or reasons as extra fields. Fields that identify a user, device or
address are kept only in DEBUG records, whatever the caller passed, so an INFO
log can be shipped to a log service without handing it who talked when.
Message content and keys never reach a log call in the first place.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import types
from collections.abc import Callable
from typing import Any, Final

_ExcInfo = (
    tuple[type[BaseException], BaseException, types.TracebackType | None] | tuple[None, None, None]
)
_loop_log = logging.getLogger("bastion.server.net.tls")

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
    """Formats a record as ``{"time", "level", "logger", "event", ...extra fields}``.

    Always exactly one JSON object on one line: a record that cannot be formatted
    (bad arguments, a traceback the standard formatter chokes on) still gives one,
    with what could be read of it.
    """

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line for the record (identifying fields only at DEBUG)."""
        try:
            return self._format(record)
        except Exception as exc:  # a log line must never be lost to a formatter bug
            return json.dumps(
                {
                    "time": _timestamp(record),
                    "level": str(getattr(record, "levelname", "ERROR")),
                    "logger": str(getattr(record, "name", "")),
                    "event": "log.unformattable",
                    "error": type(exc).__name__,
                },
                separators=(",", ":"),
            )

    def _format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": _timestamp(record),
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
            out["exception"] = self._exception_text(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))

    def _exception_text(self, exc_info: _ExcInfo) -> str:
        """The traceback as text; just the exception's type and text when it has no usable one.

        Some transports pass ``exc_info`` whose traceback is not a traceback object
        (uvloop, aiofastnet): the standard formatter raised on it.
        """
        try:
            return self.formatException(exc_info)
        except Exception:  # see the docstring
            _, value, _ = exc_info
            if isinstance(value, type):  # the class where an exception belongs
                return value.__name__
            return f"{type(value).__name__}: {value}"


def _timestamp(record: logging.LogRecord) -> str:
    return (
        datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


# What the TLS layer reports to the loop when a peer breaks off or botches its handshake:
# a port scan, a health check, a client that gave up. It says nothing about the server.
HANDSHAKE_FAILED: Final = "SSL handshake failed"
PEER_TLS_FAILURES: Final = frozenset(
    {HANDSHAKE_FAILED, "Fatal error on SSL transport", "SSL error in data received"}
)


def handle_loop_errors(
    loop: asyncio.AbstractEventLoop, on_tls_failure: Callable[[], None] | None = None
) -> None:
    """Report errors the event loop catches as log records of the ``asyncio`` logger.

    A peer's failed or aborted TLS handshake is counted (``on_tls_failure``) and
    logged once, as one short DEBUG line, by the listener; a peer's TLS error later
    on is one short DEBUG line here; anything else goes to the loop's default
    handler, which logs it at ERROR (one JSON line with :class:`JsonFormatter`).
    """

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        # aiofastnet passes the exception's class rather than the exception at times.
        kind = exc if isinstance(exc, type) else type(exc)
        message = str(context.get("message", ""))
        if message in PEER_TLS_FAILURES and issubclass(kind, OSError | EOFError):
            # ssl.SSLError is an OSError; so are resets, aborts and handshake timeouts.
            if on_tls_failure is not None:
                on_tls_failure()
            if message != HANDSHAKE_FAILED:  # the listener logs those (bastion.server.net.proxy)
                _loop_log.debug("tls.failed", extra={"error": kind.__name__})
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
