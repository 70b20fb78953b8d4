"""Asyncio client SDK for fanout nodes (wire protocol v1, docs/protocol.md).

Typical use::

    async with Client("127.0.0.1", 7000, token, device_class="mobile") as client:
        await client.join("live:42")
        await client.say("live:42", "hello")
        async for event in client:
            if isinstance(event, pb.RoomMessage):
                show(event)
            elif isinstance(event, pb.Gap):
                warn_skipped(event.room, event.from_seq, event.to_seq)

The client reconnects by itself after a dropped connection or a transient
kick, and resumes every joined room from the last sequence number it
delivered. Its one guarantee is *no silent loss*: for each joined room the
events it yields account for every sequence number after the join exactly
once, either as a :class:`~fanout.protocol.fanout_pb2.RoomMessage` or inside a
:class:`~fanout.protocol.fanout_pb2.Gap`.

Tokens expire. Give the client a ``token_refresher`` (a function, or a
coroutine function, returning a new token) and it keeps the connection's
token fresh: it sends ``Refresh`` at about 80% of the token's remaining
lifetime (jittered), uses the latest token on every reconnect, and after a
``Kick(TOKEN_EXPIRED)`` or an ``AUTH_EXPIRED`` refusal gets a new token and
reconnects. A revoked token (``TOKEN_REVOKED``) ends the client.

Weak networks (docs/protocol.md, sections 5.6 and 5.8):

* **Adaptive heartbeat.** Each connection asks the node for a ping
  interval; a :class:`~fanout.client.heartbeat.HeartbeatTuner` searches, per
  ``network`` key the application passes (``"wifi:home"``), for the longest
  interval the network's NAT tolerates: it starts at ``heartbeat_start``,
  steps up by ``heartbeat_step`` after ``heartbeat_step_after`` answered
  probes (pings after a full interval of silence), and after a dead link
  (a ping unanswered for ``pong_timeout``, or the idle timeout) steps back
  to the last interval that held and locks there. While searching, the
  Hello asks for the next step (the current interval times
  ``heartbeat_step``), so the node cuts a dead connection after the idle
  timeout of what the client may try next, not of the node's maximum; a
  connection climbs at most one step, the next connection asks for the
  next. Once locked, the Hello asks for the interval found. What it learns
  is kept in a :class:`~fanout.client.heartbeat.HeartbeatStore` (in memory,
  or a JSON file with ``heartbeat_file``).
* **Reconnect ladder.** Exponential backoff with full jitter, capped at
  ``backoff_max``; after a ``Kick`` with ``reconnect_after_ms`` (a node
  draining) the first retry waits that long plus at most ``backoff_min``.
* **Racing.** Each (re)connect dials up to ``race`` of the node addresses
  (``endpoints``, and with ``dns=True`` every A/AAAA record of their names),
  ``race_stagger`` seconds apart; the first TCP/TLS connect wins and the
  others are closed (the Hello goes to the winner only: two would log in
  twice).
* **Resume under churn.** Every delivered message moves its room's cursor
  at once, so a connection lost in the middle of a replay resumes after the
  last message yielded; messages at or below the cursor are dropped as
  duplicates (``stats["duplicates"]``).

The SDK is pure Python (it uses :mod:`fanout.protocol.wire`, never the compiled
core) and costs two tasks and one socket per client (three with a
``token_refresher``), so one process can drive thousands of clients.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import inspect
import json
import logging
import random
import ssl
import time
from typing import Awaitable, Callable

from fanout.client import dial
from fanout.client.heartbeat import DEFAULT_STORE, HeartbeatStore, HeartbeatTuner
from fanout.protocol import wire
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol.errors import ReasonError
from fanout.protocol.wire import FrameType

__all__ = [
    "Client",
    "ClientError",
    "AuthError",
    "RequestError",
    "KickedError",
    "ConnectionLostError",
    "Event",
    "TokenRefresher",
    "REQUEST_TIMEOUT",
]

log = logging.getLogger(__name__)

#: Seconds a request (join, leave, say) waits for its Ack or Error,
#: including any time spent waiting for a reconnect.
REQUEST_TIMEOUT = 10.0

#: What iteration yields.
Event = pb.RoomMessage | pb.Gap | pb.Error

#: What the application gives to get a new token: ``() -> str`` or ``async () -> str``.
TokenRefresher = Callable[[], "str | Awaitable[str]"]

# A refresh is due at this fraction of the token's remaining lifetime, give
# or take the jitter (so clients given tokens at once do not refresh at once).
_REFRESH_AT = 0.8
_REFRESH_JITTER = 0.05
# A refused refresh is retried halfway to the expiry, unless less than this
# many seconds are left: then the node's Kick(TOKEN_EXPIRED) comes first.
_REFRESH_RETRY_MIN = 1.0

_READ_SIZE = 65536
# Used only if a node's AuthOk leaves the heartbeat fields at 0.
_DEFAULT_PING_INTERVAL = 15.0
_IDLE_PER_PING = 3
# A Ping after this share of the interval in silence (both ways) is a probe
# of the adaptive heartbeat.
_PROBE_SILENCE = 0.8
# Reasons after which reconnecting cannot help: the credentials or the
# client are wrong, or another device of this user took over. AUTH_TIMEOUT is
# left out on purpose: a Hello delayed by a bad network deserves a retry.
_FATAL_REASONS = frozenset(
    {
        pb.AUTH_REQUIRED,
        pb.AUTH_MISSING,
        pb.AUTH_INVALID,
        pb.AUTH_EXPIRED,
        pb.ALREADY_AUTHENTICATED,
        pb.DUPLICATE_LOGIN,
        pb.ADMIN_DISCONNECT,
        pb.TOKEN_EXPIRED,
        pb.TOKEN_REVOKED,
    }
)
# Fatal unless a token_refresher can get a new token.
_EXPIRED_REASONS = frozenset({pb.AUTH_EXPIRED, pb.TOKEN_EXPIRED})
_AUTH_REASONS = frozenset(range(pb.AUTH_REQUIRED, pb.ALREADY_AUTHENTICATED + 1)) | {
    pb.TOKEN_REVOKED
}
# Error reasons after which the node closes the connection (framing and auth).
_CLOSING_ERRORS = frozenset(range(pb.BAD_FRAME, pb.BAD_COMPRESSION + 1)) | _AUTH_REASONS
_CLOSING_ERRORS |= {pb.CONNECTION_LIMIT, pb.CONNECTION_RATE_LIMITED}
_END = object()  # queue marker: iteration is over


class ClientError(ReasonError):
    """Base class of the SDK's errors.

    :ivar reason: a ``fanout.v1.Reason`` code (``int``); 0 when the error did
        not come from the node.
    :ivar message: human-readable detail.
    """


class AuthError(ClientError):
    """The node rejected the Hello (bad, expired or missing token, ...)."""


class RequestError(ClientError):
    """The node answered a join, leave or say with an Error.

    :ivar room: the room of the failed request.
    """

    def __init__(self, reason: int, message: str = "", room: str = "") -> None:
        super().__init__(reason, message)
        self.room = room


class KickedError(ClientError):
    """The node ended the session for good (duplicate login, auth failure).

    Raised by iteration; the client does not reconnect after it.
    """


class ConnectionLostError(ClientError):
    """The connection ended before a reply arrived, or for good when the
    client does not reconnect.

    :ivar reconnect_after: seconds the node asked the client to wait before
        reconnecting (from ``Kick.reconnect_after_ms``), else 0.
    """

    def __init__(self, reason: int, message: str = "", reconnect_after: float = 0.0) -> None:
        super().__init__(reason, message)
        self.reconnect_after = reconnect_after


def _token_exp(token: str) -> float | None:
    """The ``exp`` of a JWT, read without checking it (the node checks), or
    None if the token is not a JWT with an integer ``exp``."""
    try:
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = data.get("exp")
    except (IndexError, ValueError, TypeError, AttributeError):
        return None
    return float(exp) if type(exp) is int else None


class _Pending:
    """A request waiting for its Ack or Error."""

    __slots__ = ("ftype", "room", "future")

    def __init__(self, ftype: FrameType, room: str, future: asyncio.Future) -> None:
        self.ftype = ftype
        self.room = room
        self.future = future


class _Connection:
    """One TCP connection; a :class:`Client` goes through many of them."""

    __slots__ = ("reader", "writer", "decoder", "auth", "started", "last_recv", "last_sent",
                 "pong", "pong_frames", "error")

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, now: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = wire.FrameDecoder(wire.MAX_SERVER_FRAME)
        self.auth: pb.AuthOk | None = None
        self.started = now
        self.last_recv = now
        self.last_sent = now
        self.pong = 0                            # nonce of the last Pong
        self.pong_frames = 0                     # the client's frame count at it
        self.error: Exception | None = None

    def send(self, ftype: FrameType, msg) -> None:
        self.writer.write(wire.encode_frame(ftype, msg))
        self.last_sent = asyncio.get_running_loop().time()

    def fail(self, error: Exception) -> None:
        """Record why the connection ends (first cause wins) and drop it.

        Aborting makes the pending ``read()`` return, which ends the
        connection's read loop.
        """
        if self.error is None:
            self.error = error
        self.writer.transport.abort()

    def close(self) -> None:
        if not self.writer.transport.is_closing():
            self.writer.close()


class Client:
    """A connection to a fanout node that survives disconnects.

    :param host: node address.
    :param port: node TCP port.
    :param token: JWT sent in every Hello. The attribute ``token`` may be
        replaced at any time; the next reconnect uses it. A successful
        :meth:`refresh` replaces it too.
    :param device_id: opaque install id, for the node's logs.
    :param device_class: one login per user and device class; a newer login
        of the same class kicks this one with ``DUPLICATE_LOGIN``.
    :param reconnect: reconnect and resume after a lost connection or a
        transient kick. If false, iteration raises
        :class:`ConnectionLostError` instead.
    :param backoff_min: base of the exponential reconnect backoff, seconds.
    :param backoff_max: cap of the reconnect backoff, seconds.
    :param connect_timeout: seconds for TCP connect plus the Hello/AuthOk
        exchange.
    :param client_name: sent in ``Hello.client`` for the node's logs.
    :param tls: connect with TLS (the node's ``tls_port``): ``True`` for a
        default context that verifies the node's certificate and host name
        (against ``ca`` if given, else the system's CAs), or an
        :class:`ssl.SSLContext` of your own.
    :param ca: a CA file (PEM) to trust; implies ``tls=True``.
    :param server_hostname: the name the certificate must carry (default:
        the host connected to).
    :param token_refresher: returns a new token for the same user (a plain or
        a coroutine function). With it the client refreshes the live
        connection's token before it expires, and gets a new token instead
        of ending when the node says the token expired. An exception it
        raises is logged and the refresh retried (on a reconnect, with the
        reconnect backoff).
    :param endpoints: more node addresses ``(host, port)``; reconnects
        rotate through them and each connect races up to ``race`` of them.
    :param race: how many addresses one connect dials at most.
    :param race_stagger: seconds between starting two dials of a race (an
        attempt that fails starts the next at once). Mars: 3 at 2.5 s.
    :param dns: resolve each endpoint's name to all its A/AAAA records and
        race those.
    :param network: the key of the network the device is on; the adaptive
        heartbeat remembers one interval per key.
    :param adaptive_heartbeat: search for the longest ping interval (else
        ping at the node's default).
    :param heartbeat_store: where the search's results are kept (default:
        one store in memory per process, or ``heartbeat_file``).
    :param heartbeat_file: a JSON file to keep them in across runs.
    :param heartbeat_step_after: answered probes before stepping up.
    :param heartbeat_step: factor of a step up (> 1).
    :param heartbeat_start: seconds: the safe interval the search starts at
        on an unknown network (within the node's bounds).
    :param pong_timeout: seconds a Ping may go unanswered, with nothing else
        received, before the link counts as dead (at most the idle timeout
        minus the interval). A dead link is thus noticed within the
        interval plus this of the link dying while quiet, and within the
        connection's idle timeout in any case.

    Received events are buffered in an unbounded :class:`asyncio.Queue`: the
    SDK never pushes back on the node, so an application that stops
    consuming grows memory instead of getting kicked as a slow consumer.
    """

    #: Per-request timeout in seconds; may be overridden per instance.
    request_timeout = REQUEST_TIMEOUT

    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        *,
        device_id: str = "",
        device_class: str = "default",
        reconnect: bool = True,
        backoff_min: float = 0.2,
        backoff_max: float = 10.0,
        connect_timeout: float = 5.0,
        client_name: str = "fanout-py",
        token_refresher: TokenRefresher | None = None,
        endpoints: list[tuple[str, int]] | None = None,
        tls: bool | ssl.SSLContext = False,
        ca: str | None = None,
        server_hostname: str | None = None,
        race: int = 3,
        race_stagger: float = 2.5,
        dns: bool = False,
        network: str = "",
        adaptive_heartbeat: bool = True,
        heartbeat_store: HeartbeatStore | None = None,
        heartbeat_file: str | None = None,
        heartbeat_step_after: int = 3,
        heartbeat_step: float = 1.5,
        heartbeat_start: float = 20.0,
        pong_timeout: float = 5.0,
    ) -> None:
        if not 0 < backoff_min <= backoff_max:
            raise ValueError("need 0 < backoff_min <= backoff_max")
        if connect_timeout <= 0:
            raise ValueError("connect_timeout must be positive")
        if race < 1 or race_stagger < 0 or pong_timeout <= 0:
            raise ValueError("need race >= 1, race_stagger >= 0 and pong_timeout > 0")
        self.host = host
        self.port = port
        # Every node the client may use: after a lost connection or a kick
        # it reconnects to the next one and resumes there (any node of a
        # cluster serves any room from the shared history).
        self.endpoints = [(host, port)] + [tuple(e) for e in endpoints or ()
                                           if tuple(e) != (host, port)]
        self.token = token
        self.device_id = device_id
        self.device_class = device_class
        self.reconnect = reconnect
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.client_name = client_name
        self.token_refresher = token_refresher
        if isinstance(tls, ssl.SSLContext):
            self.ssl: ssl.SSLContext | None = tls
        elif tls or ca:
            self.ssl = ssl.create_default_context(cafile=ca)
        else:
            self.ssl = None
        self.server_hostname = server_hostname
        self.race = race
        self.race_stagger = race_stagger
        self.dns = dns
        self.pong_timeout = pong_timeout
        if heartbeat_store is None:
            heartbeat_store = HeartbeatStore(heartbeat_file) if heartbeat_file else DEFAULT_STORE
        #: The heartbeat search of ``network`` (None: adaptive_heartbeat off).
        self.heartbeat: HeartbeatTuner | None = (
            HeartbeatTuner(heartbeat_store, network, step_after=heartbeat_step_after,
                           step_factor=heartbeat_step, start_ms=int(heartbeat_start * 1000))
            if adaptive_heartbeat else None)
        # Server clock minus ours, seconds, from the last AuthOk: token
        # times are the node's.
        self._clock_offset = 0.0
        #: Counters: frames received, messages and gaps yielded, duplicate
        #: messages dropped, successful reconnects.
        self.stats: dict[str, int] = {
            "frames": 0,
            "messages": 0,
            "duplicates": 0,
            "gaps": 0,
            "reconnects": 0,
            "sampled_batches": 0,
            "refreshes": 0,
            "dead_links": 0,
            "probes": 0,
        }
        self._online: dict[str, int] = {}  # room -> last Presence count

        # room -> [epoch, seq]: the joined rooms and the last seq accounted
        # for (delivered or covered by a Gap). A list so the hot path
        # updates it in place.
        self._cursors: dict[str, list] = {}
        # The user's channel, as the node named it in AuthOk: resumed
        # through the Hello's channel fields, not as a resume point.
        self._channel: str | None = None
        self._pending: dict[int, _Pending] = {}
        self._last_req_id = 0
        self._events: asyncio.Queue = asyncio.Queue()
        self._conn: _Connection | None = None
        self._auth: pb.AuthOk | None = None  # AuthOk of the current connection
        self._ready = asyncio.Event()  # set while connected, and once ended
        self._runner: asyncio.Task | None = None
        self._started = False
        self._closed = False
        self._ended = False
        self._end_error: Exception | None = None

    # ------------------------------------------------------------ public API

    async def connect(self) -> None:
        """Connect, authenticate and resume the joined rooms.

        One attempt only: failures are raised, not retried. Reconnecting
        starts once a first connection has been established.

        :raises AuthError: the node refused the token.
        :raises KickedError: the node kicked the Hello for good.
        :raises ConnectionLostError: the node closed or broke the connection.
        :raises OSError: TCP connect failed.
        :raises asyncio.TimeoutError: no AuthOk within ``connect_timeout``.
        :raises RuntimeError: already connected, or closed.
        """
        if self._closed:
            raise RuntimeError("client is closed")
        if self._started:
            raise RuntimeError("connect() was already called")
        conn = await self._open()
        self._started = True
        self._runner = asyncio.get_running_loop().create_task(
            self._run(conn), name=f"fanout-client-{self.host}:{self.port}"
        )

    async def close(self) -> None:
        """Stop reconnecting, close the connection and end iteration.

        Events still queued are discarded; pending requests fail with
        :class:`ConnectionLostError`. Calling it again is harmless.
        """
        if self._closed:
            return
        self._closed = True
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.wait({self._runner})  # unlike await, leaves our own cancellation alone
        if self._conn is not None:  # the runner was cancelled before it started
            self._conn.close()
        self._disconnected(ConnectionLostError(0, "client closed"))
        self._finish(None, discard_queued=True)

    async def join(self, room: str, *, last_seq: int = 0, epoch: str = "") -> pb.Ack:
        """Join a room, or resume it after ``last_seq`` of ``epoch``.

        The Ack's ``seq`` becomes the room's cursor: the next event for the
        room is its message ``seq + 1`` or a Gap starting there.

        :param last_seq: 0 to start at the room's current head; else replay
            every message after it (a Gap reports what is no longer kept).
        :param epoch: the epoch ``last_seq`` belongs to.
        :raises RequestError: the node refused (ROOM_FORBIDDEN, TOO_MANY_ROOMS, ...).
        :raises ConnectionLostError: the connection dropped before the reply.
        :raises asyncio.TimeoutError: no reply within ``request_timeout``.
        """
        return await self._request(
            FrameType.JOIN, pb.Join(room=room, last_seq=last_seq, epoch=epoch)
        )

    async def leave(self, room: str) -> pb.Ack:
        """Leave a room. Its messages are dropped from the moment of the call.

        :raises RequestError: e.g. NOT_A_MEMBER.
        :raises ConnectionLostError: the connection dropped before the reply
            (the room is still left: it is not resumed).
        :raises asyncio.TimeoutError: no reply within ``request_timeout``.
        """
        return await self._request(FrameType.LEAVE, pb.Leave(room=room))

    async def say(self, room: str, payload: bytes | str) -> pb.Ack:
        """Publish a chat message to a joined room.

        :param payload: application bytes; a ``str`` is sent as UTF-8.
        :returns: the Ack; its ``seq`` is the sequence number the node
            assigned (this client receives the message too, with that seq).
        :raises RequestError: e.g. RATE_LIMITED, MESSAGE_TOO_LARGE, NOT_A_MEMBER.
        :raises ConnectionLostError: the connection dropped before the reply;
            the message may or may not have been published.
        :raises asyncio.TimeoutError: no reply within ``request_timeout``.
        """
        if isinstance(payload, str):
            payload = payload.encode()
        return await self._request(FrameType.CHAT, pb.Chat(room=room, payload=payload))

    async def refresh(self, token: str | None = None) -> pb.Ack:
        """Give the live connection a new token (a ``Refresh``); on success
        it becomes :attr:`token`, used by later reconnects too.

        A new token whose ``rooms`` no longer allow a joined room makes the
        node leave that room: iteration yields an ``Error(ROOM_FORBIDDEN)``
        for it (``req_id`` 0), before this returns.

        :param token: the new token; default: ask ``token_refresher``.
        :raises RequestError: the node refused the token (``AUTH_INVALID``,
            ``AUTH_EXPIRED``, ``TOKEN_REVOKED``); the connection keeps its
            current token.
        :raises ConnectionLostError: the connection dropped before the reply.
        :raises asyncio.TimeoutError: no reply within ``request_timeout``.
        """
        if token is None:
            token = await self._new_token()
        ack = await self._request(FrameType.REFRESH, pb.Refresh(token=token))
        self.token = token
        self.stats["refreshes"] += 1
        return ack

    async def next_event(self, timeout: float | None = None) -> Event | None:
        """Wait for the next event.

        :returns: a :class:`pb.RoomMessage`, a :class:`pb.Gap` (messages the
            node can no longer deliver, announced by it or detected by the
            client), or a :class:`pb.Error` with ``req_id`` 0 (the node
            refused to resume that room, or a refreshed token no longer
            allows it; it is no longer joined). ``None``
            once :meth:`close` was called.
        :raises KickedError: kicked for good (after all earlier events).
        :raises AuthError: re-authentication failed while reconnecting.
        :raises ConnectionLostError: connection lost and ``reconnect`` is off.
        :raises asyncio.TimeoutError: nothing within ``timeout`` seconds.
        """
        if timeout is None:
            item = await self._events.get()
        else:
            item = await asyncio.wait_for(self._events.get(), timeout)
        if item is _END:
            self._events.put_nowait(_END)  # every later call ends the same way
            if self._end_error is not None:
                raise self._end_error
            return None
        return item

    def online(self, room: str) -> int | None:
        """The room's online count from the node's last Presence frame, or
        None before the first one."""
        return self._online.get(room)

    def cursor(self, room: str) -> tuple[str, int] | None:
        """``(epoch, seq)`` of the last message accounted for in ``room``, or
        ``None`` if the room is not joined."""
        cur = self._cursors.get(room)
        return None if cur is None else (cur[0], cur[1])

    @property
    def rooms(self) -> list[str]:
        """The joined rooms (the ones resumed on reconnect); the user's
        channel is :attr:`channel`."""
        return [room for room in self._cursors if room != self._channel]

    @property
    def channel(self) -> str | None:
        """The user's channel (``"@" + user``) once connected to a node with
        user channels: pushes to this user (``POST /v1/publish`` with
        ``"user"``) arrive as messages of this room, with seqs, and resume
        like a room's. Every connection of the user is a member from its
        AuthOk on; :meth:`leave` of it lasts until the next connection."""
        return self._channel

    @property
    def connected(self) -> bool:
        """Whether a connection is authenticated right now."""
        return self._conn is not None

    @property
    def auth(self) -> pb.AuthOk | None:
        """The AuthOk of the current connection, if connected."""
        return self._conn.auth if self._conn is not None else None

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Event:
        event = await self.next_event()
        if event is None:
            raise StopAsyncIteration
        return event

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    # ------------------------------------------------------------ connection lifecycle

    async def _open(self) -> _Connection:
        return await asyncio.wait_for(self._handshake(), self.connect_timeout)

    def _rotation(self) -> list[tuple[str, int]]:
        """The endpoints, starting at the current one."""
        at = self.endpoints.index((self.host, self.port))
        return self.endpoints[at:] + self.endpoints[:at]

    async def _handshake(self) -> _Connection:
        candidates = await dial.resolve(self._rotation(), self.dns)
        reader, writer, (_addr, port, host) = await dial.race(
            candidates, fan=self.race, stagger=self.race_stagger, ssl=self.ssl,
            server_hostname=self.server_hostname)
        self.host, self.port = host, port
        conn = _Connection(reader, writer, asyncio.get_running_loop().time())
        self._auth = None
        try:
            conn.send(FrameType.HELLO, self._hello())
            # Frames that share a read with the AuthOk (resume Acks, Gaps,
            # replays) are dispatched right away, in order, by _receive.
            while self._auth is None:
                data = await reader.read(_READ_SIZE)
                if not data:
                    raise ConnectionLostError(0, "node closed the connection during the handshake")
                error = self._receive(conn, data)
                if error is not None:
                    raise error
        except BaseException:
            conn.writer.transport.abort()
            self._auth = None
            raise
        conn.auth = self._auth
        if conn.auth.server_time_ms:
            self._clock_offset = conn.auth.server_time_ms / 1000 - time.time()
        self._conn = conn
        self._ready.set()
        log.debug(
            "connected to %s:%s as %s (session %s)",
            self.host,
            self.port,
            conn.auth.user,
            conn.auth.session,
        )
        return conn

    def _hello(self) -> pb.Hello:
        channel = self._cursors.get(self._channel) if self._channel else None
        return pb.Hello(
            token=self.token,
            device_id=self.device_id,
            device_class=self.device_class,
            client=self.client_name,
            ping_interval_ms=self.heartbeat.request_ms() if self.heartbeat else 0,
            resume=[
                pb.ResumePoint(room=room, last_seq=seq, epoch=epoch)
                for room, (epoch, seq) in self._cursors.items()
                if room != self._channel
            ],
            channel_epoch=channel[0] if channel else "",
            channel_last_seq=channel[1] if channel else 0,
        )

    async def _run(self, conn: _Connection) -> None:
        """Serve connections until closed or ended for good."""
        loop = asyncio.get_running_loop()
        attempt = 0
        try:
            while True:
                error = await self._serve(conn)
                self._disconnected(error)
                if not self.reconnect or not self._retryable(error):
                    self._finish(error)
                    return
                need_token = self._token_spent(error)
                # A connection that dies right after connecting keeps
                # backing off; only a stable one resets the backoff.
                if loop.time() - conn.started >= self.backoff_max:
                    attempt = 0
                log.info("connection to %s:%s lost (%s); reconnecting", self.host, self.port, error)
                drained = getattr(error, "reconnect_after", 0.0)
                while True:
                    if drained:
                        # A clean drain: the node said when; the ladder
                        # starts over after this first retry.
                        await asyncio.sleep(drained + random.uniform(0.0, self.backoff_min))
                        drained = 0.0
                        attempt = 0
                    else:
                        await asyncio.sleep(
                            getattr(error, "reconnect_after", 0.0) + self._backoff(attempt))
                    attempt += 1
                    try:
                        if need_token:
                            self.token = await self._new_token()
                            need_token = False
                        conn = await self._open()
                        break
                    except (OSError, asyncio.TimeoutError, ClientError) as exc:
                        if not self._retryable(exc):
                            self._finish(exc)
                            return
                        log.info("reconnect to %s:%s failed (%s)", self.host, self.port, exc)
                        self._next_endpoint()
                        need_token = need_token or self._token_spent(exc)
                        error = exc
                self.stats["reconnects"] += 1
        except Exception as exc:  # a bug: end iteration with it instead of hanging
            log.exception("fanout client failed")
            self._disconnected(exc)
            self._finish(exc)

    def _retryable(self, error: Exception) -> bool:
        if not isinstance(error, (KickedError, AuthError)) or error.reason not in _FATAL_REASONS:
            return True
        return self._token_spent(error)

    def _token_spent(self, error: Exception) -> bool:
        """Whether ``error`` says the token expired and a new one can be had."""
        return (self.token_refresher is not None and isinstance(error, ClientError)
                and error.reason in _EXPIRED_REASONS)

    async def _new_token(self) -> str:
        """A token from ``token_refresher``.

        :raises ClientError: there is none, or it failed (reason 0: retryable).
        """
        if self.token_refresher is None:
            raise ClientError(0, "no token_refresher to get a new token from")
        try:
            token = self.token_refresher()
            if inspect.isawaitable(token):
                token = await token
        except Exception as exc:
            raise ClientError(0, f"token_refresher failed: {exc!r}") from exc
        if not isinstance(token, str):
            raise ClientError(0, f"token_refresher returned {type(token).__name__}, not str")
        return token

    def _server_now(self) -> float:
        return time.time() + self._clock_offset

    async def _keep_token(self, conn: _Connection) -> None:
        """Refresh the connection's token before it expires, while it lasts."""
        expires = conn.auth.token_expires_ms / 1000
        if self.token_refresher is None or not expires:
            return
        while True:
            left = expires - self._server_now()
            jitter = random.uniform(-_REFRESH_JITTER, _REFRESH_JITTER)
            await asyncio.sleep(max(0.0, left * (_REFRESH_AT + jitter)))
            while True:
                try:
                    await self.refresh()
                    break
                except (ClientError, asyncio.TimeoutError) as exc:
                    if isinstance(exc, ConnectionLostError):
                        return                   # the read loop handles it
                    if isinstance(exc, ClientError) and exc.reason == pb.TOKEN_REVOKED:
                        log.warning("token refresh refused: %s", exc)
                        return                   # the node's Kick(TOKEN_REVOKED) follows
                    left = expires - self._server_now()
                    log.warning("token refresh failed (%s); %.1f s left", exc, left)
                    if left < _REFRESH_RETRY_MIN:
                        return                   # refresh after the Kick(TOKEN_EXPIRED)
                    await asyncio.sleep(left / 2)
            new_exp = _token_exp(self.token)
            # An opaque token: assume it lives as long as the last one did.
            expires = new_exp if new_exp is not None else self._server_now() + max(left, 1.0)

    def _backoff(self, attempt: int) -> float:
        # Full jitter: spreads a crowd of clients that lost the same node.
        return random.uniform(
            0.0, min(self.backoff_max, self.backoff_min * 2.0 ** min(attempt, 32))
        )

    async def _serve(self, conn: _Connection) -> Exception:
        """Read and dispatch until the connection ends; return why it ended."""
        loop = asyncio.get_running_loop()
        pinger = loop.create_task(self._keepalive(conn))
        keeper = loop.create_task(self._keep_token(conn)) if self.token_refresher else None
        try:
            while conn.error is None:
                try:
                    data = await conn.reader.read(_READ_SIZE)
                except OSError as exc:
                    conn.fail(ConnectionLostError(0, f"connection lost: {exc}"))
                    break
                if not data:
                    conn.fail(ConnectionLostError(0, "node closed the connection"))
                    break
                error = self._receive(conn, data)
                if error is not None:
                    conn.fail(error)
        finally:
            pinger.cancel()
            if keeper is not None:
                keeper.cancel()
            conn.close()
        return conn.error

    async def _keepalive(self, conn: _Connection) -> None:
        """Ping after an interval of silence; declare the link dead
        when a Ping goes unanswered for ``pong_timeout`` with nothing else
        received, or nothing at all arrived for the idle timeout. Feeds the
        heartbeat search: probes answered, dead links."""
        loop = asyncio.get_running_loop()
        auth = conn.auth
        grant_ms = auth.ping_interval_ms or int(_DEFAULT_PING_INTERVAL * 1000)
        idle = auth.idle_timeout_ms / 1000 or grant_ms / 1000 * _IDLE_PER_PING
        tuner = self.heartbeat
        if tuner is not None:
            interval = tuner.granted(grant_ms, auth.ping_interval_min_ms,
                                     auth.ping_interval_max_ms)
        else:
            interval = grant_ms / 1000
        grant = grant_ms / 1000
        pong_timeout = min(self.pong_timeout, max(idle - grant, 0.05))
        nonce = 0
        # (nonce, sent at) of the Pings not answered yet, oldest first: the
        # pong timeout runs from the oldest, or pinging more often than it
        # (a short grant) would put off a dead link until the idle timeout.
        unanswered: collections.deque[tuple[int, float]] = collections.deque()
        sent_at = 0.0           # of the oldest unanswered Ping (0: none)
        probe = 0               # nonce of the outstanding probe (0: none)
        probe_ms = 0
        probe_frames = 0        # frames received before the probe
        while True:
            now = loop.time()
            while unanswered and unanswered[0][0] <= conn.pong:
                unanswered.popleft()
            sent_at = unanswered[0][1] if unanswered else 0.0
            if probe and conn.pong >= probe:
                # Only a Pong that came alone counts: a frame before it was
                # already on its way, and broke the silence at the NAT.
                if conn.pong == probe and conn.pong_frames == probe_frames + 1:
                    self.stats["probes"] += 1
                    if tuner is not None:
                        interval = tuner.probe_answered(probe_ms, grant_ms)
                probe = 0
            quiet = now - conn.last_recv
            if quiet >= idle or (sent_at and now - max(sent_at, conn.last_recv) >= pong_timeout):
                why = (f"nothing received from the node for {idle:g} s" if quiet >= idle else
                       f"a ping unanswered for {pong_timeout:g} s")
                self.stats["dead_links"] += 1
                if tuner is not None:
                    tuner.dead_link()
                conn.fail(ConnectionLostError(pb.HEARTBEAT_TIMEOUT, f"dead link: {why}"))
                return
            # A Ping is due after an interval of silence both ways (what a
            # NAT times), and at the latest a granted interval after the
            # last frame sent (what the node requires).
            silent_since = max(conn.last_sent, conn.last_recv)
            due = min(silent_since + interval, conn.last_sent + grant)
            if now >= due:
                nonce += 1
                if not probe and now - silent_since >= interval * _PROBE_SILENCE:
                    # Its answer says the path held through that silence
                    # (pinging on the node's schedule, the last Pong's
                    # round trip eats into the interval: hence the share).
                    probe, probe_ms = nonce, int(interval * 1000)
                    probe_frames = self.stats["frames"]
                conn.send(FrameType.PING, pb.Ping(nonce=nonce))
                unanswered.append((nonce, now))
                sent_at = sent_at or now
                due = now + interval
            wake = min(due, conn.last_recv + idle)
            if sent_at:
                wake = min(wake, max(sent_at, conn.last_recv) + pong_timeout)
            await asyncio.sleep(max(0.0, wake - now) + 0.001)

    def _disconnected(self, error: Exception) -> None:
        """Forget the connection; fail the requests it carried (whether the
        node acted on them is unknown). The next attempt goes to the next
        endpoint."""
        self._next_endpoint()
        self._conn = None
        self._auth = None
        if not self._ended:
            self._ready.clear()
        reason = getattr(error, "reason", 0)
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(
                    ConnectionLostError(reason, f"connection lost before the reply ({error})")
                )
        self._pending.clear()

    def _next_endpoint(self) -> None:
        if len(self.endpoints) > 1:
            index = (self.endpoints.index((self.host, self.port)) + 1) % len(self.endpoints)
            self.host, self.port = self.endpoints[index]

    def _finish(self, error: Exception | None, *, discard_queued: bool = False) -> None:
        """End iteration with ``error`` (``None``: cleanly), after the events
        already queued unless ``discard_queued``. Only :meth:`close` may end
        an iteration that already ended, to make it end cleanly."""
        if self._ended and not discard_queued:
            return
        if discard_queued:
            while not self._events.empty():
                self._events.get_nowait()
        self._ended = True
        self._end_error = error
        self._ready.set()  # wake requests waiting for a connection
        self._events.put_nowait(_END)

    # ------------------------------------------------------------ requests

    async def _request(self, ftype: FrameType, msg) -> pb.Ack:
        return await asyncio.wait_for(self._exchange(ftype, msg), self.request_timeout)

    async def _exchange(self, ftype: FrameType, msg) -> pb.Ack:
        # While reconnecting, requests wait for the next connection.
        while self._conn is None:
            if self._ended or self._closed:
                raise ConnectionLostError(
                    0, f"client is not connected ({self._end_error or 'closed'})"
                )
            if not self._started:
                raise RuntimeError("call connect() first")
            await self._ready.wait()
        conn = self._conn
        future = self._register(ftype, msg)
        try:
            if ftype == FrameType.LEAVE:
                # Left from now on: later messages are dropped, and the room
                # is not resumed even if the reply is lost with the connection.
                self._cursors.pop(msg.room, None)
            conn.send(ftype, msg)
            try:
                await conn.writer.drain()
            except ConnectionError:
                pass  # the read loop notices too and fails `future`
            return await future
        finally:
            self._pending.pop(msg.req_id, None)

    def _register(self, ftype: FrameType, msg) -> asyncio.Future:
        """Give ``msg`` a fresh nonzero req_id and track its reply."""
        req_id = self._last_req_id
        while True:
            req_id = req_id % 0xFFFFFFFF + 1
            if req_id not in self._pending:
                break
        self._last_req_id = msg.req_id = req_id
        future = asyncio.get_running_loop().create_future()
        room = "" if ftype == FrameType.REFRESH else msg.room
        self._pending[req_id] = _Pending(ftype, room, future)
        return future

    # ------------------------------------------------------------ frame handling

    def _receive(self, conn: _Connection, data: bytes) -> ClientError | None:
        """Handle bytes read from ``conn``; return an error if it must end."""
        conn.last_recv = asyncio.get_running_loop().time()
        try:
            frames = conn.decoder.feed(data)
        except wire.WireError as exc:
            return ConnectionLostError(exc.reason, f"bad frame from the node: {exc.message}")
        for ftype, _flags, body in frames:
            error = self._dispatch(ftype, body)
            if error is not None:
                return error
        return None

    def _dispatch(self, ftype: int, body: bytes) -> ClientError | None:
        """Decode and handle one frame body."""
        self.stats["frames"] += 1
        handler = self._HANDLERS.get(ftype)
        if handler is None:
            # Forward compatibility: a newer node may add frame types.
            log.debug("ignoring frame type 0x%02x", ftype)
            return None
        try:
            msg = wire.decode_message(ftype, body)
        except wire.WireError as exc:
            return ConnectionLostError(exc.reason, f"bad frame from the node: {exc.message}")
        return handler(self, msg)

    def _on_auth_ok(self, msg: pb.AuthOk) -> ClientError | None:
        if self._auth is not None:
            log.warning("ignoring a second AuthOk")
            return None
        if msg.compress_dict and msg.compress_dict not in wire.DICTIONARIES:
            # Its frames would fail to inflate; say why now, once.
            return ConnectionLostError(
                pb.BAD_COMPRESSION,
                f"the node compresses with lz4 dictionary {msg.compress_dict}, "
                f"which this client does not hold (it holds {sorted(wire.DICTIONARIES)})")
        self._auth = msg
        if msg.channel:
            # The channel's cursor, read like a resume point's Ack (the Gap
            # and replay that follow in this read must see it).
            self._channel = msg.channel
            self._cursors.setdefault(msg.channel, [msg.channel_epoch, msg.channel_seq])
            self._resumed(msg.channel, msg.channel_epoch, msg.channel_seq)
        elif self._channel is not None:
            # This node has no user channels: nothing comes through it here.
            self._cursors.pop(self._channel, None)
            self._channel = None
        return None

    def _on_error(self, err: pb.Error) -> ClientError | None:
        if self._auth is None:  # answer to the Hello
            cls = AuthError if err.reason in _AUTH_REASONS else ConnectionLostError
            return cls(err.reason, err.message)
        pending = self._pending.get(err.req_id) if err.req_id else None
        if pending is not None:
            if not pending.future.done():
                pending.future.set_exception(RequestError(err.reason, err.message, pending.room))
            return None
        if err.req_id == 0 and err.reason in _CLOSING_ERRORS:
            cls = KickedError if err.reason in _FATAL_REASONS else ConnectionLostError
            return cls(err.reason, err.message)
        if err.req_id == 0 and err.room in self._cursors:
            # A resume point was refused, or a refreshed token no longer
            # allows the room: it is no longer joined. The
            # application is told, since its messages stop here.
            log.warning(
                "node refused or ended room %r: %s", err.room, ClientError(err.reason, err.message)
            )
            del self._cursors[err.room]
            self._events.put_nowait(err)
        else:
            log.debug(
                "unmatched Error (request timed out?): %s", ClientError(err.reason, err.message)
            )
        return None

    def _on_kick(self, kick: pb.Kick) -> ClientError:
        if kick.reason in _FATAL_REASONS:
            return KickedError(kick.reason, kick.message)
        return ConnectionLostError(kick.reason, kick.message, kick.reconnect_after_ms / 1000)

    def _on_pong(self, pong: pb.Pong) -> None:
        # Receiving it already refreshed conn.last_recv; the keepalive
        # matches the nonce to its Ping.
        if self._conn is not None and pong.nonce > self._conn.pong:
            self._conn.pong = pong.nonce
            self._conn.pong_frames = self.stats["frames"]

    def _on_presence(self, presence: pb.Presence) -> None:
        if presence.room in self._cursors:
            self._online[presence.room] = presence.online

    def _on_ack(self, ack: pb.Ack) -> None:
        if ack.req_id == 0:
            # Reply to a Hello resume point: matched by room.
            self._resumed(ack.room, ack.epoch, ack.seq)
            return
        pending = self._pending.get(ack.req_id)
        if pending is None:
            log.debug("unmatched Ack for req_id %d (request timed out?)", ack.req_id)
            return
        if pending.ftype == FrameType.JOIN:
            # Set here, not in join(): the Gap and replay that follow the Ack
            # may be in this very read and must see the new cursor.
            self._cursors[pending.room] = [ack.epoch, ack.seq]
        if not pending.future.done():
            pending.future.set_result(ack)

    def _resumed(self, room: str, epoch: str, seq: int) -> None:
        """The node's answer to a resume of ``room`` (a resume point's Ack,
        the AuthOk for the channel): its cursor, unless in the same epoch it
        is behind ours. Then this node is behind the one the client left (a
        cluster): it sends the seqs the client already has as they reach it,
        dropped as duplicates, not yielded again."""
        cur = self._cursors.get(room)
        if cur is not None and (epoch != cur[0] or seq > cur[1]):
            cur[0], cur[1] = epoch, seq

    def _on_gap(self, gap: pb.Gap) -> None:
        cur = self._cursors.get(gap.room)
        if cur is None:
            return
        if gap.to_seq <= cur[1]:
            log.debug(
                "ignoring stale Gap %s %d..%d (cursor %d)",
                gap.room,
                gap.from_seq,
                gap.to_seq,
                cur[1],
            )
            return
        if gap.from_seq != cur[1] + 1:
            # Keep the accounting contiguous: the yielded Gap always starts
            # right after the cursor.
            log.warning(
                "Gap %s %d..%d does not start after cursor %d",
                gap.room,
                gap.from_seq,
                gap.to_seq,
                cur[1],
            )
            gap = pb.Gap(room=gap.room, from_seq=cur[1] + 1, to_seq=gap.to_seq, epoch=gap.epoch)
        if gap.epoch:
            cur[0] = gap.epoch
        self._emit_gap(cur, gap)

    def _on_batch(self, batch: pb.Batch) -> None:
        cursors = self._cursors
        stats = self.stats
        if batch.sampled:
            stats["sampled_batches"] += 1
        put = self._events.put_nowait
        for msg in batch.messages:
            cur = cursors.get(msg.room)
            if cur is None:
                continue  # not joined (or just left)
            seq = msg.seq
            if seq <= cur[1]:
                stats["duplicates"] += 1  # e.g. replay overlapping live delivery
                continue
            if seq > cur[1] + 1:
                log.warning(
                    "room %s: messages %d..%d missing without a Gap", msg.room, cur[1] + 1, seq - 1
                )
                self._emit_gap(
                    cur, pb.Gap(room=msg.room, from_seq=cur[1] + 1, to_seq=seq - 1, epoch=cur[0])
                )
            cur[1] = seq
            stats["messages"] += 1
            put(msg)

    def _emit_gap(self, cur: list, gap: pb.Gap) -> None:
        cur[1] = gap.to_seq
        self.stats["gaps"] += 1
        self._events.put_nowait(gap)

    _HANDLERS = {
        FrameType.AUTH_OK: _on_auth_ok,
        FrameType.ERROR: _on_error,
        FrameType.BATCH: _on_batch,
        FrameType.KICK: _on_kick,
        FrameType.PONG: _on_pong,
        FrameType.PRESENCE: _on_presence,
        FrameType.GAP: _on_gap,
        FrameType.ACK: _on_ack,
    }
