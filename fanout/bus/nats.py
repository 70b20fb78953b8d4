"""The cluster bus: where a room message crosses from a router to every node
that holds the room, over NATS (docs/cluster.md).

A router appends each message to the JetStream history stream; the stream
republishes it, once stored, on ``fanout.room.<room token>``. A node
subscribes to that subject while it holds the room and to nothing else, so
NATS sends it only the rooms it has members in (interest-based delivery:
goim's comets get every room). The record is the router's encoding; the node
hands the received bytes to its hub as they are.

Republished messages are core NATS: one can be missed (a reconnect to
another server, a slow-consumer drop). Every message carries the room's seq,
so a hole shows on the next one; the feed then holds what arrives, reads the
missing seqs from the history stream and delivers everything in order. After
a reconnect every feed checks the stream for messages it missed while no
message came. Only history that JetStream no longer has becomes a hole the
hub turns into the clients' explicit Gap.

The same connection carries the node's other cluster traffic: control
commands every node acts on (kick, disconnect, revoke), per-room presence
counts, the admin API's presence questions, and the event log.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from typing import Callable

from ..cluster import history
from ..cluster import subjects as S
from ..cluster.connect import ClusterSettings, close_quietly, connect, provision
from ..cluster.journal import Journal, JournalError
from ..protocol import cluster_pb2 as cpb
from .base import Handler

log = logging.getLogger("fanout.bus.nats")


class _Feed:
    """One room's subscription and where its delivery stands."""

    __slots__ = ("room", "handlers", "sub", "epoch", "seq", "stream_seq", "held", "filling")

    def __init__(self, room: str) -> None:
        self.room = room
        self.handlers: list[Handler] = []
        self.sub = None
        self.epoch = ""
        self.seq: int | None = None         # last delivered (None: nothing yet)
        self.stream_seq = 0
        self.held: list[history.Stored] = []   # arrived while a hole is being filled
        self.filling: asyncio.Task | None = None


