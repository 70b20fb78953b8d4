"""Per-room state has an owner and an end: looking creates nothing, a
join/leave loop leaves nothing behind, and a session keeps its replies in
request order even when the logic answers later (as a network logic does).

The node runs in the test's event loop (tests/inprocess.py) so the tests can
count the rooms of the hub, the logic and the bus directly.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from conftest import token
from fanout.protocol.channels import is_channel
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol import wire
from fanout.protocol.wire import FrameType as FT
from inprocess import local_app


class StreamClient:
    """A raw protocol client on asyncio streams (the node shares the loop)."""

    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = wire.FrameDecoder()
        self.frames: list[tuple[int, object]] = []

    @classmethod
    async def connect(cls, address) -> "StreamClient":
        return cls(*await asyncio.open_connection(*address))

    def send(self, *frames: tuple[int, object]) -> None:
        self.writer.write(b"".join(wire.encode_frame(t, m) for t, m in frames))

    async def until(self, count: int, ftype: int = FT.ACK, timeout: float = 60.0) -> list:
        """Read until ``count`` frames of ``ftype`` have arrived in all; every
        frame read so far, in order."""
        async def fill():
            while sum(t == ftype for t, _ in self.frames) < count:
                data = await self.reader.read(1 << 20)
                assert data, "node closed the connection"
                self.frames += [(t, wire.decode_message(t, b)) for t, _f, b in self.decoder.feed(data)]
        await asyncio.wait_for(fill(), timeout)
        return self.frames

    def close(self) -> None:
        self.writer.close()


def room_counts(app, *, channels: bool = False) -> tuple[int, int, int]:
    """(hub rooms, logic rooms, bus subscriptions); users' channels only with
    ``channels``."""
    def count(names) -> int:
        return sum(1 for name in names if channels or not is_channel(name))
    return (count(app.node.hub.rooms), count(app.logic.sequencer.rooms),
            count(app.bus.rooms))


async def settle(app, until, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not until() and loop.time() < deadline:
        await asyncio.sleep(0.01)


async def test_looking_at_unknown_rooms_creates_nothing():
    async with local_app(admin_port=0, api_key="k") as app:
        host, port = app.admin.address
        headers = {"Authorization": "Bearer k"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async def look(names):
                for name in names:
                    async with http.get(f"http://{host}:{port}/v1/rooms/{name}") as resp:
                        assert resp.status == 200
                        body = await resp.json()
                        assert body == {"room": name, "epoch": "", "online": 0, "last_seq": 0}
            await asyncio.gather(*(look(f"ghost-{w}-{i}" for i in range(2500)) for w in range(4)))
        assert room_counts(app) == (0, 0, 0)


async def test_join_leave_loop_leaves_no_room_state():
    pairs = 100_000
    async with local_app(max_rooms_per_conn=1, request_rate=1e6, request_burst=1e6) as app:
        client = await StreamClient.connect(app.node.address)
        client.send((FT.HELLO, pb.Hello(token=token("walker"))))
        await client.until(1, FT.AUTH_OK)
        chunk = 5000
        for start in range(0, pairs, chunk):
            client.send(*[frame for i in range(start, start + chunk) for frame in (
                (FT.JOIN, pb.Join(req_id=1, room=f"room-{i}")),
                (FT.LEAVE, pb.Leave(req_id=2, room=f"room-{i}")))])
            frames = await client.until(2 * (start + chunk))
            assert all(t in (FT.AUTH_OK, FT.ACK) for t, _ in frames)   # no Error, no Kick
            # While it runs, at most the room in hand is held anywhere.
            assert max(room_counts(app)) <= 1
        assert room_counts(app) == (0, 0, 0)
        client.close()


async def test_rooms_with_history_are_kept_for_resume_then_forgotten():
    async with local_app(room_idle_ttl_s=0.3) as app:
        client = await StreamClient.connect(app.node.address)
        client.send((FT.HELLO, pb.Hello(token=token("viewer"))),
                    (FT.JOIN, pb.Join(req_id=1, room="show")))
        await client.until(1)
        await app.node.publish("show", "gift", b"rocket")
        client.send((FT.LEAVE, pb.Leave(req_id=2, room="show")))
        await client.until(2)
        assert room_counts(app) == (1, 1, 1)               # history a client may resume
        client.send((FT.JOIN, pb.Join(req_id=3, room="show", last_seq=0)))
        await client.until(3)
        await asyncio.sleep(0.8)
        assert room_counts(app) == (1, 1, 1)               # a member holds it
        client.send((FT.LEAVE, pb.Leave(req_id=4, room="show")))
        await client.until(4)
        app.node.rooms.sweep(0.3)                           # the node's periodic sweep, now
        await asyncio.sleep(0.4)
        app.node.rooms.sweep(0.3)
        await settle(app, lambda: room_counts(app) == (0, 0, 0))
        assert room_counts(app) == (0, 0, 0)
        client.close()


async def test_a_users_channel_opens_with_its_first_push_and_is_kept_for_resume():
    async with local_app(room_idle_ttl_s=0.3) as app:
        quiet = await StreamClient.connect(app.node.address)
        quiet.send((FT.HELLO, pb.Hello(token=token("quiet"))))
        await quiet.until(1, FT.AUTH_OK)
        pushed = await StreamClient.connect(app.node.address)
        pushed.send((FT.HELLO, pb.Hello(token=token("pushed"))))
        await pushed.until(1, FT.AUTH_OK)
        # Connected users who were never pushed to hold nothing but their
        # place in the waiting table: no room, no logic state, no subscription.
        assert room_counts(app, channels=True) == (0, 0, 0)
        assert len(app.node.channels) == 2
        await app.node.push("pushed", "system", b"receipt")
        await pushed.until(1, FT.BATCH)
        assert set(app.node.hub.rooms) == {"@pushed"}
        assert room_counts(app, channels=True) == (1, 1, 1)
        assert len(app.node.channels) == 1
        quiet.close()
        pushed.close()
        await settle(app, lambda: len(app.node.channels) == 0
                     and not len(app.node.hub.rooms["@pushed"]))
        # Pushed to: kept for a resume, then forgotten like a room.
        assert room_counts(app, channels=True) == (1, 1, 1)
        await asyncio.sleep(0.4)
        app.node.rooms.sweep(0.3)
        await settle(app, lambda: room_counts(app, channels=True) == (0, 0, 0))
        assert room_counts(app, channels=True) == (0, 0, 0)


async def test_a_channel_with_history_not_open_here_waits_or_replays_by_cursor():
    async with local_app() as app:
        first = await StreamClient.connect(app.node.address)
        first.send((FT.HELLO, pb.Hello(token=token("sleeper"))))
        await first.until(1, FT.AUTH_OK)
        await app.node.push("sleeper", "system", b"one")
        frames = await first.until(1, FT.BATCH)
        [wake] = [m for t, m in frames if t == FT.ACK]
        assert (wake.req_id, wake.room, wake.seq) == (0, "@sleeper", 0) and wake.epoch
        first.close()
        await settle(app, lambda: not len(app.node.hub.rooms["@sleeper"]))
        app.node.rooms.sweep(0.0)     # the node lets the room go; its history stays
        await settle(app, lambda: "@sleeper" not in app.node.hub.rooms)
        assert "@sleeper" in app.logic.sequencer.rooms
        # Up to date: waits with its cursor, nothing opened.
        current = await StreamClient.connect(app.node.address)
        current.send((FT.HELLO, pb.Hello(token=token("sleeper"), device_class="a",
                                         channel_last_seq=1, channel_epoch=wake.epoch)))
        [(_, ok)] = await current.until(1, FT.AUTH_OK)
        assert (ok.channel_seq, ok.channel_epoch) == (1, wake.epoch)
        assert "@sleeper" not in app.node.hub.rooms
        # Behind: the channel opens at its Hello, and what follows the AuthOk
        # accounts for seq 1: a Gap, since this node's ring went with the room
        # (a cluster would replay it from the stored history).
        behind = await StreamClient.connect(app.node.address)
        behind.send((FT.HELLO, pb.Hello(token=token("sleeper"), device_class="b",
                                        channel_last_seq=0, channel_epoch=wake.epoch)))
        frames = await behind.until(1, FT.GAP)
        assert [t for t, _ in frames] == [FT.AUTH_OK, FT.GAP]
        assert frames[0][1].channel_seq == 0
        assert (frames[1][1].from_seq, frames[1][1].to_seq) == (1, 1)
        assert "@sleeper" in app.node.hub.rooms
        # The next push: the waiting one joins from its cursor, both get it once.
        await app.node.push("sleeper", "gift", b"two")
        for client in (current, behind):
            frames = await client.until(1, FT.BATCH)
            got = [m.seq for t, b in frames if t == FT.BATCH for m in b.messages]
            assert got == [2]
        [rejoin] = [m for t, m in current.frames if t == FT.ACK]
        assert (rejoin.req_id, rejoin.seq, rejoin.epoch) == (0, 1, wake.epoch)
        current.close()
        behind.close()


class LaterLogic:
    """The embedded logic answering one loop turn late, like a service
    across the network: every call suspends before it is answered."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.sequencer = inner.sequencer

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    def set_degradation(self, level: int) -> None:
        self.inner.set_degradation(level)

    def __getattr__(self, name):
        call = getattr(self.inner, name)

        async def later(*args, **kwargs):
            await asyncio.sleep(0.002)
            return await call(*args, **kwargs)
        return later


