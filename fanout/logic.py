"""The logic layer: the business rules between clients and the broadcast core.

It validates upstream chat (membership is checked by the session, size and
per-user rate here), assigns each room's sequence numbers, encodes every
message once and hands it to the bus. It also owns the one-login-per-user-
and-device-class rule. :class:`LocalLogic` runs in the node's process (the
embedded default); a later network deployment puts the same interface
behind an RPC bus.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from ._core import encode_room_message
from .bus import Bus
from .proto import fanout_pb2 as pb
from .ratelimit import TokenBucket

MAX_ROOM_NAME = 128
KINDS = {pb.CHAT: "chat", pb.GIFT: "gift", pb.SYSTEM: "system"}


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
    def head(self, room: str) -> tuple[str, int]: ...
    def publish(self, room: str, kind: int, payload: bytes, *, sender: str,
                priority: int = 0) -> int: ...
    def chat(self, user: str, room: str, payload: bytes) -> int: ...
    def login(self, user: str, device_class: str, session: str) -> str | None: ...
    def logout(self, user: str, device_class: str, session: str) -> None: ...


@dataclass
class _RoomState:
    epoch: str
    seq: int = 0


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
    """

    def __init__(self, bus: Bus, *, max_chat_bytes: int = 2048,
                 max_publish_bytes: int = 65536, chat_rate: float = 5.0,
                 chat_burst: float = 10.0,
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
        self.published = {kind: 0 for kind in KINDS}
        self.rate_limited = 0

    def _room(self, room: str) -> _RoomState:
        state = self._rooms.get(room)
        if state is None:
            check_room_name(room)
            state = self._rooms[room] = _RoomState(_new_epoch())
        return state

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
        state.seq += 1
        record = encode_room_message(room, state.seq, kind, priority, sender,
                                     payload, int(time.time() * 1000))
        self.published[kind] += 1
        self._bus.publish(room, state.epoch, state.seq, record)
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
