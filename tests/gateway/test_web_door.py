"""The browser app's door, attacked with a plain HTTP client: sign-in, cookie, CSP, transfers.

A real ``bastion gateway --web`` on a real server. What a hostile web page or
another local program could try: get a cookie without the token, use the cookie
from another origin or with no Origin, read the token back, upload outside the
upload folder, download a file the scan blocked.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ServerProcess
from tests.gateway.support import GatewayProcess, gateways, pair

pytestmark = pytest.mark.network

TIMEOUT = aiohttp.ClientTimeout(total=30)
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


@pytest.fixture
async def door(
    server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[dict[str, Any]]:
    monkeypatch.setenv("XDG_DOWNLOAD_DIR", str(tmp_path / "Downloads"))  # where files.get saves
    alice, bob = pair(server, tmp_path)
    alice_gw = GatewayProcess(alice, "--web")
    bob_gw = GatewayProcess(bob, "--web")
    with gateways(alice_gw, bob_gw):
        ready = alice_gw.start()
        bob_ready = bob_gw.start()
        base, _, token = ready["web"].partition("/#token=")
        yield {"base": base, "token": token, "gw": alice_gw, "bob": bob_ready["web"]}


def browser_jar() -> aiohttp.CookieJar:
    """A cookie jar that keeps cookies of 127.0.0.1, as a browser does."""
    return aiohttp.CookieJar(unsafe=True)


def csp_of(answer: aiohttp.ClientResponse) -> str:
    policy = answer.headers.get("Content-Security-Policy", "")
    assert "default-src 'none'" in policy, answer.url
    assert "script-src 'self'" in policy
    assert "unsafe" not in policy
    assert "frame-ancestors 'none'" in policy
    return policy


async def sign_in(http: aiohttp.ClientSession, base: str, token: str) -> None:
    async with http.post(
        f"{base}/session", json={"token": token}, headers={"Origin": base}
    ) as answer:
        assert answer.status == 204
        csp_of(answer)


async def rpc(
    http: aiohttp.ClientSession,
    base: str,
    method: str,
    *,
    origin: str | None,
    **params: Any,
) -> tuple[int, dict[str, Any]]:
    headers = {"Origin": origin} if origin is not None else {}
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    async with http.post(f"{base}/rpc", json=body, headers=headers) as answer:
        csp_of(answer)
        return answer.status, await answer.json()


async def test_the_link_signs_in_and_the_cookie_works_only_from_the_page(
    door: dict[str, Any],
) -> None:
    base, token = door["base"], door["token"]
    async with aiohttp.ClientSession(timeout=TIMEOUT, cookie_jar=browser_jar()) as http:
        # The app's files: served with the policy, nothing signed in by fetching them.
        for path, kind in (
            ("/", "text/html"),
            ("/app.js", "text/javascript"),
            ("/app.css", "text/css"),
            ("/vendor/jsQR.js", "text/javascript"),
        ):
            async with http.get(base + path) as answer:
                assert answer.status == 200, path
                assert answer.content_type == kind
                assert answer.headers["X-Frame-Options"] == "DENY"
                assert "Set-Cookie" not in answer.headers
                csp_of(answer)
        async with http.get(f"{base}/../../etc/passwd") as answer:
            assert answer.status == 404
            csp_of(answer)
        assert len(http.cookie_jar) == 0

        # No cookie without the token, from the page's own origin only.
        for origin, given, status in (
            ("https://evil.example", token, 403),
            (None, token, 403),
            (base, "wrong", 401),
            (base, "", 401),
        ):
            headers = {"Origin": origin} if origin else {}
            async with http.post(
                f"{base}/session", json={"token": given}, headers=headers
            ) as answer:
                assert answer.status == status, (origin, given)
                body = await answer.text()
                assert token not in body
                csp_of(answer)
        assert len(http.cookie_jar) == 0
        status, _ = await rpc(http, base, "status", origin=base)
        assert status == 401

        await sign_in(http, base, token)
        [cookie] = list(http.cookie_jar)
        assert cookie.key == "bastion_session"
        assert cookie["httponly"]
        assert cookie["samesite"] == "Strict"
        assert cookie["path"] == "/"
        assert cookie.value != token  # the cookie is its own secret, not the token

        status, reply = await rpc(http, base, "status", origin=base)
        assert status == 200
        assert reply["result"]["user"] == "alice"
        # The cookie without the page's Origin (a program, or a form another page made
        # the browser send) or from another page: refused.
        status, _ = await rpc(http, base, "status", origin=None)
        assert status == 401
        status, _ = await rpc(http, base, "status", origin="https://evil.example")
        assert status == 403

        # The WebSocket: the cookie from the page works, from elsewhere it does not.
        async with http.ws_connect(
            f"{base}/ws", protocols=("bastion",), headers={"Origin": base}
        ) as ws:
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 7, "method": "whoami"}))
            assert (await ws.receive_json(timeout=30))["result"]["user"] == "alice"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(
                f"{base}/ws", protocols=("bastion",), headers={"Origin": "https://evil.example"}
            )
        assert refused.value.status == 403

    # A session cookie dies with the gateway: a new run's page must sign in again.
    assert door["gw"].log_text().count(token) == 0


async def test_uploads_stay_in_their_folder_and_blocked_files_are_not_served(
    door: dict[str, Any], tmp_path: Path
) -> None:
    base, token = door["base"], door["token"]
    page = {"Origin": base}
    async with aiohttp.ClientSession(timeout=TIMEOUT, cookie_jar=browser_jar()) as http:
        async with http.post(f"{base}/upload?name=a.txt&to=bob&transfer=t1", data=b"x") as answer:
            assert answer.status == 401  # no cookie, no token
        await sign_in(http, base, token)
        for query, says in (
            ("name=../../escape.txt&to=bob&transfer=t1", "plain name"),
            ("name=..&to=bob&transfer=t1", "plain name"),
            ("name=a%00b&to=bob&transfer=t1", "plain name"),
            ("name=a.txt&transfer=t1", "either to"),
            ("name=a.txt&to=bob&group=x&transfer=t1", "either to"),
            ("name=a.txt&to=bob&transfer=a/b", "transfer must be"),
        ):
            async with http.post(f"{base}/upload?{query}", data=b"x", headers=page) as answer:
                assert answer.status == 400, query
                assert says in (await answer.json())["error"]["message"], query
        assert not (tmp_path / "escape.txt").exists()
        # A stranger cannot be sent a file: the refusal comes back as an error, nothing kept.
        async with http.post(
            f"{base}/upload?name=a.txt&to=nobody&transfer=t2", data=b"x", headers=page
        ) as answer:
            assert answer.status == 400
            assert (await answer.json())["error"]["data"]["code"]
        uploads = tmp_path / "alice" / "web-uploads"
        assert list(uploads.iterdir()) == []

        # A clean file and EICAR to bob; bob fetches both through quarantine.
        for name, data in (("minutes.txt", b"minutes\n"), ("eicar.com", EICAR)):
            async with http.post(
                f"{base}/upload?name={name}&to=bob&transfer=t3", data=data, headers=page
            ) as answer:
                assert answer.status == 200, await answer.text()
                assert (await answer.json())["name"] == name
        assert list(uploads.iterdir()) == []  # the plain copies are gone once sent

    # bob's page: a file is served only once it was fetched, scanned and saved clean.
    bob_base, _, bob_token = door["bob"].partition("/#token=")
    async with aiohttp.ClientSession(timeout=TIMEOUT, cookie_jar=browser_jar()) as http:
        await sign_in(http, bob_base, bob_token)
        offers: list[dict[str, Any]] = []
        for _ in range(300):
            _, listed = await rpc(http, bob_base, "files.list", origin=bob_base)
            offers = listed["result"]
            if len(offers) == 2:
                break
            await asyncio.sleep(0.1)
        by_name = {offer["name"]: offer for offer in offers}
        assert set(by_name) == {"minutes.txt", "eicar.com"}
        clean, bad = by_name["minutes.txt"]["id"], by_name["eicar.com"]["id"]
        async with http.get(f"{bob_base}/download/{clean}") as answer:
            assert answer.status == 404  # offered, not fetched: not served
            assert "not saved" in (await answer.json())["error"]["message"]
        for offer in (clean, bad):
            await rpc(http, bob_base, "files.get", origin=bob_base, id=offer)
        async with http.get(f"{bob_base}/download/{bad}") as answer:
            assert answer.status == 404  # blocked by the scan: never served
            csp_of(answer)
        async with http.get(f"{bob_base}/download/{clean}") as answer:
            assert answer.status == 200
            assert answer.content_type == "application/octet-stream"
            assert answer.headers["Content-Disposition"] == (
                "attachment; filename*=UTF-8''minutes.txt"
            )
            assert await answer.read() == b"minutes\n"
            csp_of(answer)
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as stranger,
            stranger.get(f"{bob_base}/download/{clean}") as answer,
        ):
            assert answer.status == 401  # no cookie


def test_the_app_never_parses_html_or_makes_code() -> None:
    """Peer strings stay text because the app's own code has no way to make them markup."""
    folder = Path(__file__).resolve().parents[2] / "src" / "bastion" / "gateway" / "web"
    sources = sorted(folder.glob("*.js"))
    assert {p.name for p in sources} >= {"app.js", "dom.js", "rpc.js", "scan.js"}
    for source in sources:
        text = source.read_text()
        for sink in (
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
            "DOMParser",
            "createContextualFragment",
        ):
            assert sink not in text, f"{source.name} uses {sink}"
    html = (folder / "index.html").read_text()
    assert "<script>" not in html  # no inline script: the CSP would refuse it anyway
    assert "style=" not in html
