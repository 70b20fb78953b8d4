"""A fan-out node: its sessions, its rooms and broadcast hub, and its life
from start to drain.

The node is assembled by the composition root (:mod:`fanout.server.app`),
which hands it its metrics, bus and logic. It owns:

* the :class:`~.listener.Listener` (the client port) and the registry of
  :class:`~.session.Session`\\ s it creates, with their timeouts;
* the compiled :class:`fanout._core.Hub` and the :class:`~.rooms.RoomTable`
  of rooms held here;
* the :class:`~.overload.OverloadControl` fed by a :class:`~.overload.LagProbe`;
* the publish facade for services in the same process and the admin API.
"""

from __future__ import annotations

import asyncio
import fcntl
import heapq
import itertools
import logging
import os
import random
import struct
import termios
import time

from .. import _core
from ..bus.base import Bus
from ..logic.base import Logic, Rejected, check_name, check_room_name
from ..logic.revocations import covers
from ..protocol import cluster_pb2 as cpb
from ..protocol import fanout_pb2 as pb
from ..protocol.auth import MAX_SUB_BYTES
from ..protocol.channels import PREFIX as CHANNEL_PREFIX
from ..protocol.channels import is_channel, user_channel
from ..protocol.wire import KIND_CODES, KIND_NAMES, record_json
from . import eager, tlsconf
from .config import NodeConfig
from .listener import Listener
from .logutil import ThrottledLog
from .metrics import NodeMetrics
from .overload import LagProbe, OverloadControl, TimedInput
from .channels import ChannelTable
from .rooms import RoomTable
from .session import Session

log = logging.getLogger("fanout.node")

SWEEP_INTERVAL = 1.0        # seconds between overload checks; the longest from a
                            # session's timeout to its check
SWEEP_SLICES = 20           # timeout-check slices per SWEEP_INTERVAL (_sweep_slice)
PASS_SLICES = 10            # slices a pass over every session takes at most
ROOM_SWEEP_INTERVAL = 10.0  # seconds between sweeps of idle rooms
PRESENCE_SPREAD = 0.8       # share of the presence interval the rooms' frames are spread over
PRESENCE_STEP = 0.01        # shortest time between two rooms' presence frames, seconds
AUTH_BURST = 20             # auth failures per sweep that make a warning
DELAY_FACTOR = (1, 2, 4)    # flush window multiplier per degradation level


def _kernel_unsent(fd: int) -> int:
    """Bytes in the socket's kernel send queue that the peer has not
    acknowledged (Linux SIOCOUTQ); 0 where that cannot be read."""
    if fd < 0:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _message_json(item) -> dict:
    """A stored record as the admin API shows it."""
    msg, out = record_json(item[3])
    return {**out, "epoch": item[1], "priority": msg.priority}


def parse_kind(kind: int | str) -> int:
    """``"gift"``/``pb.GIFT`` -> ``pb.GIFT``; raises Rejected(BAD_REQUEST)."""
    if isinstance(kind, str):
        value = KIND_CODES.get(kind.lower())
        if value is None:
            raise Rejected(pb.BAD_REQUEST, f"unknown kind {kind!r}; use chat, gift or system")
        return value
    if kind not in KIND_NAMES:
        raise Rejected(pb.BAD_REQUEST, f"unknown kind {kind!r}")
    return kind


