"""Connection handling of the admin HTTP server, so ``/healthz`` keeps
answering while someone holds slow connections open on the admin port.

* **Header timeout.** A connection that has not sent the complete headers of
  its first request ``header_timeout`` seconds after connecting is closed
  (RST). Between later requests aiohttp's ``keepalive_timeout`` applies: an
  idle keep-alive connection, or one whose next request's headers are still
  incomplete, is closed at its end.
* **Connection cap.** At ``max_connections`` open, a new connection closes the
  oldest one (RST) instead of being refused: a slowloris that fills the cap
  then costs a probe nothing, where refusing would lock the probe out until
  the slow connections time out.

aiohttp has knobs for neither, so :class:`GuardedSite` wraps each of the
server's protocol objects in a :class:`_Guarded` that forwards every event.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections import OrderedDict

from aiohttp import web

from .logutil import ThrottledLog

log = logging.getLogger("fanout.admin")

_LINGER_RST = struct.pack("ii", 1, 0)
_HEADERS_END = b"\r\n\r\n"


class ConnectionGuard:
    """The open connections of one server, oldest first."""

    def __init__(self, *, max_connections: int, header_timeout: float) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.evicted = 0
        self.timed_out = 0
        self._open: OrderedDict[_Guarded, None] = OrderedDict()
        self._throttled = ThrottledLog(log)

    def __len__(self) -> int:
        return len(self._open)

    def factory(self, inner_factory):
        """A protocol factory for ``loop.create_server`` around aiohttp's."""
        return lambda: _Guarded(self, inner_factory())

    def _opened(self, conn: "_Guarded") -> None:
        while len(self._open) >= self.max_connections:
            oldest, _ = self._open.popitem(last=False)
            self.evicted += 1
            self._throttled.warning("admin-cap", "admin API holds %d connections, its limit: "
                                    "closing the oldest (%s)", self.max_connections, oldest.peer)
            oldest.abort()
        self._open[conn] = None

    def _closed(self, conn: "_Guarded") -> None:
        self._open.pop(conn, None)


class _Guarded(asyncio.Protocol):
    __slots__ = ("_guard", "_inner", "_transport", "_timer", "_tail", "peer")

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self.peer = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.peer = transport.get_extra_info("peername")
        self._guard._opened(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._guard.header_timeout, self._headers_late)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            # Only the end of the first header block is looked for: the last
            # three bytes carried over find it split across reads.
            seen = self._tail + data[:len(_HEADERS_END) - 1] if self._tail else b""
            if _HEADERS_END in seen or _HEADERS_END in data:
                self._timer.cancel()
                self._timer = None
            else:
                self._tail = data[-(len(_HEADERS_END) - 1):]
        self._inner.data_received(data)

    def eof_received(self):
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard._closed(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.connection_lost(exc)

    def _headers_late(self) -> None:
        self._timer = None
        self._guard.timed_out += 1
        self._guard._throttled.warning("admin-headers", "admin API: no complete request headers "
                                       "from %s within %g s; closing", self.peer,
                                       self._guard.header_timeout)
        self.abort()

    def abort(self) -> None:
        """Close with an RST: nothing lingers in the kernel."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
        transport.abort()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a :class:`ConnectionGuard`."""

    __slots__ = ("_host", "_port", "guard")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 guard: ConnectionGuard, backlog: int = 128) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self.guard = guard

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.guard.factory(self._runner.server), self._host, self._port,
            backlog=self._backlog)
