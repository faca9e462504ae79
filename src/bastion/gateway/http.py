"""The HTTP and WebSocket door: JSON-RPC 2.0 for local programs and browser apps.

``POST /rpc`` takes one request (or a batch) as ``application/json`` and
answers it; ``GET /ws`` is a WebSocket where each text frame is one request
(or batch) and, after ``subscribe``, live events arrive as ``event``
notifications between the answers.

A TCP port, unlike the Unix socket, is open to every program on the machine
and to every web page its browsers show, so each request passes these checks,
in this order, before any method runs (each refusal is a JSON-RPC error body
with one sentence):

- ``Host`` must name the door itself (``127.0.0.1:PORT``, ``localhost:PORT``,
  ``[::1]:PORT``, or the configured address off the loopback), else 421: a page
  on ``evil.example`` whose name was rebound to 127.0.0.1 (DNS rebinding) sends
  ``Host: evil.example``.
- ``Origin``, when a browser sends one, must be the door's own origin or one
  given with ``--http-origin``, else 403: a foreign page can open a WebSocket or
  post a form to any port (cross-site WebSocket hijacking, CSRF). CORS headers
  go to allowed origins only.
- The token (``gateway.token`` in the profile folder, 0600, new at each start)
  as ``Authorization: Bearer TOKEN``, or, for a browser's WebSocket (which cannot
  set headers), as the subprotocol ``bastion.token.TOKEN`` offered next to
  ``bastion`` (the door answers with ``bastion`` alone, so the token is not
  echoed). Never in the URL: URLs end up in logs and histories. Else 401.

Off the loopback the door serves only TLS (1.2+, the project's profile). The
access log is off: no request line, header or body is ever logged.

With ``web`` (``bastion gateway --web``) the same door also serves the browser
app (:mod:`bastion.gateway.web`): its files at ``/``, the sign-in that trades the
token for a cookie at ``/session``, and file transfers (``/upload``,
``/download/ID``). A request that rides on that cookie must carry the door's own
``Origin``; every answer carries the app's Content-Security-Policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import secrets
import shutil
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from aiohttp import WSCloseCode, WSMsgType, web

from bastion.errors import ConfigError
from bastion.gateway import paths, rpc
from bastion.gateway.hub import EventHub, Subscription
from bastion.gateway.web import COOKIE, SECURE_COOKIE, WEB_HEADERS, WebSessions, load_assets
from bastion.tlsprofile import harden

log = logging.getLogger(__name__)

SUBPROTOCOL = "bastion"
TOKEN_SUBPROTOCOL = "bastion.token."  # noqa: S105 - the prefix, not a token
HEARTBEAT_S = 30.0  # a WebSocket whose peer stops answering pings is closed after this
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
CORS_MAX_AGE_S = "600"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
BINARY_REFUSED = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": rpc.INVALID_REQUEST, "message": "send JSON-RPC in text frames"},
    }
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TRANSFER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
UPLOAD_CHUNK = 1 << 16
MAX_FILE_NAME = 255


class FileTransfers(Protocol):
    """What the browser app's file transfers need from the unlocked gateway."""

    def upload_folder(self) -> Path:
        """A private folder for a file on its way from the browser to the encrypted upload."""
        ...

    async def send(
        self, path: Path, *, to: str | None, group: str | None, transfer: str
    ) -> dict[str, Any]:
        """Encrypt, upload and offer ``path``; progress goes out as ``file_progress`` events."""
        ...

    def saved(self, offer_id: str) -> tuple[Path, str]:
        """A received file that was saved clean: where it is and its name; else MethodError."""
        ...


def plain_file_name(name: str) -> str:
    """``name`` if it is a plain file name (no folder, no control character); else ValueError."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or len(name.encode()) > MAX_FILE_NAME
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    ):
        raise ValueError("the file name must be a plain name of at most 255 bytes")
    return name


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) stays on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def check_bind(host: str, tls: tuple[Path, Path] | None) -> None:
    """Refuse an HTTP door off the loopback without TLS (the token would cross the network)."""
    if tls is None and not is_loopback(host):
        raise ConfigError(
            f"the HTTP door on {host} is reachable from other machines, so it needs TLS: "
            "give --tls-cert and --tls-key, or keep --http-host on 127.0.0.1"
        )


def normal_origin(text: str) -> str:
    """``text`` as an origin (``scheme://host[:port]``, lower case), or ConfigError."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        raise ConfigError(
            f"--http-origin {text!r} is not an origin like https://app.example"
        ) from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
        or parts.password is not None
    ):
        raise ConfigError(f"--http-origin {text!r} is not an origin like https://app.example")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def server_context(tls: tuple[Path, Path]) -> ssl.SSLContext:
    """The door's TLS context (the project's profile); raises ConfigError if it cannot load."""
    cert, key = tls
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    harden(ctx)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a valid PEM"
        raise ConfigError(
            f"the TLS certificate {cert} and key {key} cannot be used ({reason})"
        ) from None
    return ctx


