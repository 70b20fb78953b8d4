"""The bus interface: how an encoded room message crosses from the logic
layer to every node that holds the room.

A message travels as ``(room, epoch, seq, record, sampled)``: ``record`` is
the ``Batch.messages`` encoding made once by the logic layer, so no node ever
re-encodes it; ``sampled`` says overload control dropped chat of the room
just before it.

A node also reaches the other nodes through its bus: control commands
(kick a session wherever it is, disconnect or revoke a user), per-room
presence counts, the admin API's presence questions, and the event log. The
embedded :class:`~fanout.bus.local.LocalBus` has no other node: those are
no-ops there; :class:`~fanout.bus.nats.NatsBus` is the cluster's.

The bus is scoped by room: a node subscribes when a room gets its first
member there and unsubscribes when its hub retires the room, so a node only
ever hears of rooms it holds. Per room, messages reach a subscriber in the
order they were published. As for the logic, these coroutines may start
without a current task (:mod:`fanout.server.eager`): bound waits with
``asyncio.wait_for``.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

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

    # -- the rest of the cluster (no-ops on a single node) ----------------

    #: ``on_control(control)``: a command from another node (cluster.v1.Control).
    on_control: Callable | None
    #: ``on_presence_query(query) -> PresencePage``: this node's members of a room.
    on_presence_query: Callable | None

    @property
    def connected(self) -> bool:
        """Whether the bus can carry messages now (readiness)."""

    @property
    def keeps_history(self) -> bool:
        """Whether :meth:`history` serves the rooms' messages: a node then
        stops holding a room soon after its last member leaves, since the
        room's recent history is loaded again when one comes back."""

    async def history(self, room: str, after_seq: int = 0) -> Sequence | None:
        """The room's stored messages after ``after_seq`` (``Stored``
        tuples: stream_seq, epoch, seq, record, sampled), oldest first; None
        if the bus keeps no history (the node's rings are all there is)."""

    async def broadcast(self, control) -> None:
        """Send a control command to every other node."""

    async def share_presence(self, counts: dict[str, int]) -> None:
        """This node's member count per room held, for the cluster-wide counts."""

    def online(self, room: str) -> int | None:
        """The room's member count across nodes (None: this node's is all)."""

    async def gather_presence(self, room: str, after: str, limit: int) -> list:
        """Every other node's page of members of ``room`` (PresencePage)."""

    def event(self, kind: str, fields: dict) -> None:
        """Append an event (connect, disconnect, kick) to the event log."""
