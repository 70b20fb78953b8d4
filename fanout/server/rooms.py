"""The rooms this node holds: the hub's rooms, their bus subscriptions and
their hold on the logic's room state, opened with the first member and
retired when nothing is left to send; and the presence broadcast.

A room is opened by subscribing on the bus first and asking the logic for
its head second: every message after that head then reaches the hub, and
anything the subscription delivers before the room exists is history the
head already covers. A room retires at once when its last member leaves and
it holds no history (a join/leave loop leaves nothing behind); a room with
history stays for resumes until it has been idle for ``room_idle_ttl_s``
(:meth:`RoomTable.sweep`). Retiring ends the subscription and releases
the logic's hold.
"""

from __future__ import annotations

import asyncio
import logging

from .. import _core
from ..bus.base import Bus
from ..logic.base import Logic
from ..protocol import fanout_pb2 as pb
from ..protocol.wire import FrameType
from . import eager

log = logging.getLogger("fanout.rooms")


class RoomTable:
    """:param hub: the node's broadcast engine, which holds the rooms.
    :param bus: where the rooms' messages come from.
    :param logic: whose room state a held room keeps alive.
    """

    def __init__(self, hub: _core.Hub, bus: Bus, logic: Logic) -> None:
        self.hub = hub
        self._bus = bus
        self._logic = logic
        self._deliver = hub.publish           # the one handler every subscription uses
        self._opening: dict[str, list[asyncio.Future]] = {}
        self._closing: dict[str, asyncio.Task] = {}

    def __len__(self) -> int:
        return len(self.hub.rooms)

    def get(self, name: str) -> _core.Room | None:
        return self.hub.rooms.get(name)

    async def acquire(self, name: str) -> _core.Room:
        """The room ``name`` on this node, opened if new.

        :raises fanout.logic.base.Rejected: the logic refused the room.
        """
        room = self.hub.rooms.get(name)
        if room is not None:
            return room
        closing = self._closing.get(name)
        if closing is not None:
            await closing                     # its unsubscribe must not end ours
            return await self.acquire(name)
        waiters = self._opening.get(name)
        if waiters is not None:               # someone else is opening it
            future = asyncio.get_running_loop().create_future()
            waiters.append(future)
            return await future
        self._opening[name] = waiters = []
        try:
            room = await self._open(name)
        except BaseException as exc:
            for future in waiters:
                if not future.done():
                    future.set_exception(exc)
            raise
        finally:
            del self._opening[name]
        for future in waiters:
            if not future.done():
                future.set_result(room)
        return room

    async def _open(self, name: str) -> _core.Room:
        await self._bus.subscribe(name, self._deliver)
        try:
            head = await self._logic.join(name)
        except BaseException:
            await self._bus.unsubscribe(name, self._deliver)
            raise
        return self.hub.room(name, head.epoch, head.seq)

    def leave(self, name: str, conn: _core.Connection) -> None:
        """``conn`` is no member of ``name`` any more; the room retires if
        that leaves nothing in it."""
        room = self.hub.rooms.get(name)
        if room is None:
            return
        room.discard(conn)
        if not len(room) and self.hub.retire(name):
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
            await self._bus.unsubscribe(name, self._deliver)
            await self._logic.release(name)
        except Exception:
            log.exception("releasing room %r failed", name)

    def send_presence(self) -> None:
        """Every member gets its room's online count: one shared frame per
        room, written like a batch."""
        for name, room in list(self.hub.rooms.items()):
            online = len(room)
            if online:
                body = pb.Presence(room=name, online=online).SerializeToString()
                self.hub.broadcast(name, _core.core_frame(FrameType.PRESENCE, body))