def refusal(status: int, code: str, message: str) -> web.Response:
    """An HTTP refusal whose body is a JSON-RPC error saying why in one sentence."""
    body = {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": rpc.APP_ERROR, "message": message, "data": {"code": code}},
    }
    return web.json_response(body, status=status)


class WebSocketSession:
    """One front end on a WebSocket: its sends and, once subscribed, its event pump.

    Like :class:`bastion.gateway.unix.UnixSession`: a front end that falls too
    far behind gets the hub's ``overflow`` event and its WebSocket is closed.
    """

    def __init__(self, hub: EventHub, ws: web.WebSocketResponse) -> None:
        self._hub = hub
        self._ws = ws
        self._send_lock = asyncio.Lock()  # one frame at a time: answers and events interleave
        self._sub: Subscription | None = None
        self._pump: asyncio.Task[None] | None = None

    @property
    def subscribed(self) -> bool:
        return self._sub is not None

    def subscribe(self, on: bool) -> None:
        if on and self._sub is None:
            self._sub = self._hub.subscribe()
            self._pump = asyncio.create_task(self._forward(self._sub))
        elif not on and self._sub is not None:
            self._sub.close()
            self._sub = None

    async def send(self, text: str) -> None:
        async with self._send_lock:
            await self._ws.send_str(text)

    async def _forward(self, sub: Subscription) -> None:
        with contextlib.suppress(ConnectionError):
            async for event in sub:
                await self.send(rpc.notification("event", event))
            if sub.overflowed:
                await self._ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"fell behind")

    async def close(self) -> None:
        self.subscribe(False)
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await self._pump


