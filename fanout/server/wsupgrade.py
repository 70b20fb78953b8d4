"""The WebSocket opening handshake (RFC 6455 section 4.2): check a browser's
upgrade request and write the 101 answer or an HTTP refusal.

The core (``pyx/core/websocket.pyx``) finds the end of the request head in C,
at most 8 KiB, and hands it over once per connection; everything after the
handshake stays in the core. The head is parsed with ``h11``, a small,
well-tested HTTP/1.1 parser, rather than a parser of our own: the handshake
runs once per connection, where a few tens of microseconds do not matter,
and a hostile client's malformed head (bad line endings, folded or duplicate
headers, bad characters) is refused by rules that many servers already rely
on.

No extension is ever accepted: ``permessage-deflate`` would need compression
state per connection and break the frame shared by every member of a room
(the frames are lz4 already).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import h11

from ..protocol import fanout_pb2 as pb

#: RFC 6455's GUID, appended to the client's key for Sec-WebSocket-Accept.
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: The subprotocol a client may offer; echoed when offered.
SUBPROTOCOL = "fanout.v1"
_STATUS_TEXT = {400: "Bad Request", 403: "Forbidden", 404: "Not Found",
                405: "Method Not Allowed", 408: "Request Timeout",
                426: "Upgrade Required", 429: "Too Many Requests",
                503: "Service Unavailable"}


@dataclass
class Refused(Exception):
    """An upgrade request the node refuses: the HTTP ``status``, a one-line
    ``message`` for the client, the ``reason`` counted in metrics and logs,
    and extra response headers."""

    status: int
    message: str
    reason: int = pb.BAD_REQUEST
    key: str = "WS_HANDSHAKE"
    headers: tuple = ()

    def response(self) -> bytes:
        return refusal(self.status, self.message, self.headers)


def refusal(status: int, message: str, headers: tuple = ()) -> bytes:
    """An HTTP/1.1 response with a one-line text body, closing the connection."""
    body = (message + "\n").encode("utf-8", "replace")
    lines = [f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Error')}",
             "Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}",
             "Connection: close", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for the client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def _tokens(value: bytes) -> list[str]:
    return [t.strip().lower() for t in value.decode("latin-1").split(",") if t.strip()]


def check(head: bytes, *, path: str, origins: frozenset[str] | None) -> bytes:
    """The 101 response for the request ``head`` (request line and headers,
    ending with an empty line), or :class:`Refused`.

    :param path: the endpoint's path; a query string is allowed.
    :param origins: allowed ``Origin`` values, or None for any. A request
        without ``Origin`` (not a browser) is always allowed: the Origin
        check protects browsers' users from other sites, and tokens, not
        cookies, authenticate.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(head) + 1)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise Refused(400, f"malformed HTTP request: {exc}") from None
    if not isinstance(event, h11.Request):
        raise Refused(400, "malformed HTTP request")
    target = event.target.decode("latin-1")
    if target.partition("?")[0] != path:
        raise Refused(404, f"no such endpoint: the WebSocket endpoint is {path}",
                      key="WS_PATH")
    if event.method != b"GET":
        raise Refused(405, "a WebSocket upgrade is a GET", headers=(("Allow", "GET"),))
    if event.http_version != b"1.1":
        raise Refused(400, "a WebSocket upgrade needs HTTP/1.1")
    headers: dict[bytes, list[bytes]] = {}
    for name, value in event.headers:
        headers.setdefault(name, []).append(value)

    def one(name: bytes) -> bytes | None:
        values = headers.get(name)
        if values is None:
            return None
        if len(values) > 1:
            raise Refused(400, f"more than one {name.decode()} header")
        return values[0]

    upgrade = b",".join(headers.get(b"upgrade", []))
    if "websocket" not in _tokens(upgrade):
        raise Refused(426, "this endpoint speaks only WebSocket: send Upgrade: websocket",
                      headers=(("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")))
    if "upgrade" not in _tokens(b",".join(headers.get(b"connection", []))):
        raise Refused(400, "Connection: Upgrade is missing")
    if one(b"sec-websocket-version") != b"13":
        raise Refused(426, "only WebSocket version 13 is spoken",
                      headers=(("Sec-WebSocket-Version", "13"),))
    key = one(b"sec-websocket-key")
    try:
        if key is None or len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        raise Refused(400, "Sec-WebSocket-Key must be 16 bytes in base64") from None
    origin = one(b"origin")
    if origin is not None and origins is not None:
        if origin.decode("latin-1").rstrip("/").lower() not in origins:
            raise Refused(403, "this Origin is not allowed (the node's ws_origins)",
                          key="WS_ORIGIN")
    protocols = b",".join(headers.get(b"sec-websocket-protocol", []))
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Accept: {accept_key(key.decode('ascii'))}"]
    if protocols:
        offered = [t.strip() for t in protocols.decode("latin-1").split(",")]
        if SUBPROTOCOL not in offered:
            raise Refused(400, f"the only subprotocol is {SUBPROTOCOL}")
        lines.append(f"Sec-WebSocket-Protocol: {SUBPROTOCOL}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")