class Node:
    """One fan-out node.

    :param config: validated :class:`~fanout.server.config.NodeConfig`.
    :param metrics: the node's :class:`~fanout.server.metrics.NodeMetrics`.
    :param bus: where room messages arrive from.
    :param logic: the business rules (seqs, limits, logins).
    """

    def __init__(self, config: NodeConfig, *, metrics: NodeMetrics, bus: Bus,
                 logic: Logic) -> None:
        self.config = config
        self.ws_origins = config.allowed_origins()
        self.websocket_sessions = 0              # sessions past their WebSocket handshake
        self.metrics = metrics
        self.bus = bus
        self.logic = logic
        self.sessions: dict[str, Session] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.hub: _core.Hub | None = None
        self.rooms: RoomTable | None = None
        self.channels: ChannelTable | None = None
        self.listener: Listener | None = None
        self.draining = False
        self.throttled = ThrottledLog(log)
        self.overload = OverloadControl(
            lag_degraded_ms=config.lag_degraded_ms, lag_overloaded_ms=config.lag_overloaded_ms,
            backlog_degraded_bytes=config.backlog_degraded_bytes, on_change=self._degrade,
            delay_degraded_ms=config.delay_degraded_ms,
            delay_overloaded_ms=config.delay_overloaded_ms)
        self._delay_mark = (0.0, 0)      # the hub's (delay_seconds, delayed_messages) at the last tick
        self._probe: LagProbe | None = None
        self._ids = itertools.count(1)
        self._tag = os.urandom(3).hex()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._stopped: asyncio.Future | None = None
        self._drain_task: asyncio.Task | None = None
        #: After a drain: connections closed during it or at its deadline
        #: with data they had not taken (0: a clean drain).
        self.undelivered = 0
        self._at_deadline = False
        self._auth_failures = 0
        self._last_room_sweep = 0.0
        # The timeout checks' pass in progress (_sweep_slice): the sessions
        # it visits and their number, the next one's index, how many a slice
        # visits, and the draining backlog summed so far; _backlog is the
        # last complete pass's.
        self._pass: list[Session] = []
        self._pass_size = 0
        self._pass_at = 0
        self._pass_step = 0
        self._pass_backlog = 0
        self._backlog = 0
        self._shared_presence: set[str] = set()     # rooms with members at the last share
        self._presence_due: list[str] = []          # rooms to get this period's count, and
        self._presence_at = 0                       # the next one's index
        self._presence_per_step = 1                 # rooms per step, and the time between steps
        self._presence_gap = 0.0
        metrics.add_gauges(self._gauges)
        if config.tls_enabled:
            tlsconf.export_metrics(metrics)
        # The other nodes reach this one through the bus (no-ops alone).
        bus.on_control = self._control
        bus.on_presence_query = self._presence_page

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Bind the client port and start serving."""
        cfg = self.config
        self.loop = loop = asyncio.get_running_loop()
        _core.set_compress_dict(cfg.compress_dict)     # process-wide: frames are shared
        self.hub = _core.Hub(loop, max_delay=cfg.max_delay_ms / 1000,
                             max_batch_bytes=cfg.max_batch_bytes,
                             compress_min=cfg.compress_min,
                             compress_level=cfg.compress_level, ring_size=cfg.ring_size,
                             ring_bytes=cfg.ring_bytes, write_threads=cfg.writer_threads(),
                             thread_min_members=cfg.write_thread_min_members)
        self.hub.flush_observer = self.metrics.observe_flush
        self.metrics.track_delivery_latency(self.hub)
        self.overload.work_clock = lambda: self.hub.flush_seconds
        self.hub.error_handler = lambda where, exc: self.throttled.log(
            logging.ERROR, "core-fault", "internal error in the core at %r: %r", where, exc,
            exc_info=exc)
        self.rooms = RoomTable(self.hub, self.bus, self.logic, ring_size=cfg.ring_size)
        self.channels = ChannelTable(self.rooms)
        self.listener = Listener(cfg, loop, on_connection=self._accepted,
                                 connection_count=self.sessions.__len__, metrics=self.metrics,
                                 throttled=self.throttled, tls=tlsconf.make_context(cfg))
        self._stopped = loop.create_future()
        # Timers start last: start-up work must not read as event-loop lag.
        self._every(SWEEP_INTERVAL, self._sweep)
        self._every(SWEEP_INTERVAL / SWEEP_SLICES, self._sweep_slice)
        self._probe = LagProbe(loop, self._lag_sample)
        if cfg.presence_interval_ms:
            self._every(cfg.presence_interval_ms / 1000, self._presence)
        host, port = self.address
        log.info("listening on %s:%d (loop %s)", host, port, type(loop).__module__)

    def _every(self, interval: float, callback) -> None:
        """Run ``callback`` every ``interval`` seconds until the node stops."""
        name = callback.__name__

        def tick():
            # Rescheduled whatever the callback does: one exception must not
            # stop timeouts, overload control or presence for good.
            try:
                callback()
            except Exception:
                self.throttled.log(logging.ERROR, f"timer {name}", "timer %s failed", name,
                                   exc_info=True)
            finally:
                if not self._stopped.done():
                    self._timers[name] = self.loop.call_later(interval, tick)
        self._timers[name] = self.loop.call_later(interval, tick)

    def _later(self, delay: float, callback) -> None:
        """Run ``callback`` once in ``delay`` seconds, unless the node stops
        first, in place of a call of it still pending; a failure is logged
        like a timer's."""
        name = callback.__name__
        pending = self._timers.pop(name, None)
        if pending is not None:
            pending.cancel()

        def run():
            self._timers.pop(name, None)
            try:
                callback()
            except Exception:
                self.throttled.log(logging.ERROR, f"timer {name}", "timer %s failed", name,
                                   exc_info=True)
        if not self._stopped.done():
            self._timers[name] = self.loop.call_later(delay, run)

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.address

    @property
    def ws_address(self) -> tuple[str, int] | None:
        """The WebSocket port's ``(host, port)``; None when it is off."""
        return self.listener.ws_address

    @property
    def tls_address(self) -> tuple[str, int] | None:
        """The TCP+TLS port's ``(host, port)``; None when it is off."""
        return self.listener.tls_address

    @property
    def wss_address(self) -> tuple[str, int] | None:
        """The WebSocket-over-TLS port's ``(host, port)``; None when it is off."""
        return self.listener.wss_address

    @property
    def degradation_level(self) -> int:
        return self.overload.level

    @property
    def loop_lag(self) -> float:
        """Mean event-loop lag over the last second, seconds."""
        return self.overload.loop_lag

    @property
    def ready(self) -> bool:
        """Whether to send this node new clients: not draining, not
        overloaded, and (in a cluster) its bus and routers reachable."""
        return (not self.draining and self.overload.level < 2 and self.bus.connected
                and self.logic.reachable)

    def not_ready_because(self) -> list[str]:
        """Why :attr:`ready` is False (empty when it is True)."""
        why = []
        if self.draining:
            why.append("draining")
        if self.overload.level >= 2:
            why.append("overloaded")
        if not self.bus.connected:
            why.append("bus unreachable")
        elif not self.logic.reachable:
            why.append("router unreachable")
        return why

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
        once. Waits up to ``drain_grace_ms`` for clients to leave: that one
        deadline governs every connection (a kicked client has no shorter
        close grace of its own). A connection still holding data it was sent
        at the deadline is logged by name and counted in
        :attr:`undelivered`; ``fanout node`` then exits non-zero.
        """
        if self.draining:
            if self._drain_task is not None and self._drain_task is not asyncio.current_task():
                await asyncio.shield(self._drain_task)
            return
        if self.listener is None:            # never started (or failed to): nothing to drain
            self.draining = True
            return
        cfg = self.config
        self.draining = True
        self.metrics.draining.set(1)
        log.warning("draining: %d connections, %d rooms", len(self.sessions), len(self.rooms))
        loop = self.loop
        try:
            self.listener.close()
            self.hub.flush()
            # Everything flushed is written (or queued on its connection)
            # before the Kick is queued behind it: a frame still waiting for
            # its room's write round would find its members closing.
            self.hub.settle()
            jitter = cfg.drain_jitter_ms
            for session in list(self.sessions.values()):
                session.kick(pb.SERVER_SHUTDOWN, "node is draining; reconnect elsewhere",
                             reconnect_after_ms=random.randint(0, jitter), drop_queued=False)
            # One deadline for everything: a kicked session has no close grace
            # of its own here, so a slow reader gets until the deadline to take
            # what it was sent.
            deadline = loop.time() + (cfg.drain_grace_ms / 1000 if grace is None else grace)
            while self.sessions and loop.time() < deadline:
                await asyncio.sleep(0.02)
        except Exception:
            log.exception("drain failed; closing every connection now")
            self.undelivered += len(self.sessions)
        finally:
            # Whatever happened above, the node stops: a drain that raised
            # must not leave the process serving nothing forever.
            self.undelivered += self._close_undelivered()
            if self.undelivered:
                log.error("drain not clean: %d connections did not take everything they were "
                          "sent", self.undelivered)
            for timer in self._timers.values():
                timer.cancel()
            if self._probe is not None:
                self._probe.stop()
            try:
                await self.rooms.close()
            finally:
                self.hub.close()             # the writer threads
                if not self._stopped.done():
                    self._stopped.set_result(None)
        log.info("drained and stopped")

    def _close_undelivered(self) -> int:
        """At the drain deadline: close every connection still open, logging
        by name each one that has not taken everything it was sent (its
        backlog, or bytes still in its kernel send queue). Returns how many."""
        if not self.sessions:
            return 0
        log.warning("drain deadline: closing %d connections still open", len(self.sessions))
        undelivered = 0
        self._at_deadline = True          # counted here, not again as each one closes
        for session in list(self.sessions.values()):
            conn = session.conn
            queued, in_kernel = conn.backlog_bytes, _kernel_unsent(conn.fd)
            if queued or in_kernel:
                undelivered += 1
                log.warning("drain: closing session %s (user %r, peer %s:%s) with undelivered "
                            "data: backlog %d bytes, %d more in the kernel", session.id,
                            session.user, session.peer_host, session.peer_port, queued, in_kernel)
            conn.close()
        return undelivered

    # ---------------------------------------------------------------- sessions

    def _accepted(self, conn: _core.Connection, peer) -> Session:
        session_id = f"{self._tag}-{next(self._ids)}"
        session = self.sessions[session_id] = Session(self, conn, peer[:2], session_id)
        log.debug("accepted %s from %s", session_id, peer[:2])
        return session

    def input_callback(self, on_readable):
        # Client input is timed so that it does not count as the node's own
        # load (overload.py).
        return TimedInput(on_readable, self.overload)

    def session_authenticated(self, session: Session) -> None:
        self.listener.authenticated(session)
        self.bus.event("connect", {"user": session.user, "session": session.id,
                                   "device_class": session.device_class,
                                   "peer": session.peer_host})

    def websocket_upgraded(self) -> None:
        self.websocket_sessions += 1
        self.metrics.websocket_upgrades.inc()

    def session_closed(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is not None:
            self.listener.release(session)
            if getattr(session.conn, "upgraded", False):
                self.websocket_sessions -= 1
            if session.user is not None:
                if session.end_reason:
                    self.bus.event("kick", {"user": session.user, "session": session.id,
                                            "reason": pb.Reason.Name(session.end_reason)})
                self.bus.event("disconnect", {"user": session.user, "session": session.id})
            unsent = session.conn.unsent_at_close
            if self.draining and unsent and not self._at_deadline:
                # Cut during the drain (a slow consumer, a flood while
                # closing, the peer gone) with accepted messages unsent.
                self.undelivered += 1
                log.warning("drain: session %s (user %r, peer %s:%s) closed with %d bytes "
                            "undelivered", session.id, session.user, session.peer_host,
                            session.peer_port, unsent)

    def kick(self, session_id: str, reason: int, message: str) -> bool:
        """Kick a session, on this node or (in a cluster) wherever it is.
        Returns whether it was on this node."""
        session = self.sessions.get(session_id)
        if session is None:
            self._broadcast(cpb.Control(op=cpb.Control.KICK_SESSION, session=session_id,
                                        reason=reason, message=message))
            return False
        session.kick(reason, message)
        return True

    @property
    def clustered(self) -> bool:
        """Whether other nodes share this node's rooms and users (``--nats``)."""
        return bool(self.config.nats)

    async def disconnect_user(self, user: str, message: str = "") -> int:
        """Close every connection of ``user`` with Kick(ADMIN_DISCONNECT),
        on this node and (in a cluster) on every other. Returns how many
        were closed here; the other nodes close theirs as the command
        reaches them.

        :raises Rejected: ``UNAVAILABLE``: the other nodes could not be told
            (the bus is unreachable); this node's connections are closed.
        """
        message = message or "disconnected by the server"
        here = self._disconnect_here(user, message)
        if self.clustered:
            await self._tell_cluster(cpb.Control(op=cpb.Control.DISCONNECT_USER, user=user,
                                                 message=message),
                                     f"closed {here} connection(s) of the user on this node")
        return here

    async def _tell_cluster(self, control: cpb.Control, done_here: str) -> None:
        # A command the caller waits for: refused explicitly rather than
        # left in the client's buffer while the bus is away.
        if not self.bus.connected:
            raise Rejected(pb.UNAVAILABLE, f"{done_here}, but the cluster bus is unreachable "
                                           "and the other nodes were not told; retry")
        try:
            await self.bus.broadcast(control)
        except Exception as exc:
            raise Rejected(pb.UNAVAILABLE, f"{done_here}, but telling the other nodes failed "
                                           f"({type(exc).__name__}); retry") from None

    def _disconnect_here(self, user: str, message: str) -> int:
        victims = [s for s in self.sessions.values() if s.user == user and not s.closing]
        for session in victims:
            session.kick(pb.ADMIN_DISCONNECT, message)
        return len(victims)

    async def revoke(self, user: str, before: float) -> int:
        """Refuse ``user``'s tokens issued before ``before`` (unix seconds),
        from now on (the logic's rule) and on the live connections of every
        node, which get Kick(TOKEN_REVOKED). Returns how many were kicked here."""
        await self.logic.revoke(user, before)
        here = self._revoke_here(user, before)
        if self.clustered:
            await self._tell_cluster(cpb.Control(op=cpb.Control.REVOKE_USER, user=user,
                                                 before=before),
                                     f"revoked, and kicked {here} connection(s) on this node")
        return here

    def _revoke_here(self, user: str, before: float) -> int:
        victims = [s for s in self.sessions.values()
                   if s.user == user and not s.closing and covers(before, s.claims.issued_at)]
        for session in victims:
            session.kick(pb.TOKEN_REVOKED, "this user's token was revoked")
        return len(victims)

    def _broadcast(self, control: cpb.Control) -> None:
        eager.spawn(self.bus.broadcast(control), f"control {control.op}", log)

    def _control(self, control: cpb.Control) -> None:
        """A command from another node."""
        if control.op == cpb.Control.KICK_SESSION:
            session = self.sessions.get(control.session)
            if session is not None:
                session.kick(control.reason, control.message)
        elif control.op == cpb.Control.DISCONNECT_USER:
            self._disconnect_here(control.user, control.message)
        elif control.op == cpb.Control.REVOKE_USER:
            self._revoke_here(control.user, control.before)
        elif control.op == cpb.Control.WAKE_CHANNEL and self.channels is not None:
            if self.channels.waiting(control.user):
                eager.spawn(self.channels.wake(control.user), "waking a user's channel", log)

    def _presence_page(self, query: cpb.PresenceQuery) -> cpb.PresencePage:
        """This node's members of a room: the count, and up to ``limit``
        users sorting after ``after`` (an admin question, not per message)."""
        room = self.rooms.get(query.room) if self.rooms is not None else None
        page = cpb.PresencePage()
        if is_channel(query.room):
            # A channel's members are the user's connections, waiting ones too.
            user = query.room[len(CHANNEL_PREFIX):]
            here = sum(1 for s in self.sessions.values() if s.user == user and (
                query.room in s.rooms or s.channel_wait is not None))
            if here:
                page.online = here
                if user > query.after and query.limit:
                    page.users.append(user)
            return page
        if room is None or not len(room):
            return page
        users = {s.user for s in self.sessions.values()
                 if s.user is not None and s.user > query.after and query.room in s.rooms}
        page.online = len(room)
        page.users.extend(sorted(users)[:query.limit])
        return page

    async def presence(self, room: str, after: str = "", limit: int = 100) -> dict:
        """Who is in ``room`` across the cluster: the online count (member
        connections on every node that answered) and a page of up to
        ``limit`` users, sorted, after the cursor ``after``. ``next`` is the
        cursor of the following page, present while there may be one."""
        check_room_name(room)
        pages = [self._presence_page(cpb.PresenceQuery(room=room, after=after, limit=limit))]
        if self.clustered and not self.bus.connected:
            raise Rejected(pb.UNAVAILABLE, "the cluster bus is unreachable: only this node's "
                                           "members are known; retry")
        pages += await self.bus.gather_presence(room, after, limit)
        # Each node sent its first ``limit`` users after the cursor, so the
        # first ``limit`` of the union are the cluster's.
        users = sorted({u for page in pages for u in page.users})[:limit]
        result = {"room": room, "online": sum(page.online for page in pages),
                  "nodes": sum(1 for page in pages if page.online), "users": users}
        if users and len(users) == limit:
            result["next"] = users[-1]
        return result

    async def history(self, room: str, since: int | None = None, limit: int = 100) -> dict:
        """The room's messages: the last ``limit``, or the first ``limit``
        after seq ``since``, from the cluster's history (JetStream), else
        from this node's ring. ``next`` (with ``since``) is the ``since`` of
        the following page, present while there are more.

        :raises Rejected: ``BAD_REQUEST`` (room name), ``UNAVAILABLE`` (the
            history stream is unreachable).
        """
        check_room_name(room)
        try:
            stored = await self.bus.history(room, since or 0)
        except Exception as exc:
            raise Rejected(pb.UNAVAILABLE, f"the room's history is unreachable "
                                           f"({type(exc).__name__}); retry") from None
        if stored is None:                 # no cluster history: this node's ring
            held = self.rooms.get(room)
            stored = ([(0, held.epoch, seq, record, False)
                       for seq, record in held.records(since or 0)] if held is not None else [])
        items = list(stored)
        epoch = items[-1][1] if items else ""
        # Seqs number one epoch: a record left from an earlier one is not
        # part of the room's current history.
        items = [item for item in items if item[1] == epoch]
        result: dict = {"room": room, "epoch": epoch}
        if since is None:
            items = items[-limit:]
        elif len(items) > limit:
            items = items[:limit]
            result["next"] = items[-1][2]
        result["messages"] = [_message_json(item) for item in items]
        return result

    def _presence(self) -> None:
        """Each presence interval: share this node's counts with the
        cluster, and push every room's count to its members. A room that
        emptied here is shared once more with 0, so the other nodes drop
        this node's members now rather than when the count goes stale."""
        # Users' channels have no audience to show a count to.
        counts = {name: len(room) for name, room in self.hub.rooms.items()
                  if len(room) and not is_channel(name)}
        shared = dict(counts)
        for name in self._shared_presence - counts.keys():
            shared[name] = 0
        self._shared_presence = set(counts)
        eager.spawn(self.bus.share_presence(shared), "presence", log)
        # The members' frames are spread over the period, a few rooms at a
        # time: all at once, 100 rooms of 100 members were 10,000 sends in
        # one loop turn, a stall of tens of ms for every other room.
        self._presence_due = list(counts)
        self._presence_at = 0
        steps = max(1, int(self.config.presence_interval_ms / 1000 * PRESENCE_SPREAD
                           / PRESENCE_STEP))
        self._presence_per_step = -(-len(counts) // steps)
        self._presence_gap = (self.config.presence_interval_ms / 1000 * PRESENCE_SPREAD
                              * self._presence_per_step / max(1, len(counts)))
        self._presence_rooms()

    def _presence_rooms(self) -> None:
        """One step of the presence period: the next rooms' members get
        their count (counted now), and the next step is set."""
        start = self._presence_at
        self._presence_at = end = start + self._presence_per_step
        if end < len(self._presence_due):
            self._later(self._presence_gap, self._presence_rooms)
        for name in self._presence_due[start:end]:
            self.rooms.send_presence(name, self.bus.online)

    def auth_failed(self, reason: int) -> None:
        self.metrics.auth_failures.labels(pb.Reason.Name(reason)).inc()
        self._auth_failures += 1

    def write_backlog_bytes(self) -> int:
        return sum(s.conn.backlog_bytes for s in self.sessions.values())

    def _delivery_delay(self) -> float:
        """Mean seconds a message delivered since the last call waited
        between its batch's start and the end of its write."""
        hub = self.hub
        seconds, messages = self._delay_mark
        self._delay_mark = (hub.delay_seconds, hub.delayed_messages)
        n = hub.delayed_messages - messages
        return (hub.delay_seconds - seconds) / n if n else 0.0

    def _sweep_slice(self) -> None:
        """One slice of the pass that checks every session's timeouts (idle,
        token expiry) and sums the backlogs that are draining.

        One scan of 10,000 sessions at once was a stall of several ms. A
        pass visits the sessions open at its start, ``_pass_step`` per
        slice: the larger of this pass's and the previous pass's size over
        PASS_SLICES. Passes run back to back. A session's index in the next
        pass is no larger (older sessions can only leave, new ones are added
        at the end), and that pass's step covers this pass's size, so two
        checks of one session are at most PASS_SLICES + 1 slices apart
        (0.55 s), and a session opened during a pass is first checked within
        2 * PASS_SLICES slices (1 s): within the one second the protocol
        promises (docs/protocol.md, heartbeats), as the single scan a second
        that this replaces."""
        if self._pass_at >= len(self._pass):
            self._backlog = self._pass_backlog
            self._pass_backlog = 0
            previous = self._pass_size
            self._pass = list(self.sessions.values())
            self._pass_size = len(self._pass)
            self._pass_at = 0
            self._pass_step = max(1, -(-max(previous, self._pass_size) // PASS_SLICES))
        start = self._pass_at
        self._pass_at = end = start + self._pass_step
        now = self.loop.time()
        cfg = self.config
        idle = cfg.idle_timeout_ms / 1000
        backlog = 0
        # A token lives until its exp plus the grace; checked here, so up to
        # one sweep interval later.
        expired = time.time() - cfg.token_grace_ms / 1000
        for session in self._pass[start:end]:
            if session.closing:
                continue
            conn = session.conn
            if conn.backlog_bytes and conn.bytes_sent != session.sent_mark:
                # Only backlogs that are draining count as the node's load: a
                # client that stops reading holds its own backlog up to its
                # bound, and many such clients must not degrade everyone.
                backlog += conn.backlog_bytes
            session.sent_mark = conn.bytes_sent
            if session.user is None:
                continue                  # the handshake deadline is the listener's
            # A Hello may have asked for its own ping interval: then its
            # idle timeout is the session's (one attribute read either way).
            limit = session.idle_s or idle
            if now - conn.last_recv > limit:
                session.kick(pb.HEARTBEAT_TIMEOUT, f"nothing received for {limit:g} s")
            elif session.claims.expires_at <= expired:
                session.kick(pb.TOKEN_EXPIRED, "the token expired and was not refreshed")
        self._pass_backlog += backlog
        if end >= len(self._pass):
            self._pass = []                 # closed sessions are not kept for a slice more

    def _sweep(self) -> None:
        """Once a second: overload control (from the last pass's backlog),
        the auth-failure warning, and the rooms to release or forget."""
        now = self.loop.time()
        cfg = self.config
        if self._auth_failures >= AUTH_BURST:
            self.throttled.warning("auth", "%d auth failures in the last second",
                                   self._auth_failures)
        self._auth_failures = 0
        # Frames built but waiting for their room's write round are load
        # too: the writer threads are behind.
        self.overload.tick(self._backlog + self.hub.waiting_bytes, self._delivery_delay())
        self.rooms.release_empty(cfg.room_release_s)
        if now - self._last_room_sweep > ROOM_SWEEP_INTERVAL:
            self._last_room_sweep = now
            self.rooms.sweep(cfg.room_idle_ttl_s)
            self.listener.forget_idle_addresses()

    # ---------------------------------------------------------------- overload

    def _lag_sample(self, lag: float) -> None:
        self.metrics.loop_lag.observe(lag)
        self.overload.add_lag(lag)

    def _degrade(self, level: int) -> None:
        self.metrics.degradation_level.set(level)
        self.hub.max_delay = self.config.max_delay_ms / 1000 * DELAY_FACTOR[level]
        self.logic.set_degradation(level)

    # ---------------------------------------------------------------- publishing

    async def publish(self, room: str, kind: int | str, payload: bytes | str, *,
                      sender: str = "system", priority: int = 0) -> int:
        """Publish a message to ``room`` from a service.

        :param kind: ``"chat"``, ``"gift"``, ``"system"`` or the ``pb.Kind`` value.
        :returns: the sequence number assigned to the message.
        :raises fanout.logic.base.Rejected: ``BAD_REQUEST`` (kind, room name),
            ``MESSAGE_TOO_LARGE``, ``ROOM_OVERLOADED`` (chat dropped by
            overload control) or ``DRAINING``.
        """
        if is_channel(room):
            # A service that passes on room names its users chose must not
            # become a way to push to any user: pushes name the user.
            raise Rejected(pb.BAD_REQUEST, "room names starting with '@' are users' channels; "
                                           "push to a user with 'user'")
        return await self._publish(room, kind, payload, sender=sender, priority=priority)

    async def _publish(self, room: str, kind: int | str, payload: bytes | str, *,
                       sender: str, priority: int) -> int:
        self._check_draining()
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        return await self.logic.publish(room, parse_kind(kind), payload, sender=sender,
                                        priority=priority)

    async def push(self, user: str, kind: int | str, payload: bytes | str, *,
                   sender: str = "system", priority: int = 0) -> int:
        """Publish a message to every connection of ``user``, on any node:
        to its channel (docs/protocol.md, section 5.10). Like
        :meth:`publish`; the seq is the channel's."""
        self._check_draining()            # before a channel is opened for nothing
        self._check_channel(user)
        name = user_channel(user)
        # Connections waiting here join before the message is published, so
        # it reaches them live; other nodes' join once it is stored.
        await self.channels.wake(user)
        seq = await self._publish(name, kind, payload, sender=sender, priority=priority)
        if self.clustered:
            self._broadcast(cpb.Control(op=cpb.Control.WAKE_CHANNEL, user=user))
        return seq

    def _check_draining(self) -> None:
        if self.draining:
            raise Rejected(pb.DRAINING, "node is draining; publish to another node")

    def _check_channel(self, user: str) -> None:
        if not self.config.user_channels:
            raise Rejected(pb.BAD_REQUEST, "user channels are off on this node "
                                           "(user_channels = 0)")
        check_name(user, "user", MAX_SUB_BYTES)

    async def room_info(self, room: str) -> dict:
        """Online count, sequence and recent rates of ``room`` on this node.
        Looking creates nothing: an unknown room reads as empty."""
        check_room_name(room)
        head = await self.logic.head(room)
        if head is None:
            return {"room": room, "epoch": "", "online": 0, "last_seq": 0}
        held = self.rooms.get(room)
        info = {"room": room, "epoch": head.epoch, "online": len(held) if held is not None else 0,
                "last_seq": head.seq}
        stats = await self.logic.room_stats(room)
        if stats is not None:
            info.update(stats)
        return info

    def room_list(self, after: str = "", limit: int = 100) -> dict:
        """A page of the rooms this node holds, by name after ``after``: each
        with its members here, epoch and last seq. ``next``: the cursor of the
        next page, or None. A partial sort (O(rooms x log limit)), so a page
        costs the same wherever it starts."""
        if after:
            check_room_name(after)
        held = self.rooms.hub.rooms if self.rooms is not None else {}
        # Users' channels are left out: one per user pushed to would bury
        # the rooms (GET /v1/rooms/@<user> shows one).
        rooms = [name for name in held if not is_channel(name)]
        names = heapq.nsmallest(limit + 1, (name for name in rooms if name > after))
        page = [{"room": name, "online": len(held[name]), "epoch": held[name].epoch,
                 "last_seq": held[name].last_seq} for name in names[:limit]]
        return {"rooms": page, "total": len(rooms), "channels": len(held) - len(rooms),
                "next": names[limit - 1] if len(names) > limit else None}

    def _gauges(self):
        if self.hub is None:
            return
        yield "fanout_connections", "Open client connections", len(self.sessions)
        yield ("fanout_websocket_connections", "Open client connections over WebSocket (in "
               "fanout_connections too)", self.websocket_sessions)
        # One pass per scrape (about 30 ns a room), not a count kept per open.
        channels = sum(1 for name in self.hub.rooms if is_channel(name))
        yield "fanout_rooms", "Rooms held by this node (users' channels not counted)", \
            len(self.hub.rooms) - channels
        yield ("fanout_user_channels", "Users' channels open on this node (pushed to while "
               "the user had a connection here, or being resumed)", channels)
        yield ("fanout_write_backlog_bytes", "Unsent bytes queued across all connections",
               self.write_backlog_bytes())
        yield ("fanout_event_loop_lag_last_seconds", "Mean event-loop lag over the last second",
               self.overload.loop_lag)
