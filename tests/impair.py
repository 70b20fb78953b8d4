"""A TCP proxy on 127.0.0.1 that impairs the link, for weak-network tests.

``async with ImpairedLink(upstream_port, latency=0.15, ...) as link:`` and
point clients at ``link.port``. Per connection, in both directions:

* ``latency`` (seconds, one way) plus up to ``jitter`` more; order is kept,
  as TCP keeps it (a chunk never overtakes the one before it);
* ``bandwidth`` (bytes per second, each direction; 0: none);
* ``nat_timeout``: after this many seconds with no byte in either
  direction the connection is black-holed, like a NAT that forgot the
  mapping: everything either side sends is dropped silently, and nothing
  tells either side (no FIN, no RST) until it gives up itself;
* ``drop_rate``: every ``drop_period`` seconds each open connection is cut
  (both sides reset) with this probability: whole connections dropped.

``cut_all()`` resets every connection, ``blackhole_all()`` black-holes
them now. Counters: ``accepted``, ``cuts``, ``blackholed``.
"""

from __future__ import annotations

import asyncio
import random


class _Pipe:
    """One direction of one connection: delayed, paced, ordered."""

    def __init__(self, link: "ImpairedLink", conn: "_Conn", writer: asyncio.StreamWriter):
        self.link = link
        self.conn = conn
        self.writer = writer
        self.queue: asyncio.Queue = asyncio.Queue()
        self.due = 0.0          # when the last queued chunk is delivered
        self.task = asyncio.ensure_future(self._pump())

    def push(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        link = self.link
        due = loop.time() + link.latency + random.uniform(0.0, link.jitter)
        due = max(due, self.due)
        if link.bandwidth:
            due += len(data) / link.bandwidth
        self.due = due
        self.queue.put_nowait((due, data))

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await self.queue.get()
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.conn.blackholed:
                continue
            self.writer.write(data)


class _Conn:
    def __init__(self, link: "ImpairedLink", down_r, down_w, up_r, up_w) -> None:
        self.link = link
        self.blackholed = False
        self.closed = False
        self.ended = 0                      # readers that saw their side end
        self.last_activity = asyncio.get_running_loop().time()
        self.writers = (down_w, up_w)
        self.to_up = _Pipe(link, self, up_w)
        self.to_down = _Pipe(link, self, down_w)
        self.tasks = [asyncio.ensure_future(self._read(down_r, self.to_up)),
                      asyncio.ensure_future(self._read(up_r, self.to_down))]

    async def _read(self, reader: asyncio.StreamReader, pipe: _Pipe) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if self.blackholed:
                    continue                # lost in the NAT
                self.last_activity = loop.time()
                pipe.push(data)
        except (ConnectionError, OSError):
            pass
        self.ended += 1
        if not self.blackholed:
            # An end seen before the black hole is passed on (after the data
            # in flight); after it, nobody hears of it.
            while not pipe.queue.empty() and not self.closed:
                await asyncio.sleep(0.01)
            self.cut(abort=False)
        elif self.ended == 2:
            self.cut()                      # both sides gave up: free the sockets

    def blackhole(self) -> None:
        if not self.blackholed and not self.closed:
            self.blackholed = True
            self.link.blackholed += 1
            self.link.blackholed_at.append(asyncio.get_running_loop().time())

    def cut(self, abort: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        for w in self.writers:
            if abort:
                w.transport.abort()
            else:
                w.close()
        for t in self.tasks + [self.to_up.task, self.to_down.task]:
            if t is not asyncio.current_task():
                t.cancel()
        self.link.conns.discard(self)


class ImpairedLink:
    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1",
                 latency: float = 0.0, jitter: float = 0.0, bandwidth: int = 0,
                 nat_timeout: float = 0.0, drop_rate: float = 0.0,
                 drop_period: float = 1.0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.latency = latency
        self.jitter = jitter
        self.bandwidth = bandwidth
        self.nat_timeout = nat_timeout
        self.drop_rate = drop_rate
        self.drop_period = drop_period
        self.conns: set[_Conn] = set()
        self.accepted = 0
        self.cuts = 0
        self.blackholed = 0
        self.blackholed_at: list[float] = []
        self.port = 0
        #: While true, new connections are reset at once.
        self.refusing = False
        self._server: asyncio.base_events.Server | None = None
        self._ticker: asyncio.Task | None = None

    async def __aenter__(self) -> "ImpairedLink":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ticker = asyncio.ensure_future(self._tick())
        return self

    async def __aexit__(self, *exc) -> None:
        self._ticker.cancel()
        self._server.close()
        for conn in list(self.conns):
            conn.cut()
        await self._server.wait_closed()

    async def _accept(self, down_r, down_w) -> None:
        if self.refusing:
            down_w.transport.abort()        # the network is down: connects fail
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            down_w.transport.abort()
            return
        self.accepted += 1
        self.conns.add(_Conn(self, down_r, down_w, up_r, up_w))

    async def _tick(self) -> None:
        """The NAT's timer and the dice of whole-connection drops."""
        loop = asyncio.get_running_loop()
        step = 0.05
        next_drop = loop.time() + self.drop_period
        while True:
            await asyncio.sleep(step)
            now = loop.time()
            if self.nat_timeout:
                for conn in list(self.conns):
                    if now - conn.last_activity >= self.nat_timeout:
                        conn.blackhole()
            if self.drop_rate and now >= next_drop:
                next_drop += self.drop_period
                for conn in list(self.conns):
                    if not conn.blackholed and random.random() < self.drop_rate:
                        self.cuts += 1
                        conn.cut()

    def cut_all(self) -> None:
        for conn in list(self.conns):
            self.cuts += 1
            conn.cut()

    def blackhole_all(self) -> None:
        for conn in list(self.conns):
            conn.blackhole()
