"""A fan-out node: the client port, its sessions, the broadcast hub, and the
operational controls around them (limits, overload degradation, presence,
graceful drain, metrics, the admin API).

Connections are accepted here and handed to the compiled core
(``fanout._core.Connection``), which owns each socket. :class:`Session`
(fanout/session.py) runs the per-connection control protocol; the core's
``Hub`` batches and writes room broadcasts. Other services publish with
:meth:`Node.publish`, in process or through the admin API (fanout/admin.py).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import random
import secrets
import socket

from .. import _core
from .admin import start_admin
from ..bus import Bus, LocalBus
from .config import NodeConfig
from ..logic import KINDS, LocalLogic, Logic, Rejected, check_room_name
from .logutil import ThrottledLog
from .metrics import NodeMetrics
from ..protocol import fanout_pb2 as pb
from ..protocol.wire import KIND_CODES, FrameType
from ..logic.ratelimit import TokenBucket
from .session import Session

log = logging.getLogger("fanout.node")

ACCEPTS_PER_WAKE = 512      # bound one accept burst so the loop stays responsive
SWEEP_INTERVAL = 1.0        # seconds between timeout, lag and degradation checks
LAG_PROBE_INTERVAL = 0.1    # seconds between event-loop lag probes
CALM_SECONDS = 5            # calm sweeps before degradation steps down one level
AUTH_BURST = 20             # auth failures per sweep that make a warning
DELAY_FACTOR = (1, 2, 4)    # flush window multiplier per degradation level


def parse_kind(kind: int | str) -> int:
    """``"gift"``/``pb.GIFT`` -> ``pb.GIFT``; raises Rejected(BAD_REQUEST)."""
    if isinstance(kind, str):
        value = KIND_CODES.get(kind.lower())
        if value is None:
            raise Rejected(pb.BAD_REQUEST, f"unknown kind {kind!r}; use chat, gift or system")
        return value
    if kind not in KINDS:
        raise Rejected(pb.BAD_REQUEST, f"unknown kind {kind!r}")
    return kind


class Node:
    """One fan-out node.

    :param config: validated :class:`~fanout.config.NodeConfig`.
    :param bus: message bus; default an in-process :class:`~fanout.bus.LocalBus`.
    :param logic: logic layer; default :class:`~fanout.logic.LocalLogic` on ``bus``.
    """

    def __init__(self, config: NodeConfig, *, bus: Bus | None = None,
                 logic: Logic | None = None) -> None:
        self.config = config
        self.metrics = NodeMetrics()
        self.metrics.node = self
        self.bus = bus if bus is not None else LocalBus()
        self.logic = logic if logic is not None else LocalLogic(
            self.bus, max_chat_bytes=config.max_chat_bytes,
            max_publish_bytes=config.max_publish_bytes,
            chat_rate=config.chat_rate, chat_burst=config.chat_burst,
            room_budget=config.room_budget, chat_sample_every=config.chat_sample_every,
            metrics=self.metrics)
        self.api_key = config.api_key or secrets.token_urlsafe(24)
        self.sessions: dict[str, Session] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.hub: _core.Hub | None = None
        self.admin = None
        self.draining = False
        self.degradation_level = 0
        self.loop_lag = 0.0
        self._listener: socket.socket | None = None
        self._ids = itertools.count(1)
        self._tag = os.urandom(3).hex()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._stopped: asyncio.Future | None = None
        self._drain_task: asyncio.Task | None = None
        self._ip_buckets: dict[str, TokenBucket] = {}
        self._lag_sum = 0.0
        self._lag_samples = 0
        self._lag_due = 0.0
        self._calm = 0
        self._auth_failures = 0
        self._last_room_sweep = 0.0
        self.throttled = ThrottledLog(log)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Bind the client port (and the admin API) and start serving."""
        cfg = self.config
        self.loop = loop = asyncio.get_running_loop()
        self.hub = _core.Hub(loop, max_delay=cfg.max_delay_ms / 1000,
                             max_batch_bytes=cfg.max_batch_bytes,
                             compress_min=cfg.compress_min,
                             compress_level=cfg.compress_level, ring_size=cfg.ring_size,
                             ring_bytes=cfg.ring_bytes)
        self.hub.flush_observer = self.metrics.observe_flush
        self.bus.subscribe(self.hub.publish)
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        self._listener = socket.create_server((cfg.host, cfg.port), family=family,
                                              backlog=4096)
        self._listener.setblocking(False)
        loop.add_reader(self._listener.fileno(), self._accept)
        self._stopped = loop.create_future()
        if cfg.admin_port >= 0:
            self.admin = await start_admin(self)
        # Timers start last: start-up work must not read as event-loop lag.
        self._every(SWEEP_INTERVAL, self._sweep)
        self._lag_due = loop.time() + LAG_PROBE_INTERVAL
        self._every(LAG_PROBE_INTERVAL, self._probe_lag)
        if cfg.presence_interval_ms:
            self._every(cfg.presence_interval_ms / 1000, self._send_presence)
        if cfg.uses_dev_secret:
            log.warning("using the built-in development secret: anyone can mint tokens; "
                        "set FANOUT_SECRET (or --secret) for anything but development")
        if self.admin is not None and not cfg.api_key:
            log.warning("no api_key configured; this run's admin API key is %s", self.api_key)
        host, port = self.address
        log.info("listening on %s:%d (loop %s)", host, port, type(loop).__module__)

    def _every(self, interval: float, callback) -> None:
        """Run ``callback`` every ``interval`` seconds until the node stops."""
        name = callback.__name__

        def tick():
            callback()
            if not self._stopped.done():
                self._timers[name] = self.loop.call_later(interval, tick)
        self._timers[name] = self.loop.call_later(interval, tick)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def ready(self) -> bool:
        """Whether to send this node new clients: not draining, not overloaded."""
        return not self.draining and self.degradation_level < 2

    async def serve_forever(self) -> None:
        await self._stopped

    def start_drain(self) -> None:
        """Begin a graceful drain in the background (idempotent)."""
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self.drain())

    async def drain(self, grace: float | None = None) -> None:
        """Graceful drain, then stop.

        Stops accepting, refuses new publishes (``DRAINING``), flushes every
        pending batch, then sends every client a Kick(SERVER_SHUTDOWN) queued
        behind everything it was already sent, with a reconnect delay
        jittered over ``drain_jitter_ms`` so clients do not return all at
        once. Waits up to ``drain_grace_ms`` for clients to leave.
        """
        if self.draining:
            if self._drain_task is not None and self._drain_task is not asyncio.current_task():
                await asyncio.shield(self._drain_task)
            return
        cfg = self.config
        self.draining = True
        self.metrics.draining.set(1)
        log.warning("draining: %d connections, %d rooms", len(self.sessions), len(self.hub.rooms))
        loop = self.loop
        if self._listener is not None:
            loop.remove_reader(self._listener.fileno())
            self._listener.close()
        self.hub.flush()
        jitter = cfg.drain_jitter_ms
        for session in list(self.sessions.values()):
            session.kick(pb.SERVER_SHUTDOWN, "node is draining; reconnect elsewhere",
                         reconnect_after_ms=random.randint(0, jitter), drop_queued=False)
        deadline = loop.time() + (cfg.drain_grace_ms / 1000 if grace is None else grace)
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self.sessions:
            log.warning("drain grace over: closing %d connections still open", len(self.sessions))
        for session in list(self.sessions.values()):
            session.conn.close()
        for timer in self._timers.values():
            timer.cancel()
        unsubscribe = getattr(self.bus, "unsubscribe", None)
        if unsubscribe is not None:
            unsubscribe(self.hub.publish)
        if self.admin is not None:
            await self.admin.close()
        if not self._stopped.done():
            self._stopped.set_result(None)
        log.info("drained and stopped")

    async def stop(self, *, grace: float | None = None) -> None:
        """Stop the node: a drain with ``grace`` seconds for clients to leave."""
        await self.drain(grace)

    # ---------------------------------------------------------------- accept

    def _accept(self) -> None:
        cfg = self.config
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                sock, peer = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(exc)
                elif exc.errno not in (errno.ECONNABORTED, errno.EINTR):
                    log.error("accept failed: %s", exc)
                return
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                sock.close()          # reset before we got to it
                continue
            conn = _core.TcpConnection(sock.detach(), self.loop, max_frame=cfg.max_frame,
                                    max_backlog_bytes=cfg.max_backlog_bytes,
                                    max_backlog_frames=cfg.max_backlog_frames)
            self.metrics.connections_accepted.inc()
            refusal = self._admission(peer[0])
            if refusal is not None:
                self._refuse(conn, peer, *refusal)
                continue
            session_id = f"{self._tag}-{next(self._ids)}"
            self.sessions[session_id] = Session(self, conn, peer[:2], session_id)
            log.debug("accepted %s from %s", session_id, peer[:2])

    def _admission(self, ip: str) -> tuple[int, str] | None:
        cfg = self.config
        if len(self.sessions) >= cfg.max_connections:
            return pb.CONNECTION_LIMIT, f"node holds its limit of {cfg.max_connections} connections"
        bucket = self._ip_buckets.get(ip)
        now = self.loop.time()
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
        self.metrics.connections_refused.labels(name).inc()
        self.throttled.warning(name, "refused connection from %s: %s", peer[0], message)
        # Reading (in discard mode once closing) lets the socket go as soon
        # as the peer closes, so a connect flood does not pin descriptors
        # for the whole grace period.
        conn.start_reading(_ignore)
        conn.close_after(_core.core_frame(FrameType.ERROR, pb.Error(
            reason=reason, message=message).SerializeToString()))
        if not conn.closed:
            self.loop.call_later(self.config.close_grace_ms / 1000, conn.close)

    def _pause_accepting(self, exc: OSError) -> None:
        # Out of descriptors: stop polling the listener for a moment instead
        # of spinning on a readable socket we cannot accept from.
        self.metrics.connections_refused.labels("EMFILE").inc()
        self.throttled.warning("accept", "accept paused for 100 ms: %s (%d connections open)",
                               exc, len(self.sessions))
        self.loop.remove_reader(self._listener.fileno())
        self.loop.call_later(0.1, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self._listener is not None and not self.draining:
            self.loop.add_reader(self._listener.fileno(), self._accept)

    # ---------------------------------------------------------------- sessions

    def forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

    def kick(self, session_id: str, reason: int, message: str) -> bool:
        session = self.sessions.get(session_id)
        if session is None:
            return False
        session.kick(reason, message)
        return True

    def disconnect_user(self, user: str, message: str = "") -> int:
        """Close every connection of ``user`` on this node with
        Kick(ADMIN_DISCONNECT). Returns how many were closed."""
        victims = [s for s in self.sessions.values() if s.user == user and not s.closing]
        for session in victims:
            session.kick(pb.ADMIN_DISCONNECT, message or "disconnected by the server")
        return len(victims)

    def auth_failed(self, reason: int) -> None:
        self.metrics.auth_failures.labels(pb.Reason.Name(reason)).inc()
        self._auth_failures += 1

    def write_backlog_bytes(self) -> int:
        return sum(s.conn.backlog_bytes for s in self.sessions.values())

    def _sweep(self) -> None:
        now = self.loop.time()
        cfg = self.config
        idle = cfg.idle_timeout_ms / 1000
        auth = cfg.auth_timeout_ms / 1000
        backlog = 0
        for session in list(self.sessions.values()):
            if session.closing:
                continue
            backlog += session.conn.backlog_bytes
            if session.user is None:
                if now - session.connected_at > auth:
                    session.fail(pb.AUTH_TIMEOUT, f"no Hello within {auth:g} s")
            elif now - session.conn.last_recv > idle:
                session.kick(pb.HEARTBEAT_TIMEOUT, f"nothing received for {idle:g} s")
        if self._auth_failures >= AUTH_BURST:
            self.throttled.warning("auth", "%d auth failures in the last second",
                                   self._auth_failures)
        self._auth_failures = 0
        # The mean lag over the second, not the worst: a hot room's flush to
        # 10k sockets blocks the loop for tens of ms by design, and that is
        # no overload. A loop that is saturated is late for most probes.
        self.loop_lag = self._lag_sum / self._lag_samples if self._lag_samples else 0.0
        self._lag_sum, self._lag_samples = 0.0, 0
        self.update_degradation(self.loop_lag, backlog)
        if now - self._last_room_sweep > 10:
            self._last_room_sweep = now
            self.hub.sweep(cfg.room_idle_ttl_s)
            self._ip_buckets = {ip: b for ip, b in self._ip_buckets.items() if not b.full(now)}

    # ---------------------------------------------------------------- overload

    def _probe_lag(self) -> None:
        # A timer due at _lag_due that runs late measures how long the loop
        # was busy with other work: the event-loop lag.
        now = self.loop.time()
        lag = max(0.0, now - self._lag_due)
        self._lag_due = now + LAG_PROBE_INTERVAL
        self.metrics.loop_lag.observe(lag)
        self._lag_sum += lag
        self._lag_samples += 1

    def update_degradation(self, lag: float, backlog: int) -> int:
        """Set the degradation level from the last second's mean loop lag
        and the total write backlog. Steps up at once, down one level after
        CALM_SECONDS calm seconds. Returns the level."""
        cfg = self.config
        if lag * 1000 >= cfg.lag_overloaded_ms:
            target = 2
        elif lag * 1000 >= cfg.lag_degraded_ms or backlog >= cfg.backlog_degraded_bytes:
            target = 1
        else:
            target = 0
        level = self.degradation_level
        if target > level:
            self._calm = 0
            self._set_degradation(target, lag, backlog)
        elif target < level:
            self._calm += 1
            if self._calm >= CALM_SECONDS:
                self._calm = 0
                self._set_degradation(level - 1, lag, backlog)
        else:
            self._calm = 0
        return self.degradation_level

    def _set_degradation(self, level: int, lag: float, backlog: int) -> None:
        names = ("normal", "degraded", "overloaded")
        log.warning("load %s -> %s (loop lag %.0f ms, write backlog %d bytes)",
                    names[self.degradation_level], names[level], lag * 1000, backlog)
        self.degradation_level = level
        self.metrics.degradation_level.set(level)
        self.hub.max_delay = self.config.max_delay_ms / 1000 * DELAY_FACTOR[level]
        set_degradation = getattr(self.logic, "set_degradation", None)
        if set_degradation is not None:
            set_degradation(level)

    # ---------------------------------------------------------------- presence

    def _send_presence(self) -> None:
        # One frame per room per period, written like a batch.
        for name, room in list(self.hub.rooms.items()):
            online = len(room)
            if online:
                body = pb.Presence(room=name, online=online).SerializeToString()
                self.hub.broadcast(name, _core.core_frame(FrameType.PRESENCE, body))

    # ---------------------------------------------------------------- publishing

    def publish(self, room: str, kind: int | str, payload: bytes | str, *,
                sender: str = "system", priority: int = 0) -> int:
        """Publish a message to ``room`` from a service.

        :param kind: ``"chat"``, ``"gift"``, ``"system"`` or the ``pb.Kind`` value.
        :returns: the sequence number assigned to the message.
        :raises fanout.logic.Rejected: ``BAD_REQUEST`` (kind, room name),
            ``MESSAGE_TOO_LARGE``, ``ROOM_OVERLOADED`` (chat dropped by
            overload control) or ``DRAINING``.
        """
        if self.draining:
            raise Rejected(pb.DRAINING, "node is draining; publish to another node")
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        return self.logic.publish(room, parse_kind(kind), payload, sender=sender,
                                  priority=priority)

    def room_info(self, room: str) -> dict:
        """Online count, sequence and recent rates of ``room`` on this node."""
        check_room_name(room)
        known = getattr(self.logic, "knows", None)
        if known is not None and not known(room):
            # Looking must not create: unknown names would pile up state.
            return {"room": room, "epoch": "", "online": 0, "last_seq": 0}
        epoch, seq = self.logic.head(room)
        r = self.hub.rooms.get(room)
        info = {"room": room, "epoch": epoch, "online": len(r) if r is not None else 0,
                "last_seq": seq}
        room_stats = getattr(self.logic, "room_stats", None)
        if room_stats is not None:
            info.update(room_stats(room))
        return info

    def stats(self) -> dict:
        rooms = self.hub.rooms.values() if self.hub is not None else ()
        return {
            "connections": len(self.sessions),
            "rooms": len(self.hub.rooms) if self.hub is not None else 0,
            "flushes": self.hub.flushes if self.hub is not None else 0,
            "frames_built": sum(r.frames_built for r in rooms),
            "deliveries": sum(r.deliveries for r in rooms),
            "degradation_level": self.degradation_level,
            "draining": self.draining,
        }


def _ignore() -> None:
    pass


def install_loop(kind: str) -> None:
    if kind == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(config: NodeConfig) -> None:
    import signal

    node = Node(config)
    await node.start()
    if node.admin is not None:
        host, port = node.admin.address
        print(f"fanout admin API listening on {host}:{port}", flush=True)
    host, port = node.address
    print(f"fanout node listening on {host}:{port}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, node.start_drain)
    await node.serve_forever()


def run(config: NodeConfig) -> None:
    """Run a node until SIGINT/SIGTERM or an admin drain (``fanout node``)."""
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_loop(config.loop)
    asyncio.run(_serve(config))
