"""The client port: accept, per-address admission, refusal with a reason,
and a pause when the process runs out of descriptors.

Accepted sockets become core connections (``fanout._core.TcpConnection``)
handed to ``on_connection(conn, peer)``; refused ones get an Error frame
with the reason and are closed, costing no session.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Callable

from .. import _core
from ..logic.ratelimit import TokenBucket
from ..protocol import fanout_pb2 as pb
from ..protocol.wire import FrameType
from .config import NodeConfig
from .logutil import ThrottledLog

log = logging.getLogger("fanout.listener")

ACCEPTS_PER_WAKE = 512      # bound one accept burst so the loop stays responsive
EMFILE_PAUSE = 0.1          # seconds the listener rests when out of descriptors


class Listener:
    """:param config: the node's settings (address, limits).
    :param on_connection: ``on_connection(conn, peer)`` for each admitted socket.
    :param connection_count: how many connections the node holds now.
    :param metrics: ``connections_accepted`` and ``connections_refused``.
    """

    def __init__(self, config: NodeConfig, loop: asyncio.AbstractEventLoop, *,
                 on_connection: Callable[[_core.Connection, tuple], object],
                 connection_count: Callable[[], int], metrics, throttled: ThrottledLog) -> None:
        self.config = config
        self._loop = loop
        self._on_connection = on_connection
        self._count = connection_count
        self._metrics = metrics
        self._throttled = throttled
        self._ip_buckets: dict[str, TokenBucket] = {}
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self._sock: socket.socket | None = socket.create_server(
            (config.host, config.port), family=family, backlog=4096)
        self._sock.setblocking(False)
        self._resume_timer: asyncio.TimerHandle | None = None
        loop.add_reader(self._sock.fileno(), self._accept)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    def close(self) -> None:
        """Stop accepting; idempotent."""
        if self._sock is None:
            return
        if self._resume_timer is not None:
            self._resume_timer.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None

    def forget_idle_addresses(self) -> None:
        """Drop the rate buckets of addresses that are back to a full burst."""
        now = self._loop.time()
        self._ip_buckets = {ip: b for ip, b in self._ip_buckets.items() if not b.full(now)}

    def _accept(self) -> None:
        cfg = self.config
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                sock, peer = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause(exc)
                elif exc.errno not in (errno.ECONNABORTED, errno.EINTR):
                    log.error("accept failed: %s", exc)
                return
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                sock.close()          # reset before we got to it
                continue
            conn = _core.TcpConnection(sock.detach(), self._loop, max_frame=cfg.max_frame,
                                       max_backlog_bytes=cfg.max_backlog_bytes,
                                       max_backlog_frames=cfg.max_backlog_frames)
            self._metrics.connections_accepted.inc()
            refusal = self._admission(peer[0])
            if refusal is not None:
                self._refuse(conn, peer, *refusal)
                continue
            self._on_connection(conn, peer)

    def _admission(self, ip: str) -> tuple[int, str] | None:
        cfg = self.config
        if self._count() >= cfg.max_connections:
            return pb.CONNECTION_LIMIT, f"node holds its limit of {cfg.max_connections} connections"
        bucket = self._ip_buckets.get(ip)
        now = self._loop.time()
        if bucket is None:
            bucket = self._ip_buckets[ip] = TokenBucket(cfg.conn_rate_per_ip,
                                                        cfg.conn_burst_per_ip, now)
        if not bucket.take(now):
            return (pb.CONNECTION_RATE_LIMITED,
                    f"over {cfg.conn_rate_per_ip:g} new connections/s from {ip}")
        return None

    def _refuse(self, conn: _core.Connection, peer, reason: int, message: str) -> None:
        # Answer with the reason, then close: the client learns why instead
        # of seeing a bare reset, and it costs no session.
        name = pb.Reason.Name(reason)
        self._metrics.connections_refused.labels(name).inc()
        self._throttled.warning(name, "refused connection from %s: %s", peer[0], message)
        # Reading (in discard mode once closing) lets the socket go as soon
        # as the peer closes, so a connect flood does not pin descriptors
        # for the whole grace period.
        conn.start_reading(_ignore)
        conn.close_after(_core.core_frame(FrameType.ERROR, pb.Error(
            reason=reason, message=message).SerializeToString()))
        if not conn.closed:
            self._loop.call_later(self.config.close_grace_ms / 1000, conn.close)

    def _pause(self, exc: OSError) -> None:
        # Out of descriptors: stop polling the listener for a moment instead
        # of spinning on a readable socket we cannot accept from.
        self._metrics.connections_refused.labels("EMFILE").inc()
        self._throttled.warning("accept", "accept paused for %d ms: %s (%d connections open)",
                                EMFILE_PAUSE * 1000, exc, self._count())
        self._loop.remove_reader(self._sock.fileno())
        self._resume_timer = self._loop.call_later(EMFILE_PAUSE, self._resume)

    def _resume(self) -> None:
        self._resume_timer = None
        if self._sock is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept)


def _ignore() -> None:
    pass
