"""The node's admin HTTP API: publish and disconnect for other services, room
stats, history and presence, drain, health and readiness probes, and
Prometheus metrics. In a cluster every node's API acts cluster-wide.

It runs on the node's own event loop, on its own port (``admin_host`` and
``admin_port``), so its handlers call the node (an :class:`AdminHost`)
directly, with no locks and no copies. ``/v1/*`` needs the node's API key. The probes
and ``/metrics`` are open, so the admin port must never be reachable from
the public internet. docs/api.md is the reference for every endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import math
import time
from typing import Any, Protocol

from aiohttp import web
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from ..logic.base import Rejected
from ..protocol import fanout_pb2 as pb
from ..protocol.auth import MAX_SUB_BYTES
from . import eager
from .config import NodeConfig
from .httpguard import ConnectionGuard, GuardedSite

log = logging.getLogger("fanout.admin")

MAX_BATCH = 1000            # messages in one publish request
MAX_BODY = 4 << 20          # request body bytes (a full batch of typical messages)
SHUTDOWN_TIMEOUT = 2.0      # seconds in-flight requests get when the server closes
KEEPALIVE_TIMEOUT = 15.0    # seconds an idle keep-alive connection (or a next request's headers) gets
DEFAULT_SENDER = "api"
MAX_PAGE = 1000             # messages or users in one history or presence answer
DEFAULT_PAGE = 100
MAX_SEQ = (1 << 64) - 1
JSON_TYPE = "application/json"
PROTOBUF_TYPE = "application/x-protobuf"
PROTOBUF_TYPES = frozenset({PROTOBUF_TYPE, "application/protobuf"})

#: HTTP status for each refusal reason a node can raise; any other reason is 400.
REASON_STATUS = {
    pb.BAD_REQUEST: 400,
    pb.MESSAGE_TOO_LARGE: 413,
    pb.ROOM_OVERLOADED: 429,
    pb.DRAINING: 503,
    pb.UNAVAILABLE: 503,
    pb.INTERNAL_ERROR: 500,
}

#: Error codes of failures that are HTTP's rather than the node's.
HTTP_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    500: "INTERNAL_ERROR",
}

_PUBLISH_FIELDS = frozenset({"room", "user", "kind", "priority", "sender", "payload",
                             "payload_b64"})
_DISCONNECT_FIELDS = frozenset({"user", "reason"})
_REVOKE_FIELDS = frozenset({"before"})
_HISTORY_PARAMS = frozenset({"limit", "since"})
_PRESENCE_PARAMS = frozenset({"limit", "after"})
_ROOMS_PARAMS = frozenset({"limit", "after"})
_MISSING = object()


class ApiError(Exception):
    """A request failed; rendered as ``{"error": {"code", "message"}}``.

    :param status: HTTP status.
    :param code: ``Reason`` name for refusals by the node, else an HTTP-ish code.
    :param reason: the ``pb.Reason`` value that protobuf responses carry.
    """

    def __init__(self, status: int, code: str, message: str, *,
                 reason: int = pb.REASON_UNSPECIFIED, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason
        self.headers = headers

    @classmethod
    def bad_request(cls, message: str) -> "ApiError":
        return cls(400, "BAD_REQUEST", message, reason=pb.BAD_REQUEST)

    @classmethod
    def from_rejected(cls, exc: Rejected) -> "ApiError":
        return cls(REASON_STATUS.get(exc.reason, 400), pb.Reason.Name(exc.reason), exc.message,
                   reason=exc.reason)

    @property
    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=self.headers)


# ---------------------------------------------------------------- request parsing

def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _field(obj: dict, name: str, kind: type, default: Any = _MISSING) -> Any:
    """``obj[name]`` if it is a ``kind`` (bools are not ints), else ApiError."""
    value = obj.get(name, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise ApiError.bad_request(f"'{name}' is required")
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = "an integer" if kind is int else "a string"
        raise ApiError.bad_request(f"'{name}' must be {expected}, got {_json_type(value)}")
    return value


def _object(value: Any, what: str, allowed: frozenset) -> dict:
    if not isinstance(value, dict):
        raise ApiError.bad_request(f"{what} must be a JSON object, got {_json_type(value)}")
    unknown = value.keys() - allowed
    if unknown:
        # Strict, so a misspelt optional field ("priorty") is an error, not a no-op.
        raise ApiError.bad_request(f"unknown field(s) {', '.join(sorted(unknown))} in {what}; "
                                   f"allowed: {', '.join(sorted(allowed))}")
    return value


#: What ``curl -d`` sends unless told otherwise: refused (the body is not a
#: form), but the answer says how to send it.
FORM_TYPE = "application/x-www-form-urlencoded"


def _unsupported(ctype: str, accepted: str) -> ApiError:
    hint = (" (curl -d sends a form: add -H 'Content-Type: application/json')"
            if ctype == FORM_TYPE else "")
    return ApiError(415, "UNSUPPORTED_MEDIA_TYPE",
                    f"Content-Type {ctype!r} is not supported here; send {accepted}{hint}")


async def _read_json(request: web.Request, accepted: str = JSON_TYPE) -> Any:
    if request.content_type != JSON_TYPE:
        raise _unsupported(request.content_type, accepted)
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ApiError.bad_request(f"body is not valid JSON: {exc}") from None


def _payload(item: dict) -> bytes:
    text = _field(item, "payload", str, None)
    b64 = _field(item, "payload_b64", str, None)
    if (text is None) == (b64 is None):
        raise ApiError.bad_request("give exactly one of 'payload' (UTF-8 text) and "
                                   "'payload_b64' (base64 bytes)")
    if text is not None:
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:  # JSON allows lone surrogates ("\ud800"); UTF-8 does not
            raise ApiError.bad_request("'payload' is not valid Unicode text; "
                                       "send bytes as 'payload_b64'") from None
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError.bad_request("'payload_b64' is not valid base64") from None


def _query(request: web.Request, allowed: frozenset) -> dict[str, str]:
    """The query string as a dict; unknown or repeated parameters are errors
    (a misspelt ``limt`` must not silently mean the default)."""
    query = request.query
    unknown = query.keys() - allowed
    if unknown:
        raise ApiError.bad_request(f"unknown query parameter(s) {', '.join(sorted(unknown))}; "
                                   f"allowed: {', '.join(sorted(allowed))}")
    params = {}
    for name in query.keys():
        values = query.getall(name)
        if len(values) > 1:
            raise ApiError.bad_request(f"query parameter '{name}' given more than once")
        params[name] = values[0]
    return params


def _int_param(params: dict[str, str], name: str, default: int | None, low: int,
               high: int) -> int | None:
    raw = params.get(name)
    if raw is None:
        return default
    # Digits only: int() would also take "+5", " 5", "5_000" and "٥".
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 20:
        raise ApiError.bad_request(f"'{name}' must be a whole number from {low} to {high}, "
                                   f"got {raw[:40]!r}")
    value = int(raw)
    if not low <= value <= high:
        raise ApiError.bad_request(f"'{name}' must be from {low} to {high}, got {value}")
    return value


def _check_batch_size(count: int) -> None:
    if count == 0:
        raise ApiError.bad_request("no messages to publish")
    if count > MAX_BATCH:
        raise ApiError.bad_request(f"{count} messages in one request; at most {MAX_BATCH}")


# ---------------------------------------------------------------- the server

class AdminHost(Protocol):
    """What the admin API asks of the node it serves."""

    ready: bool
    draining: bool
    degradation_level: int
    clustered: bool

    async def publish(self, room: str, kind: int | str, payload: bytes, *, sender: str,
                      priority: int = 0) -> int: ...

    def not_ready_because(self) -> list[str]: ...

    async def disconnect_user(self, user: str, message: str = "") -> int: ...

    async def revoke(self, user: str, before: float) -> int: ...

    async def room_info(self, room: str) -> dict: ...

    def room_list(self, after: str = "", limit: int = 100) -> dict: ...

    async def history(self, room: str, since: int | None = None, limit: int = 100) -> dict: ...

    async def presence(self, room: str, after: str = "", limit: int = 100) -> dict: ...

    def start_drain(self) -> None: ...


class AdminServer:
    """The admin API of one node.

    :param node: the node it serves.
    :param config: ``admin_host``, ``admin_port`` and ``max_publish_bytes``.
    :param registry: the metrics ``/metrics`` exports.
    :param api_key: the key ``/v1/*`` requires.
    """

    def __init__(self, node: AdminHost, config: NodeConfig, registry: CollectorRegistry,
                 api_key: str) -> None:
        if not api_key:
            raise ValueError("the admin API needs a non-empty API key")
        self.node = node
        self.config = config
        self.registry = registry
        self.api_key = api_key
        # Room for one maximal payload as base64 (4/3 of its size) plus JSON.
        self.max_body = max(MAX_BODY, 2 * config.max_publish_bytes)
        app = web.Application(client_max_size=self.max_body, middlewares=[_guard])
        app[_SERVER] = self
        app.add_routes([
            web.post("/v1/publish", self.publish),
            web.post("/v1/disconnect", self.disconnect),
            web.post("/v1/users/{user}/revoke", self.revoke),
            web.get("/v1/rooms", self.rooms),
            web.get("/v1/rooms/{room}", self.room),
            web.get("/v1/rooms/{room}/history", self.history),
            web.get("/v1/rooms/{room}/presence", self.presence),
            web.post("/v1/drain", self.drain),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/metrics", self.metrics),
        ])
        # No access log: Prometheus and the orchestrator's probes would fill
        # the node's log; the middleware logs failures instead.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT,
                                     keepalive_timeout=KEEPALIVE_TIMEOUT)
        self.guard = ConnectionGuard(max_connections=config.admin_max_connections,
                                     header_timeout=config.admin_header_timeout_ms / 1000)

    async def start(self) -> None:
        """Bind ``admin_host``:``admin_port`` and start serving.

        :raises OSError: the address cannot be bound (the message names it).
        """
        host, port = self.config.admin_host, self.config.admin_port
        await self._runner.setup()
        try:
            await GuardedSite(self._runner, host, port, guard=self.guard).start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(exc.errno, f"admin API cannot listen on {host}:{port}: "
                                     f"{exc.strerror or exc}") from exc
        log.info("admin API listening on %s:%d", *self.address)

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` actually bound; the port is real even for ``admin_port`` 0."""
        host, port = self._runner.addresses[0][:2]
        return host, port

    async def close(self) -> None:
        """Stop listening; in-flight requests get :data:`SHUTDOWN_TIMEOUT` seconds."""
        await self._runner.cleanup()

    # ------------------------------------------------------------ /v1

    async def publish(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/publish``: one message or a batch, as JSON or protobuf."""
        if request.content_type in PROTOBUF_TYPES:
            return await self._publish_protobuf(request)
        body = await _read_json(request, f"{JSON_TYPE} or {PROTOBUF_TYPE}")
        if isinstance(body, dict) and "messages" in body:
            _object(body, "a batch", frozenset({"messages"}))
            items = body["messages"]
            if not isinstance(items, list):
                raise ApiError.bad_request(f"'messages' must be an array, got {_json_type(items)}")
            _check_batch_size(len(items))
            return web.json_response({"results": await _in_order(
                [self._publish_item(i) for i in items])})
        return web.json_response({"seq": await self._publish_json(body)})

    async def _publish_item(self, item: Any) -> dict:
        # Batch items succeed or fail independently, in order.
        try:
            return {"seq": await self._publish_json(item)}
        except ApiError as exc:
            return exc.body

    async def _publish_json(self, item: Any) -> int:
        item = _object(item, "a message", _PUBLISH_FIELDS)
        if "room" in item and "user" in item:
            raise ApiError.bad_request("give 'room' or 'user' (a push to one user), not both")
        if "user" in item:
            target = (None, _field(item, "user", str))
        else:
            target = (_field(item, "room", str), None)
        return await self._publish(target, _field(item, "kind", str),
                                    _payload(item), _field(item, "sender", str, DEFAULT_SENDER),
                                    _field(item, "priority", int, 0))

    async def _publish_protobuf(self, request: web.Request) -> web.Response:
        req = pb.PublishRequest()
        try:
            req.ParseFromString(await request.read())
        except DecodeError:
            raise ApiError.bad_request("body is not a valid PublishRequest protobuf") from None
        _check_batch_size(len(req.messages))

        async def one(m) -> int | ApiError:
            try:
                if m.room and m.user:
                    raise ApiError.bad_request("give room or user (a push to one user), "
                                               "not both")
                return await self._publish((None, m.user) if m.user else (m.room, None),
                                           m.kind, m.payload,
                                           m.sender or DEFAULT_SENDER, m.priority)
            except ApiError as exc:
                return exc
        response = pb.PublishResponse()
        status = 200
        for outcome in await _in_order([one(m) for m in req.messages]):
            if isinstance(outcome, ApiError):
                response.results.add(reason=outcome.reason, message=outcome.message)
                # A one-message request is not a batch: its status tells its fate.
                if len(req.messages) == 1:
                    status = outcome.status
            else:
                response.results.add(seq=outcome)
        return web.Response(status=status, body=response.SerializeToString(),
                            content_type=PROTOBUF_TYPE)

    async def _publish(self, target: tuple[str | None, str | None], kind: int | str,
                       payload: bytes, sender: str, priority: int) -> int:
        """Publish to ``target``: (room, None), or (None, user) for a push to
        one user."""
        room, user = target
        try:
            if user is not None:
                return await self.node.push(user, kind, payload, sender=sender,
                                            priority=priority)
            return await self.node.publish(room or "", kind, payload, sender=sender,
                                           priority=priority)
        except Rejected as exc:
            raise ApiError.from_rejected(exc) from None

    async def disconnect(self, request: web.Request) -> web.Response:
        """``POST /v1/disconnect``: close every connection of a user, on this
        node and (in a cluster) on every other."""
        body = _object(await _read_json(request), "the body", _DISCONNECT_FIELDS)
        user = _field(body, "user", str)
        if not user:
            raise ApiError.bad_request("'user' must not be empty")
        message = _field(body, "reason", str, "disconnected by the operator")
        closed = await self.node.disconnect_user(user, message)
        if self.node.clustered:
            # The other nodes close theirs as the command reaches them; this
            # node cannot count those, so it does not pretend to.
            return web.json_response({"disconnected_here": closed, "cluster": True})
        return web.json_response({"disconnected": closed})

    async def revoke(self, request: web.Request) -> web.Response:
        """``POST /v1/users/{user}/revoke``: refuse the user's tokens issued
        before ``before`` (default now), and kick the live ones on this node."""
        user = request.match_info["user"]
        if len(user.encode("utf-8", "surrogateescape")) > MAX_SUB_BYTES:
            raise ApiError.bad_request(f"user longer than {MAX_SUB_BYTES} bytes")
        raw = await request.read()
        if not raw.strip():
            body = {}                            # no body: revoke up to now
        else:
            body = _object(await _read_json(request), "the body", _REVOKE_FIELDS)
        now = time.time()
        before = body.get("before", now)
        if isinstance(before, bool) or not isinstance(before, (int, float)) \
                or not math.isfinite(before):
            raise ApiError.bad_request(f"'before' must be a number (unix seconds), "
                                       f"got {_json_type(before)}")
        # A time in the future bars tokens issued until then (a timed ban),
        # within the span a revocation is kept.
        horizon = now + self.config.max_token_lifetime_s
        if not 0 <= before <= horizon:
            raise ApiError.bad_request(f"'before' must be between 0 and now + "
                                       f"max_token_lifetime_s ({horizon:.0f})")
        kicked = await self.node.revoke(user, before)
        if self.node.clustered:
            return web.json_response({"user": user, "before": before, "kicked_here": kicked,
                                      "cluster": True})
        return web.json_response({"user": user, "before": before, "kicked": kicked})

    async def rooms(self, request: web.Request) -> web.Response:
        """``GET /v1/rooms?limit=N[&after=R]``: the rooms this node holds,
        by name, a page at a time (``next`` is the cursor of the next page)."""
        params = _query(request, _ROOMS_PARAMS)
        limit = _int_param(params, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        return web.json_response(self.node.room_list(after=params.get("after", ""),
                                                     limit=limit))

    async def room(self, request: web.Request) -> web.Response:
        """``GET /v1/rooms/{room}``: the room's state on this node."""
        return web.json_response(await self.node.room_info(request.match_info["room"]))

    async def history(self, request: web.Request) -> web.Response:
        """``GET /v1/rooms/{room}/history?limit=N[&since=S]``: the last N
        messages, or the first N after seq S."""
        params = _query(request, _HISTORY_PARAMS)
        limit = _int_param(params, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        since = _int_param(params, "since", None, 0, MAX_SEQ)
        return web.json_response(await self.node.history(request.match_info["room"],
                                                         since=since, limit=limit))

    async def presence(self, request: web.Request) -> web.Response:
        """``GET /v1/rooms/{room}/presence?limit=N[&after=U]``: the online
        count across nodes and a sorted page of users after the cursor U."""
        params = _query(request, _PRESENCE_PARAMS)
        limit = _int_param(params, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        after = params.get("after", "")
        if len(after.encode("utf-8", "surrogateescape")) > MAX_SUB_BYTES:
            raise ApiError.bad_request(f"'after' longer than {MAX_SUB_BYTES} bytes")
        return web.json_response(await self.node.presence(request.match_info["room"],
                                                          after=after, limit=limit))

    async def drain(self, request: web.Request) -> web.Response:
        """``POST /v1/drain``: start a graceful drain; the process exits when done."""
        self.node.start_drain()
        return web.json_response({"draining": True}, status=202)

    # ------------------------------------------------------------ probes, metrics

    async def healthz(self, request: web.Request) -> web.Response:
        """``GET /healthz``: 200 while the process serves (liveness)."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """``GET /readyz``: 200 when the node takes new clients, else 503."""
        node = self.node
        ready = node.ready
        return web.json_response({"ready": ready, "draining": node.draining,
                                  "degradation_level": node.degradation_level,
                                  "not_ready_because": node.not_ready_because()},
                                 status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        """``GET /metrics``: Prometheus text (or OpenMetrics, if the scraper asks)."""
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.registry),
                            headers={"Content-Type": content_type})


_SERVER = web.AppKey("server", AdminServer)


def _authenticate(request: web.Request, key: str) -> None:
    given = request.headers.get("X-API-Key")
    if given is None:
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given = credentials.strip()
    if not given:
        raise ApiError(401, "UNAUTHORIZED",
                       "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                       headers={"WWW-Authenticate": "Bearer"})
    # Constant time, so response timing does not leak how much of a guess matched.
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), key.encode("utf-8")):
        raise ApiError(403, "FORBIDDEN", "wrong API key")


def _http_error(request: web.Request, exc: web.HTTPException) -> ApiError:
    """aiohttp's own refusals (routing, body size) in the API's error format."""
    headers = None
    if exc.status == 404:
        message = f"no endpoint {request.path}"
    elif isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = f"{request.method} is not allowed on {request.path}; use {allowed}"
        headers = {"Allow": allowed}
    elif exc.status == 413:
        message = (f"request body over {request.app[_SERVER].max_body} bytes; "
                   "send fewer messages per request")
    else:
        message = exc.text or exc.reason
    return ApiError(exc.status, HTTP_CODES.get(exc.status, f"HTTP_{exc.status}"), message,
                    headers=headers)


async def _in_order(coros: list) -> list:
    """Run a batch's publishes pipelined, their results in order.

    Each is started in turn and runs up to its first wait (eager.start):
    the embedded logic finishes there, one after the other, with no task; a
    cluster's sends its call to the router and waits with the others, so a
    batch costs about one round trip, not one per message. The calls leave
    in the batch's order, and a room's calls are answered in the order they
    arrive, so a room's messages keep the batch's order."""
    results: list = [None] * len(coros)
    waiting = []

    async def slot(i, coro):
        results[i] = await coro
    for i, coro in enumerate(coros):
        task = eager.start(slot(i, coro))
        if task is not None:
            waiting.append(task)
    if waiting:
        await asyncio.gather(*waiting)
    return results


@web.middleware
async def _guard(request: web.Request, handler) -> web.StreamResponse:
    """Authenticates ``/v1/*``, turns every failure into a JSON error, logs it."""
    try:
        if request.path.startswith("/v1/"):
            _authenticate(request, request.app[_SERVER].api_key)
        return await handler(request)
    except ApiError as exc:
        error = exc
    except Rejected as exc:
        error = ApiError.from_rejected(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = _http_error(request, exc)
    except Exception:
        log.exception("admin API: %s %s failed", request.method, request.path)
        return ApiError(500, "INTERNAL_ERROR", "internal error; see the node's log").response()
    # Refusals, including 503 DRAINING, are the caller's business: debug only,
    # or a misbehaving client could flood the node's log.
    log.debug("admin API: %s %s -> %d %s: %s", request.method, request.path,
              error.status, error.code, error.message)
    return error.response()
