"""The logic layer's interface: what a node asks of it, declared once.

A node calls exactly these methods, on whatever implementation the
composition root (:mod:`fanout.server.app`) gave it: :class:`LocalLogic`
in the same process (the embedded default), or a network service (a router
reached over the cluster bus). Every call that a network implementation
answers with a round trip is a coroutine; only :meth:`Logic.set_degradation`,
a local hint, is not.

A session runs these coroutines up to their first suspension without a task
(:mod:`fanout.server.eager`): an implementation bounds its round trips with
``asyncio.wait_for``, not ``asyncio.timeout``.

Per-room state is created only by :meth:`Logic.publish` and by
:meth:`Logic.join` (a join that passed the node's checks), and is forgotten
when idle and no node holds the room. :meth:`Logic.head` and
:meth:`Logic.room_stats` only look: an unknown room stays unknown.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from ..protocol import fanout_pb2 as pb
from ..protocol.channels import MAX_CHANNEL_NAME, is_channel
from ..protocol.errors import ReasonError

#: Longest room name, in UTF-8 bytes.
MAX_ROOM_NAME = 128


class RoomHead(NamedTuple):
    """Where a room's history stands: its epoch and the last seq assigned."""

    epoch: str
    seq: int


class Rejected(ReasonError):
    """The logic layer refused a request; ``reason`` is the wire Reason code."""


def check_name(value: str, what: str, limit: int) -> None:
    """``value`` (a room name, a user id) is 1 to ``limit`` bytes of valid
    UTF-8.

    A client's name is valid UTF-8 by the time it gets here (protobuf refuses
    a ``string`` field that is not, as BAD_PROTOBUF); a name from JSON (the
    admin API) can still hold a lone surrogate, which has no UTF-8 form.

    :raises Rejected: ``BAD_REQUEST`` for an empty, over-long or non-UTF-8
        value, named by ``what``. The message never quotes the value.
    """
    if not value:
        raise Rejected(pb.BAD_REQUEST, f"{what} is empty")
    if len(value) > limit:                      # no need to encode a 60 KB name
        raise Rejected(pb.BAD_REQUEST, f"{what} longer than {limit} bytes")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise Rejected(pb.BAD_REQUEST, f"{what} is not valid UTF-8") from None
    if size > limit:
        raise Rejected(pb.BAD_REQUEST, f"{what} longer than {limit} bytes")


def check_room_name(room: str) -> None:
    """A room name is 1-128 bytes of valid UTF-8; a user's channel (``@`` +
    the user id, fanout.protocol.channels) up to 129.

    :raises Rejected: ``BAD_REQUEST`` (:func:`check_name`).
    """
    check_name(room, "room name", MAX_CHANNEL_NAME if is_channel(room) else MAX_ROOM_NAME)



class Logic(Protocol):
    """The business rules between clients and the broadcast core."""

    #: Whether the logic answers now (a network logic: its routers did at
    #: the last call); readiness reports it.
    reachable: bool

    async def start(self) -> None:
        """Begin serving (connect, start timers)."""

    async def close(self) -> None:
        """Stop; pending work is dropped."""

    async def head(self, room: str) -> RoomHead | None:
        """The room's head, or None if the logic holds no state for it.
        Never creates state."""

    async def join(self, room: str) -> RoomHead:
        """A node starts holding ``room`` (its first member there, after the
        node's checks): create the room's state if needed and keep it while
        held. Returns the head the node's copy of the room starts from.

        The node subscribes to the room on the bus *before* this call, so
        every message after the returned head reaches it.

        :raises Rejected: ``BAD_REQUEST`` for a bad room name.
        """

    async def release(self, room: str) -> None:
        """The node no longer holds ``room`` (it retired it); the logic may
        forget the room once it is idle and no node holds it."""

    async def publish(self, room: str, kind: int, payload: bytes, *, sender: str,
                      priority: int = 0) -> int:
        """Assign the room's next seq, encode the message once and put it on
        the bus. Returns the seq.

        :raises Rejected: ``BAD_REQUEST`` (kind, payload type, priority, room
            name), ``MESSAGE_TOO_LARGE``, ``ROOM_OVERLOADED`` (chat dropped by
            the room's budget).
        """

    async def chat(self, user: str, room: str, payload: bytes) -> int:
        """Upstream chat from a member of ``room`` (the node checked
        membership): size and per-user rate checks, then :meth:`publish`.

        :raises Rejected: ``MESSAGE_TOO_LARGE``, ``RATE_LIMITED``, and the
            refusals of :meth:`publish`.
        """

    async def login(self, user: str, device_class: str, session: str, *,
                    issued_at: int | None) -> str | None:
        """Record ``session`` as the login of (user, device class). Returns
        the session it replaces, which the caller kicks.

        :param issued_at: the token's ``iat`` (None: it has none), checked
            against :meth:`revoke` in the same call, so a Hello costs one
            round trip.
        :raises Rejected: ``TOKEN_REVOKED``; nothing is recorded.
        """

    async def logout(self, user: str, device_class: str, session: str) -> None:
        """Forget the login if ``session`` still holds it."""

    async def revoke(self, user: str, before: float) -> None:
        """Refuse every token of ``user`` issued before ``before`` (unix
        seconds): a token whose ``iat`` is earlier, or that has no ``iat``.
        Later revocations of a user widen earlier ones. The logic keeps the
        rule while a token it covers can still be valid (the node's
        ``max_token_lifetime_s``); the caller kicks the live connections."""

    async def revoked(self, user: str, issued_at: int | None) -> bool:
        """Whether a token of ``user`` issued at ``issued_at`` (None: no
        ``iat``) is revoked: the check of a Refresh."""

    async def room_stats(self, room: str) -> dict | None:
        """Budget, recent inbound rates and overload drops of ``room``, or
        None if unknown. Never creates state."""

    def set_degradation(self, level: int) -> None:
        """The node's overload level (0 normal, 1 degraded, 2 overloaded):
        tighten how much chat a room may take."""