class HttpDoor:
    """Serves the dispatcher over HTTP (``/rpc``) and WebSocket (``/ws``) on one TCP port.

    :meth:`bind` takes the port at once (so ``--http 0`` can say which one was
    chosen before the door opens); :meth:`start` begins serving on it.
    """

    def __init__(
        self,
        dispatcher: rpc.Dispatcher,
        hub: EventHub,
        token: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: tuple[Path, Path] | None = None,
        origins: Iterable[str] = (),
        web_app: bool = False,
    ) -> None:
        check_bind(host, tls)
        self._dispatcher = dispatcher
        self._hub = hub
        self._token = token
        self.host = host
        self.port = port
        self._ssl = server_context(tls) if tls is not None else None
        self._extra_origins = frozenset(normal_origin(o) for o in origins)
        self._sock: socket.socket | None = None
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()
        self._hosts: frozenset[str] = frozenset()
        self._own_origins: frozenset[str] = frozenset()
        self._assets = load_assets() if web_app else {}
        self._web_sessions = WebSessions()
        self._files: FileTransfers | None = None

    @property
    def web_app(self) -> bool:
        return bool(self._assets)

    @property
    def cookie_name(self) -> str:
        return SECURE_COOKIE if self._ssl is not None else COOKIE

    async def attach(
        self, dispatcher: rpc.Dispatcher, hub: EventHub, files: FileTransfers | None
    ) -> None:
        """Serve the unlocked gateway's methods from now on (the page was unlocked).

        Open WebSockets are closed: the app opens a new one, subscribed to the new hub.
        """
        self._dispatcher = dispatcher
        self._hub = hub
        self.serve_files(files)
        await self._close_sockets(None)

    def serve_files(self, files: FileTransfers | None) -> None:
        """The browser app's file transfers (None until the profile is open)."""
        self._files = files

    @property
    def scheme(self) -> str:
        return "https" if self._ssl is not None else "http"

    @property
    def address(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{name}:{self.port}"

    def bind(self) -> str:
        """Take the TCP port; returns the door's URL. Raises ConfigError when it cannot."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server((self.host, self.port), family=family)
        except OSError as exc:
            raise ConfigError(
                f"the HTTP door cannot listen on {self.host} port {self.port} "
                f"({exc.strerror or type(exc).__name__})"
            ) from None
        sock.setblocking(False)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        names = [*LOOPBACK_NAMES]
        if not is_loopback(self.host):
            names.append(f"[{self.host}]" if ":" in self.host else self.host.lower())
        hosts = {f"{name}:{self.port}" for name in names}
        if self.port == {"http": 80, "https": 443}[self.scheme]:
            hosts.update(names)  # clients leave the scheme's default port out of Host and Origin
        self._hosts = frozenset(hosts)
        self._own_origins = frozenset(f"{self.scheme}://{host}" for host in self._hosts)
        return self.address

    async def start(self) -> None:
        if self._sock is None:
            self.bind()
        sock = self._sock
        if sock is None:  # pragma: no cover - bind sets it or raises
            raise ConfigError("the HTTP door has no socket")
        app = web.Application(middlewares=[self._guard], client_max_size=rpc.MAX_REQUEST_BYTES)
        app.router.add_route("*", "/rpc", self._rpc)
        app.router.add_route("*", "/ws", self._websocket)
        if self._assets:
            app.router.add_route("*", "/session", self._session)
            app.router.add_route("*", "/upload", self._upload)
            app.router.add_route("*", "/download/{id}", self._download)
            app.router.add_route("*", "/{path:.*}", self._asset)
        app.on_response_prepare.append(self._headers)
        app.on_shutdown.append(self._close_sockets)
        # access_log=None: no request line is ever logged (it could carry a mistaken token).
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.SockSite(self._runner, sock, ssl_context=self._ssl, shutdown_timeout=2.0)
        await site.start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        elif self._sock is not None:
            self._sock.close()

    # --- the checks, for every request -----------------------------------------------------

    def _origin_allowed(self, origin: str) -> bool:
        return origin in self._own_origins or origin in self._extra_origins

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host", "").lower()
        if host not in self._hosts:
            return refusal(
                421,
                "wrong_host",
                f"this door answers only to {self.host}:{self.port} or localhost:{self.port} "
                "in the Host header (a different name may be a DNS rebinding attack)",
            )
        origin = request.headers.get("Origin")
        if origin is not None and not self._origin_allowed(origin.lower().rstrip("/")):
            return refusal(
                403,
                "forbidden_origin",
                "requests from this web page's origin are not allowed "
                "(allow a browser app with --http-origin)",
            )
        if request.method == "OPTIONS":
            if origin is None or request.path != "/rpc":
                return refusal(405, "method_not_allowed", "OPTIONS is only a CORS preflight")
            return web.Response(status=204)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return refusal(exc.status, "http", f"the door cannot answer this ({exc.reason})")

    async def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """Headers on every answer: no sniffing, no caching, CORS for allowed origins only."""
        response.headers.update(SECURITY_HEADERS)
        response.headers.update(WEB_HEADERS)
        origin = request.headers.get("Origin")
        if origin is not None and self._origin_allowed(origin.lower().rstrip("/")):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = "POST"
                response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
                response.headers["Access-Control-Max-Age"] = CORS_MAX_AGE_S

    def _bearer(self, request: web.Request) -> str | None:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None

    def _by_cookie(self, request: web.Request, *, origin_required: bool) -> bool:
        """Whether the browser app's cookie signs this request in, from the door's own page."""
        if not self._assets or not self._web_sessions.valid(request.cookies.get(self.cookie_name)):
            return False
        origin = request.headers.get("Origin")
        if origin is None:
            return not origin_required
        return origin.lower().rstrip("/") in self._own_origins

    def _unauthorized(self, given: str | None) -> web.Response:
        if given is None:
            message = "no token: send 'Authorization: Bearer' with the token from gateway.token"
            return refusal(401, "unauthorized", message)
        return refusal(401, "unauthorized", "wrong token: read gateway.token again")

    # --- the endpoints ---------------------------------------------------------------------

    async def _rpc(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return refusal(405, "method_not_allowed", "send JSON-RPC to /rpc with POST")
        given = self._bearer(request)
        cookie = given is None and self._by_cookie(request, origin_required=True)
        if not cookie and not paths.token_matches(given, self._token):
            return self._unauthorized(given)
        if request.content_type != "application/json" or request.charset not in (None, "utf-8"):
            return refusal(
                415, "unsupported_media_type", "the body must be application/json (UTF-8)"
            )
        length = request.content_length
        if length is not None and length > rpc.MAX_REQUEST_BYTES:
            return self._too_long()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_long()
        answer = await self._dispatcher.handle(body, rpc.BasicSession())
        if answer is None:
            return web.Response(status=204)
        return web.Response(text=answer, content_type="application/json")

    def _too_long(self) -> web.Response:
        return web.Response(status=413, text=rpc.too_long(), content_type="application/json")

    # --- the browser app -------------------------------------------------------------------

    async def _asset(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return refusal(405, "method_not_allowed", "the app's files are read with GET")
        asset = self._assets.get(request.path)
        if asset is None:
            return refusal(404, "not_found", "there is no such page")
        kind, _, charset = asset.content_type.partition("; charset=")
        return web.Response(body=asset.body, content_type=kind, charset=charset or None)

    async def _session(self, request: web.Request) -> web.StreamResponse:
        """Trade the token from the link's fragment for a session cookie."""
        if request.method != "POST":
            return refusal(405, "method_not_allowed", "sign in with POST")
        origin = request.headers.get("Origin", "").lower().rstrip("/")
        if origin not in self._own_origins:
            return refusal(403, "forbidden_origin", "sign in from the gateway's own page")
        try:
            body = await request.json()
        except ValueError:
            body = None
        given = body.get("token") if isinstance(body, dict) else None
        if not isinstance(given, str) or not paths.token_matches(given, self._token):
            return refusal(
                401,
                "unauthorized",
                "this link is no longer valid: open the link the gateway printed when it started",
            )
        response = web.Response(status=204)
        response.set_cookie(
            self.cookie_name,
            self._web_sessions.open(),
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self._ssl is not None,
        )
        return response

    def _files_or_refusal(self, request: web.Request, method: str) -> FileTransfers | web.Response:
        if request.method != method:
            return refusal(405, "method_not_allowed", f"use {method} here")
        given = self._bearer(request)
        cookie = given is None and self._by_cookie(request, origin_required=method != "GET")
        if not cookie and not paths.token_matches(given, self._token):
            return self._unauthorized(given)
        if self._files is None:
            return refusal(409, "locked", "unlock the profile first")
        return self._files

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        """A file from the browser, streamed to a private folder, then encrypted and offered.

        ``?name=NAME&to=USER`` (or ``&group=GROUP``) and ``&transfer=ID``, the id the
        ``file_progress`` events carry. The plain copy is removed once it is sent or not.
        """
        files = self._files_or_refusal(request, "POST")
        if isinstance(files, web.Response):
            return files
        query = request.query
        transfer = query.get("transfer", "")
        to, group = query.get("to"), query.get("group")
        try:
            name = plain_file_name(query.get("name", ""))
            if not TRANSFER_ID.fullmatch(transfer):
                raise ValueError("transfer must be 1 to 64 letters, digits, - or _")
            if (to is None) == (group is None):
                raise ValueError("say who gets the file: either to (a user) or group")
        except ValueError as exc:
            return refusal(400, "invalid", str(exc))
        folder = files.upload_folder() / secrets.token_hex(8)
        folder.mkdir(mode=0o700)
        path = folder / name
        try:
            with path.open("xb") as out:
                while chunk := await request.content.read(UPLOAD_CHUNK):
                    out.write(chunk)
            try:
                answer = await files.send(path, to=to, group=group, transfer=transfer)
            except Exception as exc:  # answered as a JSON-RPC error is
                failure = rpc.failure_of(exc, "upload")
                status = 500 if failure["code"] == rpc.INTERNAL_ERROR else 400
                return web.json_response({"error": failure}, status=status)
            return web.json_response(answer)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    async def _download(self, request: web.Request) -> web.StreamResponse:
        """A received file that was scanned clean and saved, as a download (never shown)."""
        files = self._files_or_refusal(request, "GET")
        if isinstance(files, web.Response):
            return files
        try:
            path, name = files.saved(request.match_info["id"])
        except Exception as exc:  # answered as a JSON-RPC error is
            failure = rpc.failure_of(exc, "download")
            return web.json_response({"error": failure}, status=404)
        return web.FileResponse(
            path,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name, safe='')}",
            },
        )

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if request.method != "GET":
            return refusal(405, "method_not_allowed", "open the WebSocket with GET")
        offered = [
            p.strip()
            for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        ]
        in_protocol = [
            p[len(TOKEN_SUBPROTOCOL) :] for p in offered if p.startswith(TOKEN_SUBPROTOCOL)
        ]
        given = self._bearer(request) or (in_protocol[0] if in_protocol else None)
        cookie = given is None and self._by_cookie(request, origin_required=True)
        if not cookie and not paths.token_matches(given, self._token):
            return self._unauthorized(given)
        if in_protocol and SUBPROTOCOL not in offered:
            return refusal(
                400,
                "subprotocol",
                f"offer the {SUBPROTOCOL!r} subprotocol next to the token one",
            )
        ws = web.WebSocketResponse(
            protocols=(SUBPROTOCOL,),
            heartbeat=HEARTBEAT_S,
            max_msg_size=rpc.MAX_REQUEST_BYTES,
            compress=False,  # compressed secrets next to attacker text leak their length
        )
        if not ws.can_prepare(request).ok:
            return refusal(400, "not_websocket", "/ws is a WebSocket: send an upgrade request")
        await ws.prepare(request)
        self._sockets.add(ws)
        session = WebSocketSession(self._hub, ws)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    answer = await self._dispatcher.handle(msg.data, session)
                    if answer is not None:
                        await session.send(answer)
                elif msg.type == WSMsgType.BINARY:
                    await session.send(BINARY_REFUSED)
        except ConnectionError:
            pass
        finally:
            await session.close()
            self._sockets.discard(ws)
        return ws

    async def _close_sockets(self, app: web.Application | None) -> None:
        reason = b"gateway stopping" if app is not None else b"profile unlocked"
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=reason)
