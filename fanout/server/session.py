"""Where a connection is authenticated: one client connection's control
state, from its Hello (token check, login) to its rooms, chat and pings.

The socket itself belongs to the compiled core (a ``fanout._core``
connection): the session only sees decoded client frames and answers
through ``Connection.send``, the socket's single writer. Room broadcasts
never pass through here; the core writes them to member sockets directly.

Frames are handled strictly in order. A handler that waits on the logic
(a network logic answers later) holds the frames behind it, and reading
pauses until it is done; with the embedded logic nothing ever waits
(:mod:`.eager`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Callable, Protocol

from google.protobuf.message import DecodeError

from .. import _core
from ..logic.base import Logic, Rejected, check_room_name
from ..protocol import fanout_pb2 as pb
from ..protocol.auth import AuthError, Claims, verify
from ..protocol.channels import is_channel, user_channel
from ..protocol.wire import FrameType
from . import eager, wsupgrade
from .config import NodeConfig
from .logutil import ThrottledLog
from .channels import ChannelTable
from .rooms import RoomTable

log = logging.getLogger("fanout.session")

_NO_ROOMS: frozenset[str] = frozenset()   # shared by every session in no room

#: Longest device class, UTF-8 bytes: it is kept for the connection's life.
MAX_DEVICE_CLASS = 32
#: Longest piece of client input quoted in an Error message or a log line.
CLIP_CHARS = 64
#: Longest Error/Kick message the node sends.
MAX_MESSAGE_CHARS = 256


def clip(value: str, limit: int = CLIP_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters with an ellipsis: client
    input quoted back in an Error or a log line costs a bounded size and
    cannot forge a line (control characters are escaped)."""
    text = repr(value[:limit + 1])
    return text if len(value) <= limit else text[:limit + 1] + "…"


def _echo_room(name: str) -> str:
    """What an Error echoes of a room name: the name if it is a valid one,
    else nothing (a 60 KB name is not sent back)."""
    try:
        check_room_name(name)
    except Rejected:
        return ""
    return name


#: The waiting cursor of a channel with no history: its whole next epoch is new.
_NO_HISTORY = ("", 0)


def _waiting_cursor(head, hello: pb.Hello) -> tuple[str, int] | None:
    """The cursor (epoch, seq) a connection whose channel is not open here
    waits with, given the channel's head (None: no history) and where the
    Hello resumes it; None if the client is behind and needs a replay now."""
    if head is None:
        return _NO_HISTORY
    last, epoch = hello.channel_last_seq, hello.channel_epoch
    if (not last and not epoch) or head.seq == 0:
        return head.epoch, head.seq          # from now on (or nothing to replay)
    if epoch and epoch != head.epoch:
        return None                          # another epoch: replay from seq 1
    return (head.epoch, head.seq) if last >= head.seq else None


def _forbidden(name: str, cfg: NodeConfig) -> str:
    """Why a Join of ``name`` is refused (ROOM_FORBIDDEN)."""
    if not is_channel(name):
        return f"token does not allow room {clip(name)}"
    if not cfg.user_channels:
        return "user channels are off on this node"
    return "a user's channel is joined by that user's connections only"


class SessionHost(Protocol):
    """What a session needs from the node that holds it, and nothing more."""

    config: NodeConfig
    loop: asyncio.AbstractEventLoop
    logic: Logic
    rooms: RoomTable
    channels: ChannelTable
    metrics: object          # NodeMetrics: protocol_errors, kicks, slow_consumers
    throttled: ThrottledLog
    ws_origins: frozenset[str] | None   # allowed browser origins (None: any)

    def kick(self, session_id: str, reason: int, message: str) -> bool:
        """Kick another session of this node (a replaced login)."""

    def auth_failed(self, reason: int) -> None:
        """Count a refused Hello."""

    def input_callback(self, on_readable: Callable[[], None]) -> Callable[[], None]:
        """The read callback to install for ``on_readable`` (the node times
        client input for overload control)."""

    def session_authenticated(self, session: "Session") -> None:
        """The session's Hello succeeded: it leaves the unauthenticated budget."""

    def session_closed(self, session: "Session") -> None:
        """The session's connection is gone; forget it."""

    def websocket_upgraded(self) -> None:
        """A session's WebSocket handshake succeeded (counted until it closes)."""


