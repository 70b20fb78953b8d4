"""The client ports: accept, admission, refusal with a reason and an RST,
the handshake deadline, the PROXY protocol from trusted proxies, and the
descriptors kept back for the admin API.

The node listens on the client port (wire frames over TCP) and, unless it is
off, the WebSocket port (``ws_port``); both admit through the same rules and
budgets, and differ only in the core connection kind a socket becomes. The
TLS ports (``tls_port``, ``wss_port``; off by default) are the same two kinds
made with the node's TlsContext: the core handshakes, then encrypts.

Admission, in order, at accept (each O(1)):

1. the socket's descriptor number is below ``RLIMIT_NOFILE - fd_reserve``
   (Linux hands out the lowest free number, so a higher one means fewer than
   ``fd_reserve`` are left, and those belong to the admin API and probes);
2. the node holds fewer than ``max_connections``;
3. the address (an IPv4 address or an IPv6 /64) holds fewer than
   ``max_conns_per_ip`` connections and ``max_unauthenticated_per_ip``
   unauthenticated ones;
4. the address's new-connection token bucket has a token.

A refused socket never becomes a core connection: the Error frame with the
reason is put in its send buffer if it fits at once, then it is closed with
``SO_LINGER {on, 0}``, so the kernel sends RST and frees everything now.

An admitted connection counts as unauthenticated until its Hello succeeds
(:meth:`Listener.authenticated`). When ``max_unauthenticated`` are waiting
for one, a new connection closes the oldest, so that a flood of silent
sockets can delay a valid client by at most its own handshake, never lock it
out; a connection still without a Hello at ``auth_timeout_ms`` is closed the
same way (``AUTH_TIMEOUT``).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import resource
import socket
import struct
from collections import OrderedDict
from typing import Callable, Protocol

from .. import _core
from ..logic.ratelimit import TokenBucket
from ..protocol import fanout_pb2 as pb
from ..protocol.wire import FrameType
from . import proxyproto
from .config import ConfigError, NodeConfig
from .logutil import ThrottledLog
from . import wsupgrade
from .slots import Slots, address_key
from .synshed import SynShed

log = logging.getLogger("fanout.listener")

ACCEPTS_PER_WAKE = 128      # bound one accept burst so the loop stays responsive
EMFILE_PAUSE = 0.1          # seconds the listener rests when out of descriptors
PROXY_HEADER_TIMEOUT = 2.0  # a proxy sends its header at once; seconds it gets
PROXY_REPOLL = 0.01         # seconds between peeks at a partial PROXY header
_LINGER_RST = struct.pack("ii", 1, 0)


class Port:
    """One listening socket and the core connection kind its sockets become."""

    __slots__ = ("sock", "kind", "name", "tls")

    def __init__(self, sock: socket.socket, kind: type, name: str,
                 tls: _core.TlsContext | None = None) -> None:
        self.sock = sock
        self.kind = kind
        self.name = name
        self.tls = tls


class Admitted(Protocol):
    """What the listener needs of the owner ``on_connection`` returns."""

    peer_host: str
    conn: _core.Connection

    def fail(self, reason: int, message: str) -> None: ...


def descriptor_budget(config: NodeConfig) -> tuple[int, int]:
    """``(max_connections, ceiling)``: the client connections the process's
    descriptor limit allows next to ``fd_reserve``, and the first descriptor
    number a client socket may not have.

    Raises the soft ``RLIMIT_NOFILE`` to the hard one; clamps
    ``max_connections`` with a warning when the limit is lower than it plus
    the reserve; refuses to start when nothing is left for clients.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    ceiling = soft - config.fd_reserve
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    room = ceiling - in_use
    if room < 1:
        raise ConfigError(f"RLIMIT_NOFILE is {soft}: with fd_reserve {config.fd_reserve} and "
                          f"{in_use} descriptors already open, no client could connect; "
                          "raise the limit (ulimit -n) or lower fd_reserve")
    if config.max_connections > room:
        log.warning("RLIMIT_NOFILE %d (hard %s) leaves room for %d client connections next to "
                    "fd_reserve %d: max_connections %d lowered to %d; raise the limit to hold more",
                    soft, hard, room, config.fd_reserve, config.max_connections, room)
        return room, ceiling
    return config.max_connections, ceiling