def _later_logic(cfg, bus):
    from fanout.server.app import local_logic
    return LaterLogic(local_logic(cfg, bus))


class GatedHeadLogic(LaterLogic):
    """The embedded logic whose ``head`` answers (computed at once) only when
    the test opens the gate: a head call in flight, as across a network."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.gate = asyncio.Event()
        self.asked = asyncio.Event()

    async def head(self, room):
        answer = await self.inner.head(room)
        self.asked.set()
        await self.gate.wait()
        return answer

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_a_push_while_the_hello_asks_for_the_channel_head_is_accounted_for():
    from fanout.bus.local import LocalBus
    from fanout.server import config
    from fanout.server.app import local_logic

    bus = LocalBus()
    cfg = config.load(None, env={}, overrides={"secret": "x"})
    logic = GatedHeadLogic(local_logic(cfg, bus))
    async with local_app(bus=bus, logic=logic) as app:
        client = await StreamClient.connect(app.node.address)
        client.send((FT.HELLO, pb.Hello(token=token("racer"))))
        await asyncio.wait_for(logic.asked.wait(), 5)    # head taken: no history yet
        assert await app.node.push("racer", "system", b"during the hello") == 1
        logic.gate.set()
        # Woken while asking: the connection resumes from the head it got
        # (before the push), so seq 1 is accounted for after its AuthOk: here
        # as a Gap, since a single node keeps no history of a channel that
        # was not open when the push came (a cluster replays it).
        frames = await client.until(1, FT.GAP)
        assert [t for t, _ in frames] == [FT.AUTH_OK, FT.GAP]
        auth_ok, gap = frames[0][1], frames[1][1]
        assert (auth_ok.channel, auth_ok.channel_seq) == ("@racer", 0) and auth_ok.channel_epoch
        assert (gap.room, gap.from_seq, gap.to_seq) == ("@racer", 1, 1)
        # and it is a member now: the next push comes live
        assert await app.node.push("racer", "system", b"after") == 2
        frames = await client.until(1, FT.BATCH)
        assert [m.seq for t, b in frames if t == FT.BATCH for m in b.messages] == [2]
        client.close()


async def test_replies_keep_request_order_when_the_logic_answers_later():
    from fanout.bus.local import LocalBus
    from fanout.server import config

    bus = LocalBus()
    cfg = config.load(None, env={}, overrides={"secret": "x"})   # only the logic's limits
    async with local_app(bus=bus, logic=_later_logic(cfg, bus)) as app:
        client = await StreamClient.connect(app.node.address)
        client.send((FT.HELLO, pb.Hello(token=token("ann"))),
                    (FT.JOIN, pb.Join(req_id=1, room="a")),
                    *[(FT.CHAT, pb.Chat(req_id=10 + i, room="a", payload=b"hi")) for i in range(3)],
                    (FT.LEAVE, pb.Leave(req_id=2, room="a")),
                    (FT.JOIN, pb.Join(req_id=3, room="b")),
                    (FT.PING, pb.Ping(nonce=99)))
        frames = await client.until(1, FT.PONG)
        replies = [(t, getattr(m, "req_id", None), getattr(m, "seq", None)) for t, m in frames
                   if t in (FT.AUTH_OK, FT.ACK, FT.PONG, FT.ERROR)]
        assert replies == [(FT.AUTH_OK, None, None), (FT.ACK, 1, 0), (FT.ACK, 10, 1),
                           (FT.ACK, 11, 2), (FT.ACK, 12, 3), (FT.ACK, 2, 0), (FT.ACK, 3, 0),
                           (FT.PONG, None, None)]
        client.close()
        await settle(app, lambda: not app.node.sessions)
        await settle(app, lambda: room_counts(app)[0] == 1)
        # "a" has history (three chats) and stays for resumes; "b" is gone.
        assert list(app.node.hub.rooms) == ["a"]


async def test_a_join_cut_short_by_a_close_holds_nothing():
    from fanout.bus.local import LocalBus
    from fanout.server import config

    bus = LocalBus()
    cfg = config.load(None, env={}, overrides={"secret": "x"})
    async with local_app(bus=bus, logic=_later_logic(cfg, bus)) as app:
        client = await StreamClient.connect(app.node.address)
        client.send((FT.HELLO, pb.Hello(token=token("bo"))))
        await client.until(1, FT.AUTH_OK)
        client.send((FT.JOIN, pb.Join(req_id=1, room="brief")))
        client.writer.transport.abort()              # gone while the logic answers
        await settle(app, lambda: not app.node.sessions and room_counts(app) == (0, 0, 0))
        assert room_counts(app) == (0, 0, 0)
        assert len(app.logic.inner.logins) == 0      # the login was given back


# ---------------------------------------------------------------- RoomTable races

class JoinLater:
    """A logic whose join takes its head at once but answers a little later,
    so the bus can deliver newer messages before the room exists here."""

    def __init__(self, inner, delay: float = 0.02) -> None:
        self.inner, self.delay = inner, delay

    async def join(self, room):
        head = await self.inner.join(room)
        await asyncio.sleep(self.delay)
        return head

    async def release(self, room):
        await self.inner.release(room)


def _table(logic_factory):
    from fanout import _core
    from fanout.bus.local import LocalBus
    from fanout.server import config
    from fanout.server.app import local_logic
    from fanout.server.rooms import RoomTable

    bus = LocalBus()
    inner = local_logic(config.load(None, env={}, overrides={}), bus)
    hub = _core.Hub(asyncio.get_running_loop())
    return RoomTable(hub, bus, logic_factory(inner)), inner, hub


def _member():
    import socket

    from fanout import _core
    a, b = socket.socketpair()
    a.setblocking(False)
    return _core.TcpConnection(a.detach(), asyncio.get_running_loop()), b


async def test_messages_published_while_a_room_opens_reach_it():
    rooms, logic, hub = _table(JoinLater)
    opening = asyncio.ensure_future(rooms.acquire("live"))
    await asyncio.sleep(0.005)                  # head taken, answer not yet back
    assert "live" not in hub.rooms
    for _ in range(3):
        await logic.publish("live", pb.GIFT, b"g", sender="svc")
    room = await opening
    assert room.last_seq == 3
    hub.flush()
    assert (room.oldest_seq, room.flushed_seq) == (1, 3)   # in the ring to resume from


async def test_a_waiter_never_joins_a_room_retired_under_it():
    rooms, _logic, hub = _table(JoinLater)
    conn, peer = _member()

    async def opener_then_gone():
        room = await rooms.acquire("x")
        rooms.leave("x", conn)                  # its connection closed: retired at once
        return room

    first = asyncio.ensure_future(opener_then_gone())
    await asyncio.sleep(0.005)
    second = asyncio.ensure_future(rooms.acquire("x"))
    retired = await first
    room = await second
    assert room is not retired and hub.rooms.get("x") is room
    conn.close()
    peer.close()


async def test_an_app_that_fails_to_start_stops_what_it_started():
    import socket

    from fanout.server import config
    from fanout.server.app import App

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cfg = config.load(None, env={}, overrides={
        "port": 0, "admin_port": taken.getsockname()[1], "secret": "s" * 32})
    app = App(cfg)
    try:
        with pytest.raises(OSError):
            await app.start()
        assert app.logic._timer is None         # the logic's sweep stopped
        assert app.node.draining
    finally:
        taken.close()
