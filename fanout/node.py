"""A fan-out node: the client port, its sessions, and the broadcast hub.

Connections are accepted here and handed to the compiled core
(``fanout._core.Connection``), which owns each socket. :class:`Session`
(fanout/session.py) runs the per-connection control protocol; the core's
``Hub`` batches and writes room broadcasts. Other services in the same
process publish with :meth:`Node.publish`.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import itertools
import logging
import os
import random
import socket

from . import _core
from .bus import Bus, LocalBus
from .config import NodeConfig
from .logic import KINDS, LocalLogic, Logic, Rejected
from .proto import fanout_pb2 as pb
from .session import Session

log = logging.getLogger("fanout.node")

ACCEPTS_PER_WAKE = 512      # bound one accept burst so the loop stays responsive
SWEEP_INTERVAL = 1.0        # seconds between heartbeat/auth-timeout checks
KIND_NAMES = {name: kind for kind, name in KINDS.items()}


def parse_kind(kind: int | str) -> int:
    """``"gift"``/``pb.GIFT`` -> ``pb.GIFT``; raises Rejected(BAD_REQUEST)."""
    if isinstance(kind, str):
        value = KIND_NAMES.get(kind.lower())
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
        self.bus = bus if bus is not None else LocalBus()
        self.logic = logic if logic is not None else LocalLogic(
            self.bus, max_chat_bytes=config.max_chat_bytes,
            max_publish_bytes=config.max_publish_bytes,
            chat_rate=config.chat_rate, chat_burst=config.chat_burst)
        self.sessions: dict[str, Session] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.hub: _core.Hub | None = None
        self._listener: socket.socket | None = None
        self._ids = itertools.count(1)
        self._tag = os.urandom(3).hex()
        self._sweeper: asyncio.TimerHandle | None = None
        self._stopped: asyncio.Future | None = None
        self._last_room_sweep = 0.0

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Bind the client port and start serving."""
        cfg = self.config
        self.loop = loop = asyncio.get_running_loop()
        self.hub = _core.Hub(loop, max_delay=cfg.max_delay_ms / 1000,
                             max_batch_bytes=cfg.max_batch_bytes,
                             compress_min=cfg.compress_min, ring_size=cfg.ring_size,
                             ring_bytes=cfg.ring_bytes)
        self.bus.subscribe(self.hub.publish)
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        self._listener = socket.create_server((cfg.host, cfg.port), family=family,
                                              backlog=4096)
        self._listener.setblocking(False)
        loop.add_reader(self._listener.fileno(), self._accept)
        self._stopped = loop.create_future()
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)
        if cfg.uses_dev_secret:
            log.warning("using the built-in development secret: anyone can mint tokens; "
                        "set FANOUT_SECRET (or --secret) for anything but development")
        host, port = self.address
        log.info("listening on %s:%d (loop %s)", host, port, type(loop).__module__)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    async def serve_forever(self) -> None:
        await self._stopped

    async def stop(self, *, grace: float | None = None) -> None:
        """Stop accepting, deliver what is pending, then close every
        connection with a Kick(SERVER_SHUTDOWN) whose reconnect delay is
        jittered so clients do not return all at once."""
        if self._listener is None:
            return
        loop = self.loop
        loop.remove_reader(self._listener.fileno())
        self._listener.close()
        self._listener = None
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.hub.flush()
        for session in list(self.sessions.values()):
            session.kick(pb.SERVER_SHUTDOWN, "node is shutting down",
                         reconnect_after_ms=random.randint(100, 2000))
        deadline = loop.time() + (self.config.close_grace_ms / 1000 if grace is None else grace)
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for session in list(self.sessions.values()):
            session.conn.close()
        self.bus_unsubscribe()
        if not self._stopped.done():
            self._stopped.set_result(None)
        log.info("stopped")

    def bus_unsubscribe(self) -> None:
        unsubscribe = getattr(self.bus, "unsubscribe", None)
        if unsubscribe is not None:
            unsubscribe(self.hub.publish)

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
            conn = _core.Connection(sock.detach(), self.loop, max_frame=cfg.max_frame,
                                    max_backlog_bytes=cfg.max_backlog_bytes,
                                    max_backlog_frames=cfg.max_backlog_frames)
            session_id = f"{self._tag}-{next(self._ids)}"
            self.sessions[session_id] = Session(self, conn, peer[:2], session_id)
            self.counters["connections_accepted"] += 1
            log.debug("accepted %s from %s", session_id, peer[:2])

    def _pause_accepting(self, exc: OSError) -> None:
        # Out of descriptors: stop polling the listener for a moment instead
        # of spinning on a readable socket we cannot accept from.
        self.counters["accept_paused"] += 1
        log.warning("accept paused for 100 ms: %s (%d connections open)", exc, len(self.sessions))
        fd = self._listener.fileno()
        self.loop.remove_reader(fd)
        self.loop.call_later(0.1, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self._listener is not None:
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

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def _sweep(self) -> None:
        loop = self.loop
        now = loop.time()
        cfg = self.config
        idle = cfg.idle_timeout_ms / 1000
        auth = cfg.auth_timeout_ms / 1000
        for session in list(self.sessions.values()):
            if session.closing:
                continue
            if session.user is None:
                if now - session.connected_at > auth:
                    session.fail(pb.AUTH_TIMEOUT, f"no Hello within {auth:g} s")
            elif now - session.conn.last_recv > idle:
                session.kick(pb.HEARTBEAT_TIMEOUT, f"nothing received for {idle:g} s")
        if now - self._last_room_sweep > 10:
            self._last_room_sweep = now
            self.hub.sweep(cfg.room_idle_ttl_s)
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)

    # ---------------------------------------------------------------- publishing

    def publish(self, room: str, kind: int | str, payload: bytes | str, *,
                sender: str = "system", priority: int = 0) -> int:
        """Publish a message to ``room`` from a service in this process.

        :param kind: ``"chat"``, ``"gift"``, ``"system"`` or the ``pb.Kind`` value.
        :returns: the sequence number assigned to the message.
        :raises fanout.logic.Rejected: bad kind, room name or payload size.
        """
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        return self.logic.publish(room, parse_kind(kind), payload, sender=sender,
                                  priority=priority)

    def room_info(self, room: str) -> dict:
        epoch, seq = self.logic.head(room)
        r = self.hub.rooms.get(room)
        info = {"room": room, "epoch": epoch, "last_seq": seq, "online": 0}
        if r is not None:
            info.update(r.stats())
            info["online"] = len(r)
        return info

    def stats(self) -> dict:
        rooms = self.hub.rooms.values() if self.hub is not None else ()
        return {
            "connections": len(self.sessions),
            "rooms": len(self.hub.rooms) if self.hub is not None else 0,
            "flushes": self.hub.flushes if self.hub is not None else 0,
            "frames_built": sum(r.frames_built for r in rooms),
            "deliveries": sum(r.deliveries for r in rooms),
            "counters": dict(self.counters),
        }


def install_loop(kind: str) -> None:
    if kind == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(config: NodeConfig) -> None:
    import signal

    node = Node(config)
    await node.start()
    host, port = node.address
    print(f"fanout node listening on {host}:{port}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(node.stop()))
    await node.serve_forever()


def run(config: NodeConfig) -> None:
    """Run a node until SIGINT/SIGTERM (the ``fanout node`` command)."""
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_loop(config.loop)
    asyncio.run(_serve(config))
