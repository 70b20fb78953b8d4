"""The demo's HTTP side: the page, the SDK's browser build, and dev tokens.

Routes:
  GET /                      the page (static/index.html)
  GET /static/...            its script and style
  GET /sdk/fanout.browser.js the JavaScript SDK's browser build
  GET /config.json           where the page connects: {ws_url, room, user}
  GET /token?user=NAME       a development token for NAME (a random user
                             without it): {token, user, expires_ms}

/token signs with the node's secret, so it answers only requests from a
loopback address unless the demo was started with ``open_tokens``.
"""

from __future__ import annotations

import ipaddress
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from ..protocol.auth import mint

STATIC = Path(__file__).with_name("static")
#: The SDK's browser build in a source checkout (clients/js beside fanout/).
DEFAULT_SDK = Path(__file__).resolve().parents[2] / "clients" / "js" / "dist" / "fanout.browser.js"
TOKEN_TTL_S = 3600.0
MAX_USER_BYTES = 64


@dataclass
class DemoSite:
    """What the page is told, and how tokens are made."""
    ws_url: str
    room: str
    secret: str
    user: str = ""               # the user every page gets ("": a random one each)
    issuer: str = ""
    audience: str = ""
    open_tokens: bool = False    # /token for any client address, not only loopback
    sdk_path: Path = DEFAULT_SDK
    token_ttl_s: float = TOKEN_TTL_S

    def new_user(self) -> str:
        return self.user or f"viewer-{secrets.token_hex(3)}"

    def token(self, user: str) -> tuple[str, float]:
        claims = {k: v for k, v in (("iss", self.issuer), ("aud", self.audience)) if v}
        issued = time.time()
        return (mint(self.secret, user, ttl=self.token_ttl_s, **claims),
                (issued + self.token_ttl_s) * 1000)


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


def make_app(site: DemoSite) -> web.Application:
    async def index(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers=_NO_STORE)

    async def sdk(request: web.Request) -> web.StreamResponse:
        if not site.sdk_path.is_file():
            raise web.HTTPNotFound(text=f"the SDK's browser build is missing: {site.sdk_path} "
                                        "(build it: cd clients/js && npm ci && npm run build)")
        return web.FileResponse(site.sdk_path, headers={
            **_NO_STORE, "Content-Type": "text/javascript; charset=utf-8"})

    def ready() -> None:
        if not site.secret or not site.ws_url:
            raise web.HTTPServiceUnavailable(text="the node is starting")

    async def config(request: web.Request) -> web.Response:
        ready()
        return web.json_response({"ws_url": site.ws_url, "room": site.room,
                                  "user": site.new_user()}, headers=_NO_STORE)

    async def token(request: web.Request) -> web.Response:
        if not site.open_tokens and not _is_loopback(request.remote):
            raise web.HTTPForbidden(text="demo tokens are handed out on loopback only")
        ready()
        user = request.query.get("user", "").strip() or site.new_user()
        if len(user.encode()) > MAX_USER_BYTES:
            raise web.HTTPBadRequest(text=f"user: at most {MAX_USER_BYTES} bytes")
        tok, expires_ms = site.token(user)
        return web.json_response({"token": tok, "user": user, "expires_ms": expires_ms},
                                 headers=_NO_STORE)

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/sdk/fanout.browser.js", sdk)
    app.router.add_get("/config.json", config)
    app.router.add_get("/token", token)
    app.router.add_static("/static/", STATIC)
    return app


# The page and SDK change while one develops them; a token must never be cached.
_NO_STORE = {"Cache-Control": "no-store"}
