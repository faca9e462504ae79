"""What a handler is given: the connection a frame came from, and the server's services.

A handler is ``handler(request, services, frame)``. ``request`` is the
connection as far as a handler may touch it (:class:`Request`); ``services``
holds everything else it uses, built once by :mod:`bastion.server.app`
(:class:`Services`). Handlers never import :mod:`bastion.server.net`: the
connection implements :class:`Request`, and the router (:func:`build_router`)
maps each frame type to exactly one :class:`Route`.

Audit and metrics are never None: a server without an audit log or a metrics
port gets :class:`NullAudit` and :class:`NullMetrics`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from bastion.errors import BastionError
from bastion.protocol import frames
from bastion.protocol.codes import ErrorCode
from bastion.ratelimit import BackoffRules, RateLimiter
from bastion.server.cluster.local import Bus
from bastion.server.config import Limits
from bastion.server.handlers._request import Request

if TYPE_CHECKING:
    from bastion.crypto.signing import AccountIdentity
    from bastion.server.admin.watch import AdminChannel
    from bastion.server.audit.log import AuditLog
    from bastion.server.handlers._services import BlobService, ContactService, GroupService
    from bastion.server.storage import Storage

log = logging.getLogger("bastion.server")

# What the peer is told when a request failed on our side: never the error's own text,
# which may come from the database driver (schema and constraint names).
REFUSED_MESSAGE = "the server could not complete the request"  # code "refused": our state
INTERNAL_MESSAGE = "the server failed to handle the request"  # code "internal": a bug


class Clock(Protocol):
    """Where handlers read the time: wall-clock milliseconds and a monotonic clock."""

    def now_ms(self) -> int:
        """Milliseconds since the epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...


class SystemClock:
    """The real clocks."""

    @staticmethod
    def now_ms() -> int:
        """See :meth:`Clock.now_ms`."""
        return time.time_ns() // 1_000_000

    @staticmethod
    def monotonic() -> float:
        """See :meth:`Clock.monotonic`."""
        return time.monotonic()


class Audit(Protocol):
    """Security events worth keeping (the signed audit log)."""

    def event(self, event: str, **fields: object) -> None:
        """Record ``event``; never raises (a failure is logged)."""
        ...


class NullAudit:
    """No audit log: events are dropped.

    Also stands in for the log the admin watcher writes to
    (:class:`~bastion.server.admin.watch.AdminAudit`): nothing to append, flush or sign.
    """

    def event(self, event: str, **fields: object) -> None:
        """See :meth:`Audit.event`."""

    def append(self, event: str, now: float, **fields: object) -> None:
        """See ``AdminAudit.append``."""

    def flush(self) -> None:
        """See ``AdminAudit.flush``."""

    def checkpoint(self, now: float | None = None) -> None:
        """See ``AdminAudit.checkpoint``."""


class AuditTrail:
    """:class:`Audit` on an open :class:`~bastion.server.audit.log.AuditLog`."""

    def __init__(self, audit_log: AuditLog) -> None:
        self.log = audit_log

    def event(self, event: str, **fields: object) -> None:
        """Append a security event; failures are logged, never raised."""
        try:
            self.log.append(event, time.time(), **fields)
        except BastionError as exc:
            log.error("audit.failed", extra={"error": type(exc).__name__})


class Metrics(Protocol):
    """Counts and timings of the relay (no user, device, address or content in them)."""

    def observe(self, request: str, started: float) -> None:
        """A request that began at ``started`` (``time.perf_counter()``) is done."""
        ...

    def count_messages(self) -> None:
        """A message was stored for delivery."""
        ...

    def count_error(self, code: ErrorCode) -> None:
        """An error frame was sent."""
        ...

    def count_limit_hit(self, limit: str) -> None:
        """A limit refused a request."""
        ...

    def count_tls_failure(self) -> None:
        """A TLS handshake failed."""
        ...


class NullMetrics:
    """No metrics port: nothing is counted."""

    def observe(self, request: str, started: float) -> None:
        """See :meth:`Metrics.observe`."""

    def count_messages(self) -> None:
        """See :meth:`Metrics.count_messages`."""

    def count_error(self, code: ErrorCode) -> None:
        """See :meth:`Metrics.count_error`."""

    def count_limit_hit(self, limit: str) -> None:
        """See :meth:`Metrics.count_limit_hit`."""

    def count_tls_failure(self) -> None:
        """See :meth:`Metrics.count_tls_failure`."""


class LimitLog:
    """Where a limit that refused a request is told: log, metrics, and (rarely) the audit log."""

    def __init__(self, audit: Audit, metrics: Metrics, clock: Clock) -> None:
        self._audit = audit
        self._metrics = metrics
        self._clock = clock
        # One audit record per limit and key per minute: a flood must not flood the log.
        self._audits: RateLimiter[tuple[str, str]] = RateLimiter(1 / 60.0, 1)

    def hit(self, limit: str, key: str) -> None:
        """Log a limit that refused a request, and audit it at most once a minute per key."""
        log.info("limit.hit", extra={"limit": limit})
        self._metrics.count_limit_hit(limit)
        if self._audits.allow((limit, key), self._clock.monotonic()):
            self._audit.event("limit.hit", limit=limit, key=key[:200])


# A room key for a group (a Send naming the group) may pass between two of its joined
# members who are not contacts: this rule answers stored (True) or dropped (False), or
# raises ContactError (handlers/groups.room_key_may_pass).
RoomKeyRule = Callable[..., Awaitable[bool]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Services:
    """Everything handlers use besides their connection; built once by ``server/app.py``.

    The objects are shared by every connection of the node. Per-node state that
    handlers keep (rate buckets, who was told their keys run low) lives here too.
    """

    limits: Limits
    clock: Clock
    storage: Storage
    bus: Bus
    admin: AdminChannel  # policy as of the last poll, invites
    audit: Audit
    metrics: Metrics
    limit_log: LimitLog
    policy_key: AccountIdentity
    contacts: ContactService
    groups: GroupService
    blobs: BlobService
    send_exceptions: tuple[RoomKeyRule, ...]  # who may send to a non-contact, and how
    signin_backoff: BackoffRules
    message_rates: RateLimiter[tuple[str, str]]  # per device, on this node
    keys_low_notified: set[tuple[str, str]]  # told once until the device uploads


Handler = Callable[[Request, Services, Any], Any]


@dataclass(frozen=True, slots=True)
class Route:
    """Which handler answers a frame type, and whether it runs before sign-in.

    A handler is a coroutine function run in a task counted against the
    connection's requests in flight, unless ``inline``: then it is a plain
    function called at once (the message fast path: no task, no await).
    """

    frame: type[frames.Frame]
    handler: Handler
    before_signin: bool = False
    inline: bool = False


class Router:
    """Frame type to route; each type has at most one."""

    def __init__(self, routes: Iterable[Route]) -> None:
        table: dict[type[frames.Frame], Route] = {}
        for route in routes:
            if route.frame in table:
                raise ValueError(f"{route.frame.__name__} has two routes")
            table[route.frame] = route
        self.routes = table

    def get(self, frame_type: type[frames.Frame]) -> Route | None:
        """The route of ``frame_type``, or None if this server does not handle it."""
        return self.routes.get(frame_type)


def build_router(modules: Iterable[ModuleType]) -> Router:
    """The router over every module's ``ROUTES``; raises ValueError for a frame routed twice."""
    return Router(route for module in modules for route in module.ROUTES)