class _Cause:
    """One way to refuse: the reason, what the client reads, the metric."""

    __slots__ = ("reason", "message", "frame", "http", "counter", "key")

    def __init__(self, reason: int, message: str, metrics, label: str | None = None,
                 status: int = 503) -> None:
        self.reason = reason
        self.message = message
        self.key = label or pb.Reason.Name(reason)
        # Built once: a flood is mostly refusals, and each costs no allocation.
        self.frame = _core.wire_bytes(_core.core_frame(FrameType.ERROR, pb.Error(
            reason=reason, message=message).SerializeToString()))
        # what a browser on the WebSocket port reads instead: it speaks HTTP yet
        self.http = wsupgrade.refusal(status, f"{pb.Reason.Name(reason)}: {message}")
        self.counter = metrics.connections_refused.labels(self.key)


class Listener:
    """:param config: the node's settings (address, limits).
    :param on_connection: ``on_connection(conn, peer)`` for each admitted
        socket; returns the connection's owner (an :class:`Admitted`), which
        the node later reports through :meth:`authenticated` and :meth:`release`.
    :param connection_count: how many connections the node holds now.
    :param metrics: ``connections_accepted``, ``connections_refused``, gauges.
    :param tls: the node's TlsContext, for ``tls_port`` and ``wss_port``.
    """

    def __init__(self, config: NodeConfig, loop: asyncio.AbstractEventLoop, *,
                 on_connection: Callable[[_core.Connection, tuple], Admitted],
                 connection_count: Callable[[], int], metrics, throttled: ThrottledLog,
                 tls: _core.TlsContext | None = None) -> None:
        self.config = config
        self._loop = loop
        self._on_connection = on_connection
        self._count = connection_count
        self._metrics = metrics
        self._throttled = throttled
        self.max_connections, self._fd_ceiling = descriptor_budget(config)
        self._auth_timeout = config.auth_timeout_ms / 1000
        self._slots = Slots(max_per_address=config.max_conns_per_ip,
                            max_unauthenticated=config.max_unauthenticated,
                            max_unauthenticated_per_address=config.max_unauthenticated_per_ip)
        self._ip_buckets: dict[str, TokenBucket] = {}
        self._trusted = config.trusted_proxies()
        self._trust_cache: dict[str, bool] = {}
        # fd -> (socket, peer, deadline, port) of trusted connections whose
        # PROXY header has not arrived yet; arrival order is deadline order.
        self._awaiting: OrderedDict[int, tuple[socket.socket, tuple, float, Port]] = OrderedDict()
        self._peek = bytearray(proxyproto.MAX_HEADER)
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        c = config
        self._full = _Cause(pb.CONNECTION_LIMIT, "node holds its limit of connections; "
                            "reconnect later or elsewhere", metrics)
        self._fds = _Cause(pb.CONNECTION_LIMIT, "node is out of descriptors for clients; "
                           "reconnect later or elsewhere", metrics, "FD_RESERVE")
        self._address = _Cause(pb.ADDRESS_LIMIT, f"this address holds its limit of "
                               f"{c.max_conns_per_ip} connections, or of "
                               f"{c.max_unauthenticated_per_ip} without a Hello", metrics,
                               status=429)
        self._rate = _Cause(pb.CONNECTION_RATE_LIMITED, f"over {c.conn_rate_per_ip:g} new "
                            "connections/s from this address", metrics, status=429)
        self._bad_proxy = _Cause(pb.BAD_REQUEST, "no valid PROXY protocol header", metrics,
                                 "PROXY_HEADER")
        self._sndbuf = config.sndbuf_bytes
        self._limits = dict(max_frame=c.max_frame, max_backlog_bytes=c.max_backlog_bytes,
                            max_backlog_frames=c.max_backlog_frames)
        self.ports: list[Port] = []
        try:
            self.ports.append(Port(self._bind(config.port), _core.TcpConnection, "tcp"))
            if config.ws_bind_port() >= 0:
                self.ports.append(Port(self._bind(config.ws_bind_port()), _core.WsConnection,
                                       "ws"))
            if tls is not None and config.tls_port >= 0:
                self.ports.append(Port(self._bind(config.tls_port), _core.TcpConnection,
                                       "tls", tls))
            if tls is not None and config.wss_port >= 0:
                self.ports.append(Port(self._bind(config.wss_port), _core.WsConnection,
                                       "wss", tls))
        except OSError:
            for port in self.ports:
                port.sock.close()
            raise
        self._shed = SynShed([p.sock for p in self.ports], loop,
                             threshold=config.shed_after_refusals,
                             seconds=config.shed_seconds, on_shed=self._on_shed)
        self._resume_timer: asyncio.TimerHandle | None = None
        self._listening = True
        for port in self.ports:
            loop.add_reader(port.sock.fileno(), self._accept, port)
        metrics.add_gauges(self._gauges)

    def _bind(self, port: int) -> socket.socket:
        config = self.config
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        sock = socket.create_server((config.host, port), family=family, backlog=4096,
                                    reuse_port=bool(config.reuse_port))
        sock.setblocking(False)
        return sock

    def _bound(self, name: str) -> tuple[str, int] | None:
        for port in self.ports:
            if port.name == name:
                host, number = port.sock.getsockname()[:2]
                return host, number
        return None

    @property
    def address(self) -> tuple[str, int]:
        """The client port's ``(host, port)``."""
        return self._bound("tcp")

    @property
    def ws_address(self) -> tuple[str, int] | None:
        """The WebSocket port's ``(host, port)``, or None when it is off."""
        return self._bound("ws")

    @property
    def tls_address(self) -> tuple[str, int] | None:
        """The TCP+TLS port's ``(host, port)``, or None when it is off."""
        return self._bound("tls")

    @property
    def wss_address(self) -> tuple[str, int] | None:
        """The WebSocket-over-TLS port's ``(host, port)``, or None when it is off."""
        return self._bound("wss")

    def close(self) -> None:
        """Stop accepting; idempotent. (The drain that calls it closes the
        connections already admitted.)"""
        if not self._listening:
            return
        self._listening = False
        if self._resume_timer is not None:
            self._resume_timer.cancel()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._shed.close()
        for port in self.ports:
            self._loop.remove_reader(port.sock.fileno())
            port.sock.close()
        for fd, (sock, _, _, _) in list(self._awaiting.items()):
            self._loop.remove_reader(fd)
            _reset(sock)
        self._awaiting.clear()

    # ---------------------------------------------------------------- the node's reports

    def authenticated(self, owner: Admitted) -> None:
        """``owner`` sent a valid Hello: off the unauthenticated budget."""
        self._slots.authenticated(owner)

    def release(self, owner: Admitted) -> None:
        """``owner``'s connection is closed (any path); call once per admitted owner."""
        self._slots.release(owner, address_key(owner.peer_host))

    def forget_idle_addresses(self) -> None:
        """Drop the rate buckets of addresses that are back to a full burst."""
        now = self._loop.time()
        self._ip_buckets = {ip: b for ip, b in self._ip_buckets.items() if not b.full(now)}
        self._trust_cache.clear()

    # ---------------------------------------------------------------- accept

    def _accept(self, port: Port) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                sock, peer = port.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause(exc)
                elif exc.errno not in (errno.ECONNABORTED, errno.EINTR):
                    log.error("accept failed: %s", exc)
                return
            self._metrics.connections_accepted.inc()
            if sock.fileno() >= self._fd_ceiling:
                self._refuse(sock, peer[0], self._fds, port)
            elif self._trusted and self._is_trusted(peer[0]):
                if self._configure(sock):
                    self._await_header(sock, peer, port)
            else:
                self._admit(sock, peer, port)

    def _configure(self, sock: socket.socket) -> bool:
        # Only for sockets the node keeps: under a connect flood most are
        # refused, and these syscalls would only slow the refusals down.
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._sndbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sndbuf)
        except OSError:
            sock.close()          # reset before we got to it
            return False
        return True

    def _admit(self, sock: socket.socket, peer: tuple, port: Port,
               configured: bool = False) -> None:
        ip = peer[0]
        key = address_key(ip)
        slots = self._slots
        if self._count() >= self.max_connections:
            self._refuse(sock, ip, self._full, port)
            return
        if slots.over_address_limit(key):
            self._refuse(sock, ip, self._address, port)
            if not configured:            # ip sent the packets (no proxy in between)
                self._shed.refused(ip)
            return
        bucket = self._ip_buckets.get(key)
        now = self._loop.time()
        if bucket is None:
            cfg = self.config
            bucket = self._ip_buckets[key] = TokenBucket(cfg.conn_rate_per_ip,
                                                         cfg.conn_burst_per_ip, now)
        if not bucket.take(now):
            self._refuse(sock, ip, self._rate, port)
            if not configured:
                self._shed.refused(ip)
            return
        if not configured and not self._configure(sock):
            return
        if slots.unauthenticated_full:
            self._evict_oldest()
        conn = port.kind(sock.detach(), self._loop, tls=port.tls, **self._limits)
        owner = self._on_connection(conn, peer)
        deadline = now + self._auth_timeout
        slots.add(owner, key, deadline)
        self._wake_at(deadline)

    def _refuse(self, sock: socket.socket, ip: str, cause: _Cause, port: Port) -> None:
        cause.counter.inc()
        self._throttled.warning(cause.key, "refused connection from %s: %s", ip, cause.message)
        if port.tls is None:              # a TLS client could not read it: the RST alone
            try:
                # Best effort: the reason, if the send buffer takes it now. The
                # RST that follows may overtake it (the client then sees a reset).
                sock.send(cause.http if port.name == "ws" else cause.frame, socket.MSG_DONTWAIT)
            except OSError:
                pass
        _reset(sock)

    def _evict_oldest(self) -> None:
        owner = self._slots.pop_oldest()
        if owner is None:
            return
        self._throttled.warning("unauthenticated", "%d connections without a Hello, the limit: "
                                "closing the oldest, from %s", self.config.max_unauthenticated,
                                owner.peer_host)
        self._close_unauthenticated(owner, pb.CONNECTION_LIMIT,
                                    "too many connections without a Hello; you were the oldest")

    def _close_unauthenticated(self, owner: Admitted, reason: int, message: str) -> None:
        conn = owner.conn
        if not conn.closing:
            owner.fail(reason, message)
        conn.abort()                  # the Error is queued; the RST follows it

    def _is_trusted(self, ip: str) -> bool:
        trusted = self._trust_cache.get(ip)
        if trusted is None:
            try:
                addr = ipaddress.ip_address(ip.partition("%")[0])
            except ValueError:
                addr = None
            if addr is not None and addr.version == 6 and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            trusted = addr is not None and any(addr in net for net in self._trusted)
            if len(self._trust_cache) >= 4096:
                self._trust_cache.clear()
            self._trust_cache[ip] = trusted
        return trusted

    # ---------------------------------------------------------------- PROXY protocol

    def _await_header(self, sock: socket.socket, peer: tuple, port: Port) -> None:
        if len(self._awaiting) >= self.config.max_unauthenticated:
            self._refuse(sock, peer[0], self._full, port)
            return
        fd = sock.fileno()
        deadline = self._loop.time() + PROXY_HEADER_TIMEOUT
        self._awaiting[fd] = (sock, peer, deadline, port)
        self._loop.add_reader(fd, self._header_readable, fd)
        self._wake_at(deadline)

    def _header_readable(self, fd: int) -> None:
        entry = self._awaiting.get(fd)
        if entry is None:
            return
        sock, peer, _, port = entry
        try:
            # Peek, so nothing past the header leaves the socket: the core
            # connection reads the client's first frame from it.
            n = sock.recv_into(self._peek, proxyproto.MAX_HEADER, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if n == 0:
            self._drop_awaiting(fd)
            _reset(sock)
            return
        try:
            header = proxyproto.parse(memoryview(self._peek)[:n])
        except proxyproto.ProxyHeaderError as exc:
            self._drop_awaiting(fd)
            self._bad_header(sock, peer, str(exc))
            return
        if header is None:
            # A partial header stays readable (it is only peeked): look again
            # shortly instead of spinning on it.
            self._loop.remove_reader(fd)
            self._loop.call_later(PROXY_REPOLL, self._repoll, fd)
            return
        self._drop_awaiting(fd)
        try:
            sock.recv_into(self._peek, header.length)
        except OSError:
            _reset(sock)
            return
        self._admit(sock, header.source or peer, port, configured=True)

    def _repoll(self, fd: int) -> None:
        if fd in self._awaiting:
            self._loop.add_reader(fd, self._header_readable, fd)

    def _drop_awaiting(self, fd: int) -> None:
        if self._awaiting.pop(fd, None) is not None:
            self._loop.remove_reader(fd)

    def _bad_header(self, sock: socket.socket, peer: tuple, why: str) -> None:
        cause = self._bad_proxy
        cause.counter.inc()
        self._throttled.warning(cause.key, "closing connection from trusted proxy %s: %s",
                                peer[0], why)
        _reset(sock)

    # ---------------------------------------------------------------- deadlines

    def _wake_at(self, when: float) -> None:
        # One timer for every deadline, set for the earliest: O(1) per
        # connection, and as precise as the loop's own timers.
        timer = self._deadline_timer
        if timer is not None:
            if self._timer_at <= when:
                return
            timer.cancel()
        self._timer_at = when
        self._deadline_timer = self._loop.call_at(when, self._deadlines)

    def _deadlines(self) -> None:
        self._deadline_timer = None
        now = self._loop.time()
        try:
            for owner in self._slots.pop_expired(now):
                # Each one alone: they are already off the budget, so one
                # failure must not leave the rest open with no deadline.
                try:
                    self._close_unauthenticated(owner, pb.AUTH_TIMEOUT,
                                                f"no valid Hello within {self._auth_timeout:g} s")
                except Exception:
                    self._throttled.log(logging.ERROR, "deadline", "closing %r at its handshake "
                                        "deadline failed", owner, exc_info=True)
            awaiting = self._awaiting
            while awaiting:
                fd = next(iter(awaiting))
                sock, peer, deadline, _ = awaiting[fd]
                if deadline > now:
                    break
                self._drop_awaiting(fd)
                self._bad_header(sock, peer, f"no PROXY header within {PROXY_HEADER_TIMEOUT:g} s")
        finally:
            # Rearm for the earliest deadline left, even after a failure above.
            if self._slots:
                self._wake_at(self._slots.next_deadline())
            if self._awaiting:
                self._wake_at(self._awaiting[next(iter(self._awaiting))][2])

    # ---------------------------------------------------------------- descriptors

    def _pause(self, exc: OSError) -> None:
        # Out of descriptors: stop polling the listener for a moment instead
        # of spinning on a readable socket we cannot accept from.
        self._metrics.connections_refused.labels("EMFILE").inc()
        self._throttled.warning("accept", "accept paused for %d ms: %s (%d connections open)",
                                EMFILE_PAUSE * 1000, exc, self._count())
        for port in self.ports:
            self._loop.remove_reader(port.sock.fileno())
        self._resume_timer = self._loop.call_later(EMFILE_PAUSE, self._resume)

    def _resume(self) -> None:
        self._resume_timer = None
        if self._listening:
            for port in self.ports:
                self._loop.add_reader(port.sock.fileno(), self._accept, port)

    def _on_shed(self, ip: str, refusals: int) -> None:
        self._throttled.warning("shed", "connection flood from %s (%d refusals in a second): its "
                                "new connections are dropped by the kernel for %g s", ip,
                                refusals, self._shed.seconds)

    def _gauges(self):
        yield ("fanout_connections_unauthenticated", "Client connections without a valid Hello "
               "yet", len(self._slots))
        yield ("fanout_client_addresses", "Client addresses (IPv6: /64s) holding connections",
               self._slots.addresses)
        yield ("fanout_shed_addresses", "Addresses whose new connections the kernel drops "
               "(a connection flood from them)", len(self._shed.shed))


def _reset(sock: socket.socket) -> None:
    """Close with an RST: the kernel keeps nothing (no FIN_WAIT, no unsent data)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    sock.close()