class NatsBus:
    """:param servers: NATS URL(s), comma-separated.
    :param node_id: this node's name in presence and control messages.
    :param settings: what the streams keep (provisioned on start).
    """

    def __init__(self, servers: str, *, node_id: str = "",
                 settings: ClusterSettings | None = None, request_timeout: float = 2.0,
                 presence_ttl: float = 5.0) -> None:
        self.servers = servers
        self.node_id = node_id
        self.settings = settings or ClusterSettings()
        self.request_timeout = request_timeout
        self.presence_ttl = presence_ttl
        self.nc = None
        self.journal: Journal | None = None
        self._feeds: dict[str, _Feed] = {}
        self._presence: dict[str, dict[str, tuple[int, float]]] = {}   # room -> node -> (n, until)
        self._presence_subs: dict[str, object] = {}
        self._tasks: set[asyncio.Task] = set()
        self.on_control: Callable[[cpb.Control], None] | None = None
        self.on_presence_query: Callable[[cpb.PresenceQuery], cpb.PresencePage] | None = None
        #: Holes filled from history / holes history could not fill.
        self.holes_filled = 0
        self.holes_lost = 0
        #: Room messages and their bytes received, ever (the node's metrics).
        self.messages_received = 0
        self.bytes_received = 0
        self._events: list[tuple[str, bytes]] = []   # sent at the end of this loop tick

    # ------------------------------------------------------------ lifecycle

    #: JetStream holds every room's history (fanout.cluster.history).
    keeps_history = True

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def start(self) -> None:
        self.nc = await connect(self.servers, f"fanout-node {self.node_id}",
                                on_state=self._state)
        await provision(self.nc.jetstream(timeout=self.request_timeout), self.settings)
        self.journal = Journal(self.nc, ack_timeout=self.request_timeout)
        await self.journal.start()
        await self.nc.subscribe(S.CONTROL, cb=self._control)
        await self.nc.subscribe(S.ADMIN_PRESENCE, cb=self._presence_query)
        await self.nc.flush()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.journal is not None:
            await self.journal.close()
        await close_quietly(self.nc)
        self._feeds.clear()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _state(self, connected: bool) -> None:
        if connected:
            # Messages republished while this node was away are in the
            # history: every feed checks and fills.
            for feed in list(self._feeds.values()):
                if feed.filling is None:
                    feed.filling = self._spawn(self._catch_up(feed))

    # ------------------------------------------------------------ room feeds

    async def subscribe(self, room: str, handler: Handler) -> None:
        feed = self._feeds.get(room)
        if feed is None:
            feed = self._feeds[room] = _Feed(room)
            feed.handlers.append(handler)
            try:
                feed.sub = await self.nc.subscribe(
                    S.room_subject(room), cb=functools.partial(self._arrived, feed),
                    pending_msgs_limit=1_000_000, pending_bytes_limit=256 * 1024 * 1024)
                # Once the server has the SUB, every later message reaches us.
                await self.nc.flush(timeout=self.request_timeout)
                # Where the room stands now: the baseline that makes a hole
                # before the first message received show (and be filled).
                last = await history.last(self.nc, room, timeout=self.request_timeout)
                if feed.seq is None:
                    if last is None:
                        feed.epoch, feed.seq = None, 0          # adopt the first epoch seen
                    else:
                        feed.epoch, feed.seq, feed.stream_seq = last.epoch, last.seq, last.stream_seq
            except BaseException:
                if self._feeds.get(room) is feed:
                    del self._feeds[room]
                    if feed.sub is not None:
                        await self._unsub(feed.sub)
                raise
        else:
            feed.handlers.append(handler)

    async def unsubscribe(self, room: str, handler: Handler) -> None:
        feed = self._feeds.get(room)
        if feed is None or handler not in feed.handlers:
            return
        feed.handlers.remove(handler)
        if not feed.handlers:
            del self._feeds[room]
            if feed.filling is not None:
                feed.filling.cancel()
            await self._unsub(feed.sub)

    @staticmethod
    async def _unsub(sub) -> None:
        try:
            await sub.unsubscribe()
        except Exception:                 # the connection is gone: so is the SUB
            pass

    async def _arrived(self, feed: _Feed, msg) -> None:
        item = history.stored(msg)
        if item is None:
            return
        self.messages_received += 1
        self.bytes_received += len(item.record)
        self._offer(feed, item)

    def _offer(self, feed: _Feed, item: history.Stored) -> None:
        if feed.epoch is None and feed.seq == 0:
            feed.epoch = item.epoch               # the room had no history at subscribe
        if feed.filling is not None:
            feed.held.append(item)
        elif feed.seq is None or item.epoch != feed.epoch or item.seq == feed.seq + 1:
            self._deliver(feed, item)
        elif item.seq > feed.seq:
            feed.held.append(item)
            feed.filling = self._spawn(self._fill(feed, item.seq - 1))
        # else: a seq delivered already (a copy): dropped

    def _deliver(self, feed: _Feed, item: history.Stored) -> None:
        feed.epoch, feed.seq = item.epoch, item.seq
        if item.stream_seq:
            feed.stream_seq = item.stream_seq
        for handler in feed.handlers:
            handler(feed.room, item.epoch, item.seq, item.record, item.sampled)

    async def _fill(self, feed: _Feed, until: int) -> None:
        """Deliver seqs feed.seq+1..until from the history, then what was
        held meanwhile."""
        try:
            missing = await self._read_hole(feed, until)
            for item in missing:
                if item.epoch == feed.epoch and item.seq == feed.seq + 1:
                    self._deliver(feed, item)
            if feed.seq < until:
                # The stream stores a room's messages in order and a later
                # one is stored: these never will be (an append refused
                # while later ones went through) or were trimmed. Skipping
                # them, rather than asking again for ever with the room's
                # messages held, lets the hub see the jump and the members
                # get their Gap.
                self.holes_lost += 1
                log.warning("room %r: seqs %d-%d are not in the history; members see a gap",
                            feed.room, feed.seq + 1, until)
                feed.seq = until
            else:
                self.holes_filled += 1
        finally:
            self._release_held(feed)

    async def _read_hole(self, feed: _Feed, until: int) -> list[history.Stored]:
        """Seqs feed.seq+1..until as the history has them. A failed read
        (NATS reconnecting, the stream's leader moving) is not a loss: it
        is tried again, less and less often, with the room's messages held."""
        pause = 0.05
        while True:
            try:
                return await history.read(self.nc, feed.room,
                                          from_stream_seq=feed.stream_seq + 1,
                                          after_seq=feed.seq, until_seq=until,
                                          timeout=self.request_timeout)
            except Exception as exc:
                log.warning("room %r: could not read seqs %d-%d from the history (%r); "
                            "trying again in %g s", feed.room, feed.seq + 1, until, exc, pause)
            await asyncio.sleep(pause)
            pause = min(2 * pause, 2.0)

    def _release_held(self, feed: _Feed) -> None:
        feed.filling = None
        held, feed.held = feed.held, []
        if self._feeds.get(feed.room) is not feed:
            return                        # unsubscribed meanwhile: no new fill for it
        for item in held:
            self._offer(feed, item)

    async def _catch_up(self, feed: _Feed) -> None:
        """After a reconnect: deliver what the history has past feed.seq."""
        try:
            last = await history.last(self.nc, feed.room, timeout=self.request_timeout)
        except Exception:
            last = None
        if last is None or feed.seq is None or last.epoch != feed.epoch or last.seq <= feed.seq:
            self._release_held(feed)
            return
        await self._fill(feed, last.seq)

    async def publish(self, room: str, epoch: str, seq: int, record: bytes,
                      sampled: bool = False) -> None:
        """Store the message in the history stream (which republishes it to
        every node holding the room). Returns once JetStream acknowledged it.

        :raises JournalError: not stored (or unknown: a timeout).
        """
        ack = await self.journal.store(room, epoch, seq, record, sampled)
        if ack.duplicate:
            raise JournalError(f"room {room!r} seq {seq} of epoch {epoch} is stored already")

    async def history(self, room: str, after_seq: int = 0) -> list[history.Stored]:
        """The room's stored messages after ``after_seq``, oldest first."""
        return await history.read(self.nc, room, after_seq=after_seq,
                                  timeout=self.request_timeout)

    # ------------------------------------------------------------ control

    async def broadcast(self, control: cpb.Control) -> None:
        """Send a command to every other node."""
        control.origin = self.node_id
        await self.nc.publish(S.CONTROL, control.SerializeToString())

    async def _control(self, msg) -> None:
        try:
            control = cpb.Control.FromString(msg.data)
        except Exception:
            return
        if control.origin != self.node_id and self.on_control is not None:
            self.on_control(control)

    # ------------------------------------------------------------ presence

    async def share_presence(self, counts: dict[str, int]) -> None:
        """This node's member count of each room it holds, to every node
        holding the room: one message per room per interval, whatever the
        joins and leaves were."""
        ttl_ms = int(self.presence_ttl * 1000)
        now = time.monotonic()
        for room, online in counts.items():
            seen = self._presence.setdefault(room, {})
            seen[self.node_id] = (online, now + self.presence_ttl)
            if room not in self._presence_subs:
                self._presence_subs[room] = await self.nc.subscribe(
                    S.PRESENCE.format(S.token(room)),
                    cb=functools.partial(self._presence_count, room))
            await self.nc.publish(S.PRESENCE.format(S.token(room)), cpb.PresenceCount(
                node=self.node_id, online=online, ttl_ms=ttl_ms).SerializeToString())
        for room in [r for r in self._presence_subs if r not in counts]:
            await self._unsub(self._presence_subs.pop(room))
            self._presence.pop(room, None)

    async def _presence_count(self, room: str, msg) -> None:
        try:
            count = cpb.PresenceCount.FromString(msg.data)
        except Exception:
            return
        if count.node != self.node_id:
            self._presence.setdefault(room, {})[count.node] = (
                count.online, time.monotonic() + count.ttl_ms / 1000)

    def online(self, room: str) -> int | None:
        """The room's cluster-wide member count as last heard (None: not
        known here)."""
        seen = self._presence.get(room)
        if not seen:
            return None
        now = time.monotonic()
        return sum(n for n, until in seen.values() if until > now)

    async def gather_presence(self, room: str, after: str, limit: int,
                              wait: float = 0.5) -> list[cpb.PresencePage]:
        """Ask every node for its members of ``room``; the pages that came
        back within ``wait`` seconds (one per node)."""
        inbox = self.nc.new_inbox()
        pages: list[cpb.PresencePage] = []

        async def on_page(msg):
            try:
                page = cpb.PresencePage.FromString(msg.data)
            except Exception:
                return
            if page.node != self.node_id:        # this node answers for itself
                pages.append(page)
        sub = await self.nc.subscribe(inbox, cb=on_page)
        try:
            await self.nc.publish(S.ADMIN_PRESENCE, cpb.PresenceQuery(
                room=room, after=after, limit=limit).SerializeToString(), reply=inbox)
            await asyncio.sleep(wait)
        finally:
            await self._unsub(sub)
        return pages

    async def _presence_query(self, msg) -> None:
        if self.on_presence_query is None or not msg.reply:
            return
        try:
            query = cpb.PresenceQuery.FromString(msg.data)
        except Exception:
            return
        page = self.on_presence_query(query)
        page.node = self.node_id
        await self.nc.publish(msg.reply, page.SerializeToString())

    # ------------------------------------------------------------ events

    def event(self, kind: str, fields: dict) -> None:
        """Append an event (connect, disconnect, kick) to the event log: a
        JSON object on fanout.events.<kind>. Best effort: while NATS is
        unreachable events are not kept."""
        if not self.connected:
            return
        fields = dict(fields, event=kind, node=self.node_id, ts=round(time.time(), 3))
        # Buffered and sent once per loop tick: a connect storm makes one
        # task per tick, not one per event.
        if not self._events:
            asyncio.get_running_loop().call_soon(self._flush_events)
        self._events.append((S.EVENTS.format(kind), json.dumps(fields).encode()))

    def _flush_events(self) -> None:
        events, self._events = self._events, []
        self._spawn(self._send_events(events))

    async def _send_events(self, events: list[tuple[str, bytes]]) -> None:
        try:
            for subject, body in events:
                await self.nc.publish(subject, body)
        except Exception:
            pass
