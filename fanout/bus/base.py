"""The bus interface: how an encoded room message crosses from the logic
layer to every node that holds the room.

A message travels as ``(room, epoch, seq, record, sampled)``: ``record`` is
the ``Batch.messages`` encoding made once by the logic layer, so no node ever
re-encodes it; ``sampled`` says overload control dropped chat of the room
just before it.

The bus is scoped by room: a node subscribes when a room gets its first
member there and unsubscribes when its hub retires the room, so a node only
ever hears of rooms it holds. Per room, messages reach a subscriber in the
order they were published. As for the logic, these coroutines may start
without a current task (:mod:`fanout.server.eager`): bound waits with
``asyncio.wait_for``.
"""

from __future__ import annotations

from typing import Callable, Protocol

#: ``handler(room, epoch, seq, record, sampled)``; called on the node's loop.
Handler = Callable[[str, str, int, bytes, bool], object]


class Bus(Protocol):
    async def start(self) -> None:
        """Connect."""

    async def close(self) -> None:
        """Disconnect; subscriptions end."""

    async def subscribe(self, room: str, handler: Handler) -> None:
        """Deliver the room's messages to ``handler`` from now on. Once this
        returns, every message published after it reaches the handler."""

    async def unsubscribe(self, room: str, handler: Handler) -> None:
        """Stop delivering the room's messages to ``handler``."""

    async def publish(self, room: str, epoch: str, seq: int, record: bytes,
                      sampled: bool = False) -> None:
        """Send one message to every subscriber of ``room``."""
