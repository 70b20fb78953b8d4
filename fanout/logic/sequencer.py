"""Where a seq is assigned: each room's epoch and sequence numbers, its
inbound budget (overload sampling), and the one encoding of every message.

Per room, seqs are strictly increasing with no holes; a message refused by
the budget never gets one. The epoch is a random id made when the room's
state is created, so a room forgotten and made again (or a restarted
process) tells resuming clients that old seqs mean nothing.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from .._core import encode_room_message
from ..protocol import fanout_pb2 as pb
from ..protocol.wire import KIND_NAMES
from .base import Rejected, RoomHead, check_room_name
from .ratelimit import RateWindow, TokenBucket

_SLOT = {kind: i for i, kind in enumerate(KIND_NAMES)}   # index in per-kind arrays


def _new_epoch() -> str:
    return os.urandom(6).hex()


class _RoomState:
    __slots__ = ("epoch", "seq", "budget", "over", "sampled", "window", "degraded",
                 "holders", "last_used")

    def __init__(self, now: float) -> None:
        self.epoch = _new_epoch()
        self.seq = 0
        # The traffic state (about 1 KB) comes with the first message
        # (_traffic): a user's channel is held for each connected user, and
        # most are never published to.
        self.budget: TokenBucket | None = None
        self.over = 0              # chat messages that arrived over budget
        self.sampled = False       # chat dropped since the last published message
        self.window: RateWindow | None = None
        self.degraded: list[int] | None = None
        self.holders = 0           # nodes holding the room (joins not yet released)
        self.last_used = now

    def traffic(self, budget: float, now: float) -> None:
        """Make the budget (one second of it, full), the rate window and the
        drop counts, on the room's first message."""
        self.budget = TokenBucket(budget, budget, now)
        self.window = RateWindow(len(KIND_NAMES))
        self.degraded = [0] * len(KIND_NAMES)


