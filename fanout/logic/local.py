"""The logic layer: the business rules between clients and the broadcast core.

It validates upstream chat (membership is checked by the session, size and
per-user rate here), keeps each room within its inbound budget (overload
control: chat is sampled, gifts and system messages never are), assigns each
room's sequence numbers, encodes every message once and hands it to the bus. It also owns the one-login-per-user-
and-device-class rule. :class:`LocalLogic` runs in the node's process (the
embedded default); a later network deployment puts the same interface
behind an RPC bus.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Protocol

from .._core import encode_room_message
from ..bus import Bus
from ..protocol import fanout_pb2 as pb
from ..protocol.wire import KIND_NAMES
from .ratelimit import RateWindow, TokenBucket

MAX_ROOM_NAME = 128
KINDS = KIND_NAMES                                  # code -> name, as the admin API spells it
_SLOT = {pb.CHAT: 0, pb.GIFT: 1, pb.SYSTEM: 2}     # index in per-kind arrays


class Rejected(Exception):
    """A request broke a rule; ``reason`` is the wire Reason code."""

    def __init__(self, reason: int, message: str):
        super().__init__(message)
        self.reason = reason


def check_room_name(room: str) -> None:
    if not room:
        raise Rejected(pb.BAD_REQUEST, "room name is empty")
    if len(room.encode("utf-8")) > MAX_ROOM_NAME:
        raise Rejected(pb.BAD_REQUEST, f"room name longer than {MAX_ROOM_NAME} bytes")


class Logic(Protocol):
    def knows(self, room: str) -> bool:
        """Whether ``room`` was ever joined or published to."""
        return room in self._rooms

    def head(self, room: str) -> tuple[str, int]: ...
    def publish(self, room: str, kind: int, payload: bytes, *, sender: str,
                priority: int = 0) -> int: ...
    def chat(self, user: str, room: str, payload: bytes) -> int: ...
    def login(self, user: str, device_class: str, session: str) -> str | None: ...
    def logout(self, user: str, device_class: str, session: str) -> None: ...


class _RoomState:
    __slots__ = ("epoch", "seq", "budget", "over", "sampled", "window", "degraded")

    def __init__(self, epoch: str, budget: float, now: float) -> None:
        self.epoch = epoch
        self.seq = 0
        self.budget = TokenBucket(budget, budget, now)   # one second of budget
        self.over = 0              # chat messages that arrived over budget
        self.sampled = False       # chat dropped since the last published message
        self.window = RateWindow(len(KINDS))
        self.degraded = [0] * len(KINDS)


def _new_epoch() -> str:
    # Random per room per logic instance: a restarted node starts new epochs,
    # which tells resuming clients that old sequence numbers mean nothing.
    return os.urandom(6).hex()


class LocalLogic:
    """In-process logic for a single node.

    :param max_chat_bytes: largest upstream chat payload.
    :param max_publish_bytes: largest server-side publish payload.
    :param chat_rate: chat messages per second per user (token bucket rate).
    :param chat_burst: token bucket size.
    :param room_budget: inbound messages per second per room; past it chat
        is sampled (one in ``chat_sample_every`` kept), gifts and system
        messages always pass but use up budget.
    :param metrics: a :class:`fanout.metrics.NodeMetrics` to count into.

    The node tightens overload control through :meth:`set_degradation`.
    """

    def __init__(self, bus: Bus, *, max_chat_bytes: int = 2048,
                 max_publish_bytes: int = 65536, chat_rate: float = 5.0,
                 chat_burst: float = 10.0, room_budget: float = 5000.0,
                 chat_sample_every: int = 10, metrics=None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._bus = bus
        self._rooms: dict[str, _RoomState] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._logins: dict[tuple[str, str], str] = {}
        self._clock = clock
        self.max_chat_bytes = max_chat_bytes
        self.max_publish_bytes = max_publish_bytes
        self.chat_rate = chat_rate
        self.chat_burst = chat_burst
        self.room_budget = room_budget
        self.chat_sample_every = chat_sample_every
        self._chat_share = 1.0      # of the room budget chat may use
        self._sample_every = chat_sample_every   # 0: drop all over-budget chat
        self.published = {kind: 0 for kind in KINDS}
        self.rate_limited = 0
        self._metrics = metrics
        if metrics is not None:
            self._in = {k: metrics.messages_in.labels(n) for k, n in KINDS.items()}
            self._dropped = {k: metrics.degraded.labels(n) for k, n in KINDS.items()}
            for k in KINDS:            # export zeros, so dashboards see every kind
                self._dropped[k].inc(0)

    def set_degradation(self, level: int) -> None:
        """0 normal; 1 degraded: chat gets half the room budget and one in
        2x``chat_sample_every`` over it; 2 overloaded: a quarter, and none
        over it. Gifts and system messages are never affected."""
        self._chat_share = (1.0, 0.5, 0.25)[level]
        self._sample_every = (self.chat_sample_every, 2 * self.chat_sample_every, 0)[level]

    def _room(self, room: str) -> _RoomState:
        state = self._rooms.get(room)
        if state is None:
            check_room_name(room)
            state = self._rooms[room] = _RoomState(_new_epoch(), self.room_budget, self._clock())
        return state

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

    def room_stats(self, room: str) -> dict:
        """Budget, recent rates and overload drops of ``room``."""
        state = self._room(room)
        rates = state.window.rates(self._clock())
        return {
            "budget": self.room_budget,
            "rates": {name: rates[_SLOT[k]] for k, name in KINDS.items()},
            "degraded": {name: state.degraded[_SLOT[k]] for k, name in KINDS.items()},
        }

    def head(self, room: str) -> tuple[str, int]:
        """``(epoch, last assigned seq)`` of ``room``."""
        state = self._room(room)
        return state.epoch, state.seq

    def publish(self, room: str, kind: int, payload: bytes, *, sender: str,
                priority: int = 0) -> int:
        """Assign the next seq, encode once, hand to the bus. Returns the seq."""
        if kind not in KINDS:
            raise Rejected(pb.BAD_REQUEST, f"unknown message kind {kind!r}")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise Rejected(pb.BAD_REQUEST, "payload must be bytes")
        if len(payload) > self.max_publish_bytes:
            raise Rejected(pb.MESSAGE_TOO_LARGE,
                           f"payload of {len(payload)} bytes over {self.max_publish_bytes}")
        if not 0 <= priority <= 0xFFFFFFFF:
            raise Rejected(pb.BAD_REQUEST, "priority must fit in uint32")
        state = self._room(room)
        now = self._clock()
        if not self._admit(state, kind, now):
            state.sampled = True
            state.degraded[_SLOT[kind]] += 1
            if self._metrics is not None:
                self._dropped[kind].inc()
            raise Rejected(pb.ROOM_OVERLOADED,
                           f"room {room!r} is over its inbound budget; chat is being sampled")
        state.seq += 1
        record = encode_room_message(room, state.seq, kind, priority, sender,
                                     payload, int(time.time() * 1000))
        self.published[kind] += 1
        state.window.add(now, _SLOT[kind])
        if self._metrics is not None:
            self._in[kind].inc()
        sampled, state.sampled = state.sampled, False
        self._bus.publish(room, state.epoch, state.seq, record, sampled)
        return state.seq

    def chat(self, user: str, room: str, payload: bytes) -> int:
        """Upstream chat from a member of ``room``: size and rate checks,
        then publish. Returns the assigned seq."""
        if len(payload) > self.max_chat_bytes:
            raise Rejected(pb.MESSAGE_TOO_LARGE,
                           f"chat of {len(payload)} bytes over {self.max_chat_bytes}")
        now = self._clock()
        bucket = self._buckets.get(user)
        if bucket is None:
            bucket = self._buckets[user] = TokenBucket(self.chat_rate, self.chat_burst, now)
        if not bucket.take(now):
            self.rate_limited += 1
            if self._metrics is not None:
                self._metrics.rate_limited.inc()
            raise Rejected(pb.RATE_LIMITED,
                           f"over {self.chat_rate:g} chat messages/s (burst {self.chat_burst:g})")
        if len(self._buckets) > 4096:
            self._forget_full_buckets(now)
        return self.publish(room, pb.CHAT, payload, sender=user)

    def _forget_full_buckets(self, now: float) -> None:
        # A full bucket is the same as no bucket: drop them so memory follows
        # the active chatters, not everyone who ever chatted.
        for user in [u for u, b in self._buckets.items() if b.full(now)]:
            del self._buckets[user]

    def login(self, user: str, device_class: str, session: str) -> str | None:
        """Record ``session`` as the login of (user, device_class); returns the
        session it replaces, which the caller kicks."""
        key = (user, device_class)
        previous = self._logins.get(key)
        self._logins[key] = session
        return previous if previous != session else None

    def logout(self, user: str, device_class: str, session: str) -> None:
        key = (user, device_class)
        if self._logins.get(key) == session:
            del self._logins[key]