# The item type of a WebSocket connection's request head in read()'s output.
_UPGRADE = _core.UPGRADE_REQUEST
# The HTTP status a browser gets when the node refuses it during the
# handshake (bad request otherwise).
_HTTP_STATUS = {pb.AUTH_TIMEOUT: 408, pb.CONNECTION_LIMIT: 503, pb.ADDRESS_LIMIT: 429,
                pb.CONNECTION_RATE_LIMITED: 429, pb.SERVER_SHUTDOWN: 503, pb.TOO_MANY_REQUESTS: 429}


class _RawHead:
    """The request head is handed to its handler as the bytes it is."""

    FromString = staticmethod(bytes)


def _frame(ftype: int, msg) -> bytes:
    return _core.core_frame(ftype, msg.SerializeToString())


def _now_ms() -> int:
    return int(time.time() * 1000)


def _verify(token: str, cfg: NodeConfig) -> Claims:
    """The node's token rules: its secret, issuer, audience and lifetime cap."""
    return verify(token, cfg.secret, issuer=cfg.token_issuer, audience=cfg.token_audience,
                  max_lifetime=cfg.max_token_lifetime_s)


class Session:
    """Control-plane state of one connection; the core's ``owner``."""

    # Per-connection memory counts at 19k connections per process: keep
    # only what later decisions need (the device id goes to the auth log).
    __slots__ = ("host", "conn", "id", "peer_host", "peer_port", "user", "device_class",
                 "claims", "rooms", "connected_at", "_hard_close", "_logged_in", "_budget_at",
                 "sent_mark", "end_reason", "idle_s", "channel_wait")

    def __init__(self, host: SessionHost, conn: _core.Connection, peer, session_id: str):
        self.host = host
        self.conn = conn
        self.id = session_id
        self.peer_host = sys.intern(peer[0])   # one string per client address
        self.peer_port = peer[1]
        self.user: str | None = None
        self.device_class = ""
        self.claims: Claims | None = None
        # Most viewers join one room, many idle ones none: the set is made
        # on first join (an empty set alone costs 216 bytes).
        self.rooms: set[str] | frozenset[str] = _NO_ROOMS
        self.connected_at = host.loop.time()
        self._hard_close = None
        self.sent_mark = 0                       # conn.bytes_sent at the node's last sweep
        self._logged_in = False                  # holds a login the logic must be given back
        self.end_reason = 0                      # the Kick reason that closed it (event log)
        # The idle timeout granted with the ping interval the Hello asked
        # for, seconds; 0.0 (a shared constant, no float per session): the
        # node's idle_timeout_ms.
        self.idle_s = 0.0
        # (epoch, seq): the cursor of a connection waiting for its channel
        # (fanout.server.channels); None while it is not waiting.
        self.channel_wait: tuple[str, int] | None = None
        # The request budget, a token bucket of request_rate frames per
        # second holding request_burst, kept as one float (GCRA): the loop
        # time at which the bucket would have been empty. Tokens now are
        # min(burst, (now - _budget_at) * rate). It starts full.
        cfg = host.config
        self._budget_at = self.connected_at - cfg.request_burst / cfg.request_rate
        # A Hello is small: the full frame limit comes with authentication.
        conn.max_frame = min(cfg.max_hello_bytes, cfg.max_frame)
        conn.owner = self
        conn.start_reading(host.input_callback(self.on_readable))

    def __repr__(self) -> str:
        return f"<Session {self.id} user={self.user!r} peer={self.peer_host}:{self.peer_port}>"

    @property
    def closing(self) -> bool:
        return self.conn.closing

    # ---------------------------------------------------------------- input

    def authenticated_limits(self) -> None:
        """Lift the pre-authentication frame limit (called after AuthOk)."""
        self.conn.max_frame = self.host.config.max_frame

    def on_readable(self) -> None:
        # Every frame spends a token of the request budget; past it, read()
        # stops and keeps TOO_MANY_REQUESTS as its read_error (see _handle).
        cfg = self.host.config
        now = self.host.loop.time()
        tokens = min(cfg.request_burst, (now - self._budget_at) * cfg.request_rate)
        frames = self.conn.read(int(tokens))
        self._budget_at = now - (tokens - len(frames)) / cfg.request_rate
        self._handle(frames)

    def _handle(self, frames: list) -> bool:
        """Handle ``frames`` in order; True if a handler is still waiting on
        the logic (it resumes the rest when done)."""
        conn = self.conn
        for i, (ftype, _flags, body) in enumerate(frames):
            if conn.closing:
                return False
            entry = _HANDLERS.get(ftype)
            if entry is None:
                self.fail(pb.UNKNOWN_FRAME_TYPE, f"frame type 0x{ftype:02x} is not a client frame")
                return False
            handler, message_type = entry
            try:
                msg = message_type.FromString(body)
            except DecodeError as exc:
                self.fail(pb.BAD_PROTOBUF, f"{message_type.__name__} does not decode: {exc}")
                return False
            if self.user is None and ftype != FrameType.HELLO and ftype != _UPGRADE:
                self.fail(pb.AUTH_REQUIRED, "the first frame must be Hello")
                return False
            try:
                waiting = handler(self, msg)
                if waiting is not None:
                    waiting = eager.start(waiting)
            except Exception:
                self._internal_error(message_type.__name__)
                return False
            if waiting is not None:
                # Hold the rest until this handler is done: replies keep the
                # order of the requests, and the socket backs up meanwhile.
                conn.pause_reading()             # a closing connection keeps reading
                rest = frames[i + 1:]
                waiting.add_done_callback(lambda task: self._resume(task, rest, message_type))
                return True
        # Every frame before a bad one has had its answer: now the error.
        error = conn.read_error
        if error is not None and not conn.closing:
            self.fail(error.reason, error.message)
            return False
        if conn.eof and not conn.closing:
            log.debug("%s: peer closed", self)
            conn.close()
        return False

    def _resume(self, task: asyncio.Task, rest: list, message_type) -> None:
        if self.conn.closing:
            return
        if task.cancelled():                     # the loop is shutting down
            self.conn.close()
            return
        if task.exception() is not None:
            self._internal_error(message_type.__name__, task.exception())
            return
        if not self._handle(rest) and not self.conn.closing:
            self.conn.resume_reading()

    def _internal_error(self, what: str, exc: BaseException | None = None) -> None:
        # A bug must cost one connection, not the node's loop; a bug a
        # client can trigger at will must not flood the log either.
        self.host.throttled.log(logging.ERROR, "internal", "%s: internal error handling %s",
                                self, what, exc_info=exc if exc is not None else True)
        self.fail(pb.INTERNAL_ERROR, "internal error")

    async def _hello(self, msg: pb.Hello) -> None:
        if self.user is not None:
            self.fail(pb.ALREADY_AUTHENTICATED, "this connection is already authenticated")
            return
        if self._refuse_hello_shape(msg):
            return
        host = self.host
        try:
            claims = _verify(msg.token, host.config)
        except AuthError as exc:
            host.auth_failed(exc.reason)
            self.fail(exc.reason, exc.message)
            return
        device_class = msg.device_class or "default"
        try:
            replaced = await host.logic.login(claims.user, device_class, self.id,
                                              issued_at=claims.issued_at)
        except Rejected as exc:                  # TOKEN_REVOKED, UNAVAILABLE (cluster)
            if exc.reason != pb.UNAVAILABLE:
                host.auth_failed(exc.reason)
            self.fail(exc.reason, exc.message)
            return
        if replaced is not None:
            # The rule holds even if this connection is already gone.
            host.kick(replaced, pb.DUPLICATE_LOGIN,
                      f"user {claims.user} logged in again with device class {device_class}")
        if self.conn.closing:
            # Gone while the login was recorded: give it back.
            await host.logic.logout(claims.user, device_class, self.id)
            return
        self._logged_in = True
        self.claims = claims
        self.user = claims.user
        self.device_class = device_class
        host.session_authenticated(self)
        cfg = host.config
        interval, idle = cfg.grant_ping(msg.ping_interval_ms)
        low, high = cfg.ping_bounds()
        if msg.ping_interval_ms:
            self.idle_s = idle / 1000            # read by the node's timeout sweep
        auth_ok = pb.AuthOk(
            user=self.user, session=self.id, ping_interval_ms=interval,
            idle_timeout_ms=idle, token_expires_ms=claims.expires_at * 1000,
            compress_dict=cfg.compress_dict, ping_interval_min_ms=low, ping_interval_max_ms=high)
        if cfg.user_channels:
            if not await self._enter_channel(msg, auth_ok):
                return
        else:
            auth_ok.server_time_ms = _now_ms()
            self.send(FrameType.AUTH_OK, auth_ok)
        self.authenticated_limits()
        log.debug("%s: authenticated (device %s, class %r)", self, clip(msg.device_id),
                  device_class)
        # In order; a room named twice is answered like a second Join of it
        # (Error ALREADY_JOINED for the later one): nothing is replayed twice.
        for point in msg.resume:
            if self.conn.closing:
                return
            await self._join_room(0, point.room, point.last_seq, point.epoch)

    async def _enter_channel(self, hello: pb.Hello, auth_ok: pb.AuthOk) -> bool:
        """Make this connection a member of its user's channel, resumed where
        the Hello says, and answer with ``auth_ok`` carrying the cursor.

        If the channel is open here, or the client needs a replay, the
        connection joins its room (the Gap and replay follow the AuthOk).
        Otherwise it waits for the channel's next push with its cursor
        (fanout.server.channels): a room per connected user would cost every
        connection for the few users who get pushes. False if the connection
        is closing now: the channel's head could not be had (the cluster is
        unreachable: the client retries), or it closed meanwhile."""
        host = self.host
        name = user_channel(self.user)
        channels = host.channels
        # Where to resume the channel: the Hello's cursor, or the one taken
        # from the channel's head when the channel is not open here.
        last, epoch = hello.channel_last_seq, hello.channel_epoch
        from_head = False
        if not host.rooms.held(name):
            channels.expect(self.user, self)
            try:
                head = await host.logic.head(name)
            except Rejected as exc:
                channels.expected(self.user, self)
                # Without its channel the connection would miss the user's
                # pushes without knowing: refuse the Hello, as a failed login is.
                self.fail(exc.reason, f"the user's channel cannot be had: {exc.message}")
                return False
            woken = channels.expected(self.user, self)
            if self.conn.closing:
                return False
            cursor = _waiting_cursor(head, hello)
            if cursor is not None and not woken and not host.rooms.held(name):
                auth_ok.channel, (auth_ok.channel_epoch, auth_ok.channel_seq) = name, cursor
                auth_ok.server_time_ms = _now_ms()
                self.send(FrameType.AUTH_OK, auth_ok)
                self.channel_wait = cursor
                channels.wait(self.user, self)
                return not self.conn.closing
            if cursor is not None:
                # A push came (or another connection opened the channel)
                # while the head was on its way: what followed the head is
                # new to this client, so resume from the head, not "from now".
                (epoch, last), from_head = cursor, True
        try:
            room = await host.rooms.acquire(name)
        except Rejected as exc:
            self.fail(exc.reason, f"the user's channel cannot be opened: {exc.message}")
            return False
        if from_head and not epoch:
            epoch = room.epoch                 # no history at the head: all of it is new
        try:
            self._enter(room, 0, name, last, epoch, auth_ok)
        finally:
            if self.conn.closing or name not in self.rooms:
                host.rooms.leave(name, self.conn)
        return not self.conn.closing

    def channel_woken(self, room: _core.Room, name: str) -> None:
        """The channel this connection waited for is open: join it from the
        kept cursor (an Ack{req_id 0} with the epoch, Gap, replay). A cursor
        without an epoch was taken when the channel had no history: all of
        its current epoch is new to the client."""
        epoch, seq = self.channel_wait
        self.channel_wait = None
        if not self.conn.closing:
            self._enter(room, 0, name, seq, epoch or room.epoch)

    def _may_join(self, name: str, claims: Claims) -> bool:
        """The token allows ``name``; a user's channel only to that user
        (whatever the token's rooms claim says)."""
        if is_channel(name):
            return bool(self.host.config.user_channels) and name == user_channel(self.user)
        return claims.may_join(name)

    async def _refresh(self, msg: pb.Refresh) -> None:
        """A new token for this connection, before the current one expires.
        Refused: an Error with the request's id, and the connection keeps
        its current token (until that one expires)."""
        try:
            claims = _verify(msg.token, self.host.config)
        except AuthError as exc:
            self.error(msg.req_id, exc.reason, exc.message)
            return
        if claims.user != self.user:
            self.error(msg.req_id, pb.AUTH_INVALID,
                       "the refresh token is for another user ('sub')")
            return
        try:
            revoked = await self.host.logic.revoked(claims.user, claims.issued_at)
        except Rejected as exc:                  # UNAVAILABLE: keep the current token
            self.error(msg.req_id, exc.reason, exc.message)
            return
        if revoked:
            self.error(msg.req_id, pb.TOKEN_REVOKED, "the refresh token was revoked")
            return
        if self.conn.closing:
            return
        self.claims = claims
        # The new token's rooms apply from now on: leave what it no longer allows.
        for name in [r for r in self.rooms if not self._may_join(r, claims)]:
            self._leave_room(name)
            self.error(0, pb.ROOM_FORBIDDEN, f"the refreshed token does not allow room {clip(name)}",
                       name)
        self.send(FrameType.ACK, pb.Ack(req_id=msg.req_id))

    def _refuse_hello_shape(self, msg: pb.Hello) -> bool:
        """Refuse (and close) a Hello whose resume points exceed the room
        limit or whose device class is too long, before any token check or
        login: both are fixed by the client, not by the token. True if
        refused."""
        limit = self.host.config.max_rooms_per_conn
        if len(msg.resume) > limit:
            # Refused whole, not the first N answered: a client that sends
            # more than it may hold is broken or hostile, and answering part
            # of it would replay up to N rooms for nothing.
            self.fail(pb.TOO_MANY_ROOMS,
                      f"{len(msg.resume)} resume points, over the limit of {limit} rooms")
            return True
        if len(msg.device_class.encode("utf-8")) > MAX_DEVICE_CLASS:
            self.fail(pb.BAD_REQUEST, f"device_class longer than {MAX_DEVICE_CLASS} bytes")
            return True
        return False

    def _join(self, msg: pb.Join):
        return self._join_room(msg.req_id, msg.room, msg.last_seq, msg.epoch)

    async def _join_room(self, req_id: int, name: str, last_seq: int, epoch: str) -> None:
        host = self.host
        if self.conn.closing:                     # a closing connection gets no more work
            return
        try:
            check_room_name(name)
        except Rejected as exc:
            self.error(req_id, exc.reason, exc.message, name)
            return
        if name in self.rooms or (self.channel_wait is not None
                                  and name == user_channel(self.user)):
            # Not a resume: a second replay of the same history is work an
            # attacker could ask for 6,000 times in one write.
            self.error(req_id, pb.ALREADY_JOINED, "already in this room; Leave first to rejoin",
                       name)
            return
        if not self._may_join(name, self.claims):
            self.error(req_id, pb.ROOM_FORBIDDEN, _forbidden(name, host.config), name)
            return
        if not is_channel(name) and len(self.rooms) - self._in_channel() \
                >= host.config.max_rooms_per_conn:
            self.error(req_id, pb.TOO_MANY_ROOMS,
                       f"already in {len(self.rooms)} rooms, the limit", name)
            return
        try:
            room = await host.rooms.acquire(name)
        except Rejected as exc:
            self.error(req_id, exc.reason, exc.message, name)
            return
        try:
            self._enter(room, req_id, name, last_seq, epoch)
        finally:
            if self.conn.closing or name not in self.rooms:
                host.rooms.leave(name, self.conn)    # not joined after all: let it go

    def _in_channel(self) -> int:
        """1 if this connection is in its user's channel (which the room limit
        does not count), else 0."""
        return 1 if self.user is not None and user_channel(self.user) in self.rooms else 0

    def _enter(self, room: _core.Room, req_id: int, name: str, last_seq: int,
               epoch: str, auth_ok: pb.AuthOk | None = None) -> None:
        """Join ``room``, acquired for this connection: Ack (or, for the
        user's channel at Hello, ``auth_ok`` with the cursor), Gap, replay,
        then membership, all before anything else is written to it."""
        # After the acquire's suspension: the connection may have closed, or
        # an earlier request joined the room meanwhile.
        if self.conn.closing or name in self.rooms:
            if not self.conn.closing:
                self.error(req_id, pb.ALREADY_JOINED, "already in this room", name)
            return
        if not last_seq and not epoch:
            cursor = room.flushed_seq          # fresh join: from now on
        elif not epoch or epoch == room.epoch:
            cursor = min(last_seq, room.last_seq)
        else:
            cursor = 0                         # history was reset: from the start
        if auth_ok is None:
            self.send(FrameType.ACK, pb.Ack(req_id=req_id, room=name, seq=cursor,
                                            epoch=room.epoch))
        else:
            auth_ok.channel, auth_ok.channel_seq, auth_ok.channel_epoch = name, cursor, room.epoch
            auth_ok.server_time_ms = _now_ms()
            self.send(FrameType.AUTH_OK, auth_ok)
        if self.conn.closing:                  # the Ack found it too slow to keep
            return
        if cursor < room.flushed_seq:
            cfg = self.host.config
            gap_from, gap_to, frames = room.replay(cursor, cfg.max_batch_bytes, cfg.compress_min,
                                                   cfg.compress_level)
            if gap_from:
                self.send(FrameType.GAP, pb.Gap(room=name, from_seq=gap_from, to_seq=gap_to,
                                                epoch=room.epoch))
            for frame in frames:
                self.conn.send(frame, True)
        if self.conn.closing:
            return
        room.add(self.conn)
        if self.rooms is _NO_ROOMS:
            self.rooms = set()
        self.rooms.add(name)
        log.debug("%s: joined %s at seq %d", self, name, cursor)

    def _leave(self, msg: pb.Leave) -> None:
        if self.channel_wait is not None and msg.room == user_channel(self.user):
            self._stop_waiting()
            self.send(FrameType.ACK, pb.Ack(req_id=msg.req_id, room=msg.room))
            return
        if msg.room not in self.rooms:
            self.error(msg.req_id, pb.NOT_A_MEMBER, f"not in room {clip(msg.room)}", msg.room)
            return
        self._leave_room(msg.room)
        self.send(FrameType.ACK, pb.Ack(req_id=msg.req_id, room=msg.room))

    def _leave_room(self, name: str) -> None:
        if self.rooms is not _NO_ROOMS:
            self.rooms.discard(name)
        self.host.rooms.leave(name, self.conn)

    async def _chat(self, msg: pb.Chat) -> None:
        if is_channel(msg.room):
            self.error(msg.req_id, pb.ROOM_FORBIDDEN,
                       "a user's channel takes pushes from the admin API only, not chat",
                       msg.room)
            return
        if msg.room not in self.rooms:
            self.error(msg.req_id, pb.NOT_A_MEMBER, f"join {clip(msg.room)} before chatting in it",
                       msg.room)
            return
        if self.conn.closing:                     # a closing connection gets no more work
            return
        try:
            seq = await self.host.logic.chat(self.user, msg.room, msg.payload)
        except Rejected as exc:
            self.error(msg.req_id, exc.reason, exc.message, msg.room)
            return
        self.send(FrameType.ACK, pb.Ack(req_id=msg.req_id, room=msg.room, seq=seq))

    def _ping(self, msg: pb.Ping) -> None:
        self.send(FrameType.PONG, pb.Pong(nonce=msg.nonce, server_time_ms=_now_ms()))

    # ---------------------------------------------------------------- output

    def send(self, ftype: int, msg) -> None:
        self.conn.send(_frame(ftype, msg))

    def error(self, req_id: int, reason: int, message: str, room: str = "") -> None:
        """A request failed; the connection stays open.

        The reply is bounded whatever the request held: ``room`` is echoed
        only if it is a valid room name, and ``message`` (which may quote
        client input, through :func:`clip`) is cut to MAX_MESSAGE_CHARS."""
        message = message[:MAX_MESSAGE_CHARS]
        log.debug("%s: request %d refused: %s (%s)", self, req_id,
                  pb.Reason.Name(reason), message)
        self.send(FrameType.ERROR, pb.Error(reason=reason, message=message, req_id=req_id,
                                            room=_echo_room(room)))

    def fail(self, reason: int, message: str) -> None:
        """Protocol or auth failure: send Error with the reason, then close."""
        message = message[:MAX_MESSAGE_CHARS]
        name = pb.Reason.Name(reason)
        self.host.metrics.protocol_errors.labels(name).inc()
        self.host.throttled.log(logging.INFO, name, "%s: closing, %s: %s", self, name, message)
        self._close_with(_frame(FrameType.ERROR, pb.Error(reason=reason, message=message)),
                         reason=reason, message=message)

    def kick(self, reason: int, message: str, reconnect_after_ms: int = 0,
             drop_queued: bool = True) -> None:
        """Server-initiated close: send Kick with the reason, then close.

        ``drop_queued=False`` (a drain) delivers everything already queued
        for the client before the Kick, and takes as long as the caller
        allows: no close grace of its own, the drain's deadline closes it.
        """
        if self.conn.closing:
            return
        self.host.metrics.kicks.labels(pb.Reason.Name(reason)).inc()
        self.end_reason = reason
        log.debug("%s: kicked, %s: %s", self, pb.Reason.Name(reason), message)
        self._close_with(_frame(FrameType.KICK, pb.Kick(
            reason=reason, message=message, reconnect_after_ms=reconnect_after_ms)), drop_queued,
            reason=reason, message=message)

    def _close_with(self, frame: bytes, drop_queued: bool = True, *, reason: int = 0,
                    message: str = "") -> None:
        conn = self.conn
        if conn.closing:
            return
        self._detach()
        if getattr(conn, "upgraded", True):
            conn.close_after(frame, drop_queued, reason)
        else:
            # A browser still in its opening handshake reads HTTP, not frames.
            conn.refuse_upgrade(wsupgrade.refusal(
                _HTTP_STATUS.get(reason, 400), f"{pb.Reason.Name(reason)}: {message}"))
        if drop_queued:
            self._close_later()

    def _close_later(self) -> None:
        # The closing words get close_grace_ms to go out and the peer to
        # close; then the socket closes anyway.
        if not self.conn.closed:
            grace = self.host.config.close_grace_ms / 1000
            self._hard_close = self.host.loop.call_later(grace, self.conn.close)

    def _stop_waiting(self) -> None:
        self.channel_wait = None
        self.host.channels.discard(self.user, self)

    def _detach(self) -> None:
        """Stop receiving broadcasts and give up the login; idempotent."""
        for name in list(self.rooms):
            self._leave_room(name)
        if self.channel_wait is not None:
            self._stop_waiting()
        if self._logged_in:                    # give the login back, once
            self._logged_in = False
            eager.spawn(self.host.logic.logout(self.user, self.device_class, self.id),
                        f"{self}: logout", log)

    def _upgrade(self, head: bytes) -> None:
        # A WebSocket connection's opening handshake: the first item its
        # core connection reads (websocket.pxd).
        host = self.host
        try:
            response = wsupgrade.check(head, path=host.config.ws_path,
                                       origins=host.ws_origins)
        except wsupgrade.Refused as exc:
            host.metrics.protocol_errors.labels(exc.key).inc()
            host.throttled.log(logging.INFO, exc.key, "%s: WebSocket upgrade refused, %d: %s",
                               self, exc.status, exc.message)
            self.conn.refuse_upgrade(exc.response())
            self._close_later()
            return
        if self.conn.accept_upgrade(response):
            host.websocket_upgraded()
        else:
            self.conn.abort()

    # ---------------------------------------------------------------- core callbacks

    def connection_failed(self, status: int) -> None:
        if status == _core.STATUS_SLOW:
            if self.conn.closing:
                return
            self.host.metrics.slow_consumers.inc()
            self.end_reason = pb.SLOW_CONSUMER
            self.host.metrics.kicks.labels(pb.Reason.Name(pb.SLOW_CONSUMER)).inc()
            self.host.throttled.warning(
                "slow", "%s: cut as slow consumer (backlog %d bytes in %d frames)", self,
                self.conn.backlog_bytes, self.conn.backlog_frames)
            # Cut at once with an RST, so the kernel frees the socket's
            # buffers now rather than after close_grace_ms; the Kick goes
            # out only if the socket takes it right away.
            self._detach()
            self.conn.abort(_frame(FrameType.KICK, pb.Kick(
                reason=pb.SLOW_CONSUMER, message="write backlog over its bound")))
        elif status == _core.STATUS_TLS:
            # The handshake failed: nothing of this client reached the node.
            why = self.conn.tls_error or "TLS handshake failed"
            key = "NOT_TLS" if why.startswith("not TLS") else "TLS_HANDSHAKE"
            self.host.metrics.protocol_errors.labels(key).inc()
            self.host.throttled.log(logging.INFO, key, "%s: closing, TLS handshake failed: %s",
                                    self, why)
            self.conn.close()
        else:
            log.debug("%s: socket error, closing", self)
            self.conn.close()

    def connection_lost(self) -> None:
        try:
            self._detach()
        finally:
            # Whatever detaching did, the node forgets the session and its
            # address slots; a leak here would hold them for the process's life.
            if self._hard_close is not None:
                self._hard_close.cancel()
                self._hard_close = None
            # A handler still waiting on the logic is left to finish: it sees
            # the connection closed and undoes what it got (a login, a room).
            self.host.session_closed(self)
        log.debug("%s: closed", self)


_HANDLERS: dict[int, tuple[Callable, type]] = {
    FrameType.HELLO: (Session._hello, pb.Hello),
    FrameType.JOIN: (Session._join, pb.Join),
    FrameType.LEAVE: (Session._leave, pb.Leave),
    FrameType.CHAT: (Session._chat, pb.Chat),
    FrameType.PING: (Session._ping, pb.Ping),
    FrameType.REFRESH: (Session._refresh, pb.Refresh),
    # Not a wire frame: a WebSocket connection's request head (websocket.pxd).
    _UPGRADE: (Session._upgrade, _RawHead),
}
