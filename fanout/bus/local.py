"""The bus that carries encoded room messages from the logic layer to nodes.

A message travels as ``(room, epoch, seq, record, sampled)``: ``record`` is
the ``Batch.messages`` encoding made once by the logic layer, so no node ever
re-encodes it; ``sampled`` says overload control dropped chat of the room
just before it. The embedded default is :class:`LocalBus` (same process,
synchronous); a network bus implements the same two methods.
"""

from __future__ import annotations

from typing import Callable, Protocol

Subscriber = Callable[[str, str, int, bytes, bool], object]


class Bus(Protocol):
    def subscribe(self, callback: Subscriber) -> None: ...
    def publish(self, room: str, epoch: str, seq: int, record: bytes,
                sampled: bool = False) -> None: ...


class LocalBus:
    """In-process bus: publish calls every subscriber before returning."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, callback: Subscriber) -> None:
        self._subscribers.append(callback)

    def unsubscribe(self, callback: Subscriber) -> None:
        self._subscribers.remove(callback)

    def publish(self, room: str, epoch: str, seq: int, record: bytes,
                sampled: bool = False) -> None:
        for callback in self._subscribers:
            callback(room, epoch, seq, record, sampled)
