"""Users' channels on this node: the connections waiting for their channel,
and waking them when a push comes (docs/protocol.md, section 5.10).

Every connection of a user is a member of the user's channel ``@<user>``.
Holding that room open for each connected user would cost what a room costs
(about 1 KB of memory, and in a cluster a subscription and router calls per
connect) for users who are never pushed to. So a connection whose channel is
not open on this node, and that needs no replay, only *waits*: it keeps its
cursor, and this table keeps it under the channel's name. A push opens the
channel first and joins its waiting connections from their cursors, each
with an ``Ack{req_id: 0}`` (the channel's epoch), the replay of what it has
not seen, then membership:

* a push through this node wakes the channel here before it is published, so
  the room is open when the message arrives;
* a push through another node of a cluster is stored first, then announced
  to every node (``Control.WAKE_CHANNEL``); a node with waiting connections
  opens the room, whose ring is loaded from the stored history, and the
  replay from each cursor delivers it.

A connection asking for its channel's head when a wake comes is *expecting*:
the wake is noted, and the connection joins the opened room itself once its
``AuthOk`` is out.
"""

from __future__ import annotations

import logging
from typing import Protocol

from .. import _core
from ..logic.base import Rejected
from ..protocol import fanout_pb2 as pb
from ..protocol.channels import user_channel
from .rooms import RoomTable

log = logging.getLogger("fanout.channels")


class Session(Protocol):
    """What this table needs of a connection (fanout.server.session.Session)."""

    conn: _core.Connection
    rooms: set[str] | frozenset[str]

    @property
    def closing(self) -> bool: ...

    def kick(self, reason: int, message: str) -> None:
        """Close the connection with a Kick."""

    def channel_woken(self, room: _core.Room, name: str) -> None:
        """Join ``room`` from the cursor the connection waited with."""


class ChannelTable:
    """:param rooms: the node's rooms, where a woken channel is opened.

    Keyed by user id (the session's own string, no channel name made per
    connection), each holding the one waiting session, or a list of them
    when the user has several here: an idle connection costs its dict entry
    alone.
    """

    def __init__(self, rooms: RoomTable) -> None:
        self._rooms = rooms
        self._waiting: dict[str, Session | list[Session]] = {}
        self._expecting: dict[str, dict[Session, bool]] = {}   # -> woken meanwhile

    def waiting(self, user: str) -> int:
        """Connections of ``user`` waiting for the user's channel here."""
        held = self._waiting.get(user)
        return 0 if held is None else len(held) if isinstance(held, list) else 1

    def __len__(self) -> int:
        return sum(len(h) if isinstance(h, list) else 1 for h in self._waiting.values())

    def expect(self, user: str, session: Session) -> None:
        """``session`` is asking for the head of its user's channel."""
        self._expecting.setdefault(user, {})[session] = False

    def expected(self, user: str, session: Session) -> bool:
        """``session`` has its answer; True if the channel was woken meanwhile."""
        expecting = self._expecting.get(user)
        woken = expecting.pop(session, False) if expecting is not None else False
        if not expecting:
            self._expecting.pop(user, None)
        return woken

    def wait(self, user: str, session: Session) -> None:
        """``session`` (its cursor kept on it) waits for a wake of its channel."""
        held = self._waiting.get(user)
        if held is None:
            self._waiting[user] = session
        elif isinstance(held, list):
            held.append(session)
        else:
            self._waiting[user] = [held, session]

    def discard(self, user: str, session: Session) -> bool:
        """``session`` no longer waits; True if it did."""
        held = self._waiting.get(user)
        if held is session:
            del self._waiting[user]
            return True
        if not isinstance(held, list) or session not in held:
            return False
        held.remove(session)
        if len(held) == 1:
            self._waiting[user] = held[0]
        return True

    async def wake(self, user: str) -> None:
        """Open ``user``'s channel here if connections wait for it, and join
        them. A channel that cannot be opened (the cluster is unreachable)
        closes its waiting connections with ``Kick(UNAVAILABLE)``: they
        reconnect and resume, where waiting on would miss the push."""
        for session in self._expecting.get(user, ()):
            self._expecting[user][session] = True
        held = self._waiting.pop(user, None)
        if held is None:
            return
        sessions = held if isinstance(held, list) else [held]
        name = user_channel(user)
        try:
            room = await self._rooms.acquire(name)
        except Rejected as exc:
            log.warning("channel %r: cannot open it (%s); closing its %d waiting connection(s)",
                        name, exc.message, len(sessions))
            for session in sessions:
                session.kick(pb.UNAVAILABLE, f"the user's channel cannot be opened: "
                                             f"{exc.message}")
            return
        for session in sessions:
            try:
                session.channel_woken(room, name)
            finally:
                if session.closing or name not in session.rooms:
                    self._rooms.leave(name, session.conn)    # not joined after all
