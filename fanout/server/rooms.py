"""The rooms this node holds: the hub's rooms, their bus subscriptions and
their hold on the logic's room state, opened with the first member and
retired when nothing is left to send; and the presence broadcast.

A room is opened by subscribing on the bus first and asking the logic for
its head second. What the subscription delivers while the head is on its way
is kept and applied once the room exists (the hub drops seqs the head
already counts), so every message after the head reaches the room. A room
retires at once when its last member leaves if nothing was ever published to
it (a join/leave loop leaves nothing behind); a room with history stays for
resumes until it has been idle for ``room_idle_ttl_s``
(:meth:`RoomTable.sweep`). Retiring ends the subscription and releases the
logic's hold.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .. import _core
from ..bus.base import Bus
from ..logic.base import Logic, Rejected
from ..protocol import fanout_pb2 as pb
from ..protocol.wire import FrameType
from . import eager

log = logging.getLogger("fanout.rooms")


class RoomTable:
    """:param hub: the node's broadcast engine, which holds the rooms.
    :param bus: where the rooms' messages come from.
    :param logic: whose room state a held room keeps alive.
    """

    def __init__(self, hub: _core.Hub, bus: Bus, logic: Logic, *, ring_size: int = 1024) -> None:
        self.hub = hub
        self._ring_size = ring_size
        self._bus = bus
        self._logic = logic
        self._publish = hub.publish
        # One bound method for every subscription: a new one per room would
        # be 64 bytes per room held.
        self._handler = self._deliver
        self._opening: dict[str, list[asyncio.Future]] = {}
        self._early: dict[str, list[tuple]] = {}   # delivered while the room opens
        self._closing: dict[str, asyncio.Task] = {}
        self._empty: dict[str, float] = {}        # room -> when its last member left

    def __len__(self) -> int:
        return len(self.hub.rooms)

    def get(self, name: str) -> _core.Room | None:
        return self.hub.rooms.get(name)

    def held(self, name: str) -> bool:
        """``name`` is open here, or being opened."""
        return name in self.hub.rooms or name in self._opening

    def _deliver(self, room: str, epoch: str, seq: int, record: bytes, sampled: bool) -> None:
        # The handler of every subscription: once per message, never per member.
        if not self._publish(room, epoch, seq, record, sampled):
            early = self._early.get(room)
            if early is not None:
                early.append((room, epoch, seq, record, sampled))

    async def acquire(self, name: str) -> _core.Room:
        """The room ``name`` on this node, opened if new. Once it returns,
        the room is held here until the caller's connection joins it (no
        await comes between).

        :raises fanout.logic.base.Rejected: the logic refused the room.
        """
        while True:
            room = self.hub.rooms.get(name)
            if room is not None:
                return room
            closing = self._closing.get(name)
            if closing is not None:
                await closing                 # its unsubscribe must not end ours
                continue
            waiters = self._opening.get(name)
            if waiters is None:
                return await self._open(name)
            # Someone else is opening it. What they get may be retired before
            # this waiter runs (their connection closed): then look again.
            future = asyncio.get_running_loop().create_future()
            waiters.append(future)
            room = await future
            if self.hub.rooms.get(name) is room:
                return room

    async def _open(self, name: str) -> _core.Room:
        self._opening[name] = waiters = []
        self._early[name] = early = []
        try:
            try:
                await self._bus.subscribe(name, self._handler)
            except Exception as exc:
                # The bus is unreachable (a cluster's NATS): the client is
                # told to retry, not cut.
                log.debug("room %r: subscribing failed", name, exc_info=True)
                raise Rejected(pb.UNAVAILABLE, "the cluster bus is unreachable "
                               f"({type(exc).__name__}); "
                               "retry later") from None
            try:
                head = await self._logic.join(name)
            except BaseException:
                await self._bus.unsubscribe(name, self._handler)
                raise
            room = await self._with_history(name, head)
        except BaseException as exc:
            for future in waiters:
                if not future.done():
                    future.set_exception(exc)
            raise
        finally:
            del self._opening[name]
            del self._early[name]
        for message in early:
            self._publish(*message)            # seqs the head counts are dropped
        for future in waiters:
            if not future.done():
                future.set_result(room)
        return room

    async def _with_history(self, name: str, head) -> _core.Room:
        """The hub's room, its ring loaded with the room's recent history
        when the bus keeps one (a cluster): a client that resumes here after
        another node went away is served from this node's ring.

        The head counts seqs the router has assigned, some of them perhaps
        not stored yet (its appends are pipelined), or never (refused: the
        router then gives those seqs again). The room starts where the
        stored history ends, not at the head: whatever comes after is
        stored after this read, so the subscription (made before the head
        was asked for) delivers it, and the hub takes it."""
        keep = self._ring_size
        stored = None
        if head.seq and keep:
            try:
                stored = await self._bus.history(name, max(0, head.seq - keep))
            except Exception as exc:
                log.warning("room %r: history unreachable (%r); resumes before seq %d get "
                            "a gap", name, exc, head.seq)
        stored = [s for s in stored or () if s[1] == head.epoch and s[2] <= head.seq]
        if not stored:
            return self.hub.room(name, head.epoch, head.seq)
        # Contiguous up to its newest, newest last: keep the unbroken tail.
        start = len(stored) - 1
        while start and stored[start - 1][2] == stored[start][2] - 1:
            start -= 1
        stored = stored[start:]
        room = self.hub.room(name, head.epoch, stored[0][2] - 1)
        for _, epoch, seq, record, sampled in stored:
            self._publish(name, epoch, seq, record, sampled)
        # No member yet: the flush writes nothing, and makes them replayable.
        self.hub.flush(name)
        return room

    def leave(self, name: str, conn: _core.Connection) -> None:
        """``conn`` is no member of ``name`` any more; the room retires if
        that leaves nothing in it."""
        room = self.hub.rooms.get(name)
        if room is None:
            return
        room.discard(conn)
        if not len(room):
            if self.hub.retire(name):
                self._released(name)
            elif self._bus.keeps_history:
                self._empty.setdefault(name, time.monotonic())

    def release_empty(self, grace: float) -> None:
        """Stop holding rooms that have had no member for ``grace`` seconds
        (a cluster node: a room's traffic comes only while it has members
        here; its history stays in JetStream for a member who comes back)."""
        if not self._empty:
            return
        cutoff = time.monotonic() - grace
        for name, since in list(self._empty.items()):
            room = self.hub.rooms.get(name)
            if room is None or len(room):
                del self._empty[name]           # gone, or a member came back
            elif since <= cutoff:
                del self._empty[name]
                if self.hub.drop(name):
                    self._released(name)

    def sweep(self, idle_ttl: float) -> None:
        """Retire rooms with no members that have been idle for ``idle_ttl`` s."""
        for name in self.hub.sweep(idle_ttl):
            self._released(name)

    async def close(self) -> None:
        """End every subscription and hold (the node is stopping)."""
        for name in list(self.hub.rooms):
            await self._release(name)
        for task in list(self._closing.values()):
            await task

    def _released(self, name: str) -> None:
        task = eager.start(self._release(name))
        if task is not None:
            self._closing[name] = task
            task.add_done_callback(lambda _t: self._closing.pop(name, None))

    async def _release(self, name: str) -> None:
        try:
            await self._bus.unsubscribe(name, self._handler)
        except Exception:
            log.exception("ending the subscription of room %r failed", name)
        try:
            await self._logic.release(name)
        except Exception:
            log.exception("releasing room %r in the logic failed", name)

    def send_presence(self, name: str, cluster_online=None) -> None:
        """Every member of room ``name`` gets its online count: one shared
        frame, written like a batch. ``cluster_online(room)`` gives the count
        across the cluster's nodes (None: this node's is all there is)."""
        room = self.hub.rooms.get(name)
        online = len(room) if room is not None else 0
        if online:
            total = cluster_online(name) if cluster_online is not None else None
            if total is not None:
                online = max(online, total)
            body = pb.Presence(room=name, online=online).SerializeToString()
            self.hub.broadcast(name, _core.core_frame(FrameType.PRESENCE, body))
