"""The browser app the gateway serves (``bastion gateway --web``): its files and its sign-in.

The app is plain HTML, CSS and JavaScript modules shipped in this package
(``web/``), with no build step and no request to any other origin; its one
third-party file, the QR decoder, is pinned in ``web/package-lock.json`` at the
top of the repository (see ``tools/vendor_web.py``). The page holds no keys: it
is a front end of the gateway like the others, speaking JSON-RPC over the
WebSocket.

Signing the browser in: the gateway prints one link whose fragment carries the
door's token (``http://127.0.0.1:PORT/#token=...``). A fragment is never sent
in a request, so the token reaches no log or Referer; the page posts it once to
``/session`` and gets a session cookie (``HttpOnly``, ``SameSite=Strict``, the
``__Host-`` form under TLS), then removes the fragment from the address bar. A
request that rides on the cookie must come from the door's own origin (its
``Origin`` header), so another page can neither use nor obtain it.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources

COOKIE = "bastion_session"
SECURE_COOKIE = "__Host-bastion_session"  # the browser keeps it to this origin, HTTPS only
MAX_SESSIONS = 64  # browser sign-ins kept at once; the oldest goes first
# No inline script or style, no eval, nothing from another origin; the camera only for
# scanning a QR code (media from the camera's own stream), images from this door or
# made in the page (the QR codes it is sent).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' blob: mediastream:; connect-src 'self'; font-src 'self'; "
    "manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
WEB_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(self), microphone=(), geolocation=(), payment=(), usb=()",
}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".LICENSE": "text/plain; charset=utf-8",
}


@dataclass(frozen=True, slots=True)
class Asset:
    """One file of the app, read once when the door starts."""

    body: bytes
    content_type: str


def load_assets() -> dict[str, Asset]:
    """The app's files by URL path (``/`` is ``index.html``)."""
    root = resources.files("bastion.gateway").joinpath("web")
    out: dict[str, Asset] = {}

    def walk(folder: resources.abc.Traversable, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
                continue
            suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
            kind = CONTENT_TYPES.get(suffix)
            if kind is not None:
                out[f"{prefix}{entry.name}"] = Asset(entry.read_bytes(), kind)

    walk(root, "/")
    if "/index.html" not in out:
        raise RuntimeError("the browser app's files are missing from the package")
    out["/"] = out["/index.html"]
    return out


@dataclass(slots=True)
class WebSessions:
    """The browser sign-ins of this gateway run (they end when the gateway stops)."""

    _ids: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def open(self) -> str:
        """A new session id for a browser that showed the token."""
        sid = secrets.token_urlsafe(32)
        self._ids[sid] = None
        while len(self._ids) > MAX_SESSIONS:
            self._ids.popitem(last=False)
        return sid

    def valid(self, sid: str | None) -> bool:
        return sid is not None and any(secrets.compare_digest(sid, known) for known in self._ids)
