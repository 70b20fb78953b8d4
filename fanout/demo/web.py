"""The demo's HTTP side: the page, the SDK's browser build, and dev tokens.

Routes:
  GET /                      the page (static/index.html)
  GET /static/...            its script and style
  GET /sdk/fanout.browser.js the JavaScript SDK's browser build
  GET /config.json           where the page connects: {ws_url, room, user}
  GET /token?user=NAME       a development token for NAME (a random user
                             without it): {token, user, expires_ms}
  POST /gift                 the gift service (:mod:`.gifts`): the caller's
                             gift to the room, a receipt to the caller's
                             channel. Body {gift, count, room}; the caller
                             is the user of the token in its
                             ``Authorization: Bearer`` header. Answers
                             {room, seq, receipt_seq}, errors as
                             {error: {code, message}}.

/token signs with the node's secret, so it answers only requests from a
loopback address unless the demo was started with ``open_tokens``; /gift
takes the same rule, as it acts for whoever holds such a token. The token
travels in a header, not a cookie or the URL: another site's page cannot
send it (a cross-origin request with it needs a preflight nothing here
answers), and it stays out of access logs.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from ..protocol.errors import ReasonError
from ..protocol.auth import AuthError, mint, verify
from ..server.admin import REASON_STATUS
from . import gifts

STATIC = Path(__file__).with_name("static")
#: Where a source checkout keeps the SDK's browser build.
SDK_IN_CHECKOUT = Path("clients", "js", "dist", "fanout.browser.js")
#: The SDK's browser build in a source checkout (clients/js beside fanout/).
DEFAULT_SDK = Path(__file__).resolve().parents[2] / SDK_IN_CHECKOUT


def default_sdk(cwd: Path | None = None) -> Path:
    """The SDK's browser build: beside the package in a checkout (an editable
    install, `make run`), else in the checkout the demo is started from (a
    plain `pip install .` copies the package away from clients/)."""
    here = (cwd or Path.cwd()) / SDK_IN_CHECKOUT
    return DEFAULT_SDK if DEFAULT_SDK.is_file() or not here.is_file() else here


TOKEN_TTL_S = 3600.0
MAX_USER_BYTES = 64
#: A gift request is a few dozen bytes of JSON.
MAX_GIFT_BODY = 1024


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
    node: Any = None             # the embedded fanout Node, for the gift service

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


def caller_allowed(site: DemoSite, remote: str | None) -> bool:
    """Whether /token and /gift answer a client at ``remote``."""
    return site.open_tokens or _is_loopback(remote)


def _error(status: int, code: str, message: str) -> web.Response:
    """A JSON error like the admin API's, which the page shows as it is."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status,
                             headers=_NO_STORE)


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
        if not caller_allowed(site, request.remote):
            raise web.HTTPForbidden(text="demo tokens are handed out on loopback only")
        ready()
        user = request.query.get("user", "").strip() or site.new_user()
        if len(user.encode()) > MAX_USER_BYTES:
            raise web.HTTPBadRequest(text=f"user: at most {MAX_USER_BYTES} bytes")
        tok, expires_ms = site.token(user)
        return web.json_response({"token": tok, "user": user, "expires_ms": expires_ms},
                                 headers=_NO_STORE)

    async def gift(request: web.Request) -> web.Response:
        if not caller_allowed(site, request.remote):
            return _error(403, "FORBIDDEN", "the demo's gift service answers on loopback only")
        if not site.secret or site.node is None:
            return _error(503, "UNAVAILABLE", "the node is starting")
        scheme, _, tok = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not tok.strip():
            return _error(401, "AUTH_MISSING", "send the page's token: Authorization: Bearer TOKEN")
        try:
            claims = verify(tok.strip(), site.secret, issuer=site.issuer, audience=site.audience)
        except AuthError as exc:
            return _error(401, exc.reason_name, exc.message)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "PAYLOAD_TOO_LARGE",
                          f"a gift request is at most {MAX_GIFT_BODY} bytes")
        try:
            body = json.loads(raw)
        except ValueError as exc:           # JSON's, and a body that is no text
            return _error(400, "BAD_REQUEST", f"the body is not JSON: {exc}")
        try:
            wanted = gifts.parse(body, site.room)
        except gifts.GiftError as exc:
            return _error(400, "BAD_REQUEST", str(exc))
        if not claims.may_join(wanted.room):
            return _error(403, "ROOM_FORBIDDEN", "the token does not allow this room")
        try:
            reply = await gifts.send(site.node, claims.user, wanted)
        except ReasonError as exc:
            return _error(REASON_STATUS.get(exc.reason, 400), exc.reason_name, exc.message)
        return web.json_response(reply, headers=_NO_STORE)

    # Only /gift reads a body.
    app = web.Application(client_max_size=MAX_GIFT_BODY)
    app.router.add_get("/", index)
    app.router.add_get("/sdk/fanout.browser.js", sdk)
    app.router.add_get("/config.json", config)
    app.router.add_get("/token", token)
    app.router.add_post("/gift", gift)
    app.router.add_static("/static/", STATIC)
    return app


# The page and SDK change while one develops them; a token must never be cached.
_NO_STORE = {"Cache-Control": "no-store"}
