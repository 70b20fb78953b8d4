"""The embedded bus: subscribers in the same process, called before
:meth:`LocalBus.publish` returns."""

from __future__ import annotations

from .base import Handler


class LocalBus:
    """In-process :class:`~fanout.bus.base.Bus`. Several nodes in one process
    (tests) may share one, each subscribing its own handler."""

    on_control = None
    on_presence_query = None
    connected = True
    keeps_history = False

    def __init__(self) -> None:
        self._rooms: dict[str, list[Handler]] = {}

    @property
    def rooms(self) -> dict[str, int]:
        """Subscribers per room."""
        return {room: len(handlers) for room, handlers in self._rooms.items()}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._rooms.clear()

    async def subscribe(self, room: str, handler: Handler) -> None:
        self._rooms.setdefault(room, []).append(handler)

    async def unsubscribe(self, room: str, handler: Handler) -> None:
        handlers = self._rooms.get(room)
        if handlers is None or handler not in handlers:
            return
        handlers.remove(handler)
        if not handlers:
            del self._rooms[room]

    async def publish(self, room: str, epoch: str, seq: int, record: bytes,
                      sampled: bool = False) -> None:
        for handler in self._rooms.get(room, ()):
            handler(room, epoch, seq, record, sampled)

    # One process is the whole deployment: no other node to reach, no
    # history beyond the node's rings, no event log.

    async def history(self, room: str, after_seq: int = 0):
        return None

    async def broadcast(self, control) -> None:
        pass

    async def share_presence(self, counts: dict[str, int]) -> None:
        pass

    def online(self, room: str) -> int | None:
        return None

    async def gather_presence(self, room: str, after: str, limit: int) -> list:
        return []

    def event(self, kind: str, fields: dict) -> None:
        pass