class Sequencer:
    """Epochs, seqs, room budgets and encoding, for the rooms of one logic.

    :param max_publish_bytes: largest payload.
    :param room_budget: inbound messages per second per room; past it chat
        is sampled (one in ``chat_sample_every`` kept), gifts and system
        messages always pass but use up budget.
    :param idle_ttl: seconds after its last publish or join that a room no
        node holds is forgotten.
    :param metrics: counts ``messages_in`` and ``degraded`` by kind name
        (prometheus counters with a ``kind`` label), or None.
    """

    def __init__(self, *, max_publish_bytes: int = 65536, room_budget: float = 5000.0,
                 chat_sample_every: int = 10, idle_ttl: float = 300.0, metrics=None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rooms: dict[str, _RoomState] = {}
        self.max_publish_bytes = max_publish_bytes
        self.room_budget = room_budget
        self.chat_sample_every = chat_sample_every
        self.idle_ttl = idle_ttl
        self._clock = clock
        self._chat_share = 1.0      # of the room budget chat may use
        self._sample_every = chat_sample_every   # 0: drop all over-budget chat
        self._in = self._dropped = None
        if metrics is not None:
            self._in = {k: metrics.messages_in.labels(n) for k, n in KIND_NAMES.items()}
            self._dropped = {k: metrics.degraded.labels(n) for k, n in KIND_NAMES.items()}
            for counter in self._dropped.values():   # export zeros: dashboards see every kind
                counter.inc(0)
            metrics.add_gauges(lambda: [("fanout_logic_rooms",
                                         "Rooms the logic keeps state for (epoch, seq, budget)",
                                         len(self.rooms))])

    # ------------------------------------------------------------ rooms

    def head(self, room: str) -> RoomHead | None:
        state = self.rooms.get(room)
        return None if state is None else RoomHead(state.epoch, state.seq)

    def hold(self, room: str) -> RoomHead:
        """A node holds ``room`` from now on; made if new."""
        state = self._room(room)
        state.holders += 1
        return RoomHead(state.epoch, state.seq)

    def ensure(self, room: str) -> RoomHead:
        """The room's head, its state made if new (a new epoch), without
        holding it."""
        state = self._room(room)
        return RoomHead(state.epoch, state.seq)

    def restore(self, room: str, epoch: str, seq: int) -> RoomHead:
        """Take up ``room`` where stored history left it (a router taking a
        room over): its epoch and last seq continue, not start afresh."""
        check_room_name(room)
        state = self.rooms[room] = _RoomState(self._clock())
        state.epoch, state.seq = epoch, seq
        return RoomHead(epoch, seq)

    def forget(self, room: str) -> None:
        """Drop ``room``'s state now (its owner changed, or its stored
        history must be read again)."""
        self.rooms.pop(room, None)

    def release(self, room: str) -> None:
        state = self.rooms.get(room)
        if state is None or state.holders == 0:
            return
        state.holders -= 1
        if state.holders == 0 and state.seq == 0:
            # Never published to: nothing a client could resume from.
            del self.rooms[room]

    def sweep(self) -> int:
        """Forget rooms no node holds whose last publish or join is older
        than ``idle_ttl``. Returns how many."""
        cutoff = self._clock() - self.idle_ttl
        idle = [name for name, s in self.rooms.items() if not s.holders and s.last_used < cutoff]
        for name in idle:
            del self.rooms[name]
        return len(idle)

    def _room(self, room: str) -> _RoomState:
        now = self._clock()
        state = self.rooms.get(room)
        if state is None:
            check_room_name(room)
            state = self.rooms[room] = _RoomState(now)
        state.last_used = now
        return state

    def stats(self, room: str) -> dict | None:
        """Budget, recent rates and overload drops of ``room``; None if unknown."""
        state = self.rooms.get(room)
        if state is None:
            return None
        if state.window is None:              # nothing published yet
            rates = degraded = [0] * len(KIND_NAMES)
        else:
            rates, degraded = state.window.rates(self._clock()), state.degraded
        return {
            "budget": self.room_budget,
            "rates": {name: rates[_SLOT[k]] for k, name in KIND_NAMES.items()},
            "degraded": {name: degraded[_SLOT[k]] for k, name in KIND_NAMES.items()},
        }

    # ------------------------------------------------------------ messages

    def set_degradation(self, level: int) -> None:
        """0 normal; 1 degraded: chat gets half the room budget and one in
        2x``chat_sample_every`` over it; 2 overloaded: a quarter, and none
        over it. Gifts and system messages are never affected."""
        self._chat_share = (1.0, 0.5, 0.25)[level]
        self._sample_every = (self.chat_sample_every, 2 * self.chat_sample_every, 0)[level]

    def check(self, kind: int, payload: bytes, priority: int = 0) -> None:
        """The checks of :meth:`assign` that need no room state.

        :raises Rejected: ``BAD_REQUEST``, ``MESSAGE_TOO_LARGE``.
        """
        if kind not in KIND_NAMES:
            raise Rejected(pb.BAD_REQUEST, f"unknown message kind {kind!r}")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise Rejected(pb.BAD_REQUEST, "payload must be bytes")
        if len(payload) > self.max_publish_bytes:
            raise Rejected(pb.MESSAGE_TOO_LARGE,
                           f"payload of {len(payload)} bytes over {self.max_publish_bytes}")
        if not 0 <= priority <= 0xFFFFFFFF:
            raise Rejected(pb.BAD_REQUEST, "priority must fit in uint32")

    def assign(self, room: str, kind: int, payload: bytes, *, sender: str,
               priority: int = 0) -> tuple[str, int, bytes, bool]:
        """Admit one message, give it the room's next seq and encode it.

        Returns ``(epoch, seq, record, sampled)``: ``record`` is the
        ``Batch.messages`` encoding every node writes as is; ``sampled``
        says chat of the room was dropped since the previous message.
        """
        self.check(kind, payload, priority)
        state = self._room(room)
        now = state.last_used
        if state.budget is None:
            state.traffic(self.room_budget, now)
        if not self._admit(state, kind, now):
            state.sampled = True
            state.degraded[_SLOT[kind]] += 1
            if self._dropped is not None:
                self._dropped[kind].inc()
            raise Rejected(pb.ROOM_OVERLOADED,
                           f"room {room!r} is over its inbound budget; chat is being sampled")
        state.seq += 1
        record = encode_room_message(room, state.seq, kind, priority, sender,
                                     payload, int(time.time() * 1000))
        state.window.add(now, _SLOT[kind])
        if self._in is not None:
            self._in[kind].inc()
        sampled, state.sampled = state.sampled, False
        return state.epoch, state.seq, record, sampled

    def _admit(self, state: _RoomState, kind: int, now: float) -> bool:
        """Spend room budget; False means overload control drops this chat."""
        budget = state.budget
        if kind != pb.CHAT:
            budget.force(now)
            return True
        # Chat may only use its share of the budget, so under degradation it
        # leaves headroom that gifts and system messages can still use.
        if budget.take(now, reserve=budget.burst * (1.0 - self._chat_share)):
            return True
        state.over += 1
        every = self._sample_every
        if every and state.over % every == 0:
            budget.force(now)
            return True
        return False
