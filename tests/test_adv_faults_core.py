"""Fault injection in the core (issue 8, item 9): one exception must not stop
a room forever, the other rooms, a publish or the node.

* a flush whose observer raises: the rooms after it in the same loop turn
  still flush, and the faulty room flushes again next time (it used to stay
  marked as scheduled forever);
* a member whose owner callback raises inside Hub.publish (a full batch
  flushes synchronously): the publish still returns its seq, the other
  members get the frame, the faulty connection alone gets Error(INTERNAL_ERROR)
  and is closed, and the node keeps serving; a throttled log line says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from conftest import token
from fanout import _core
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol import wire
from inprocess import local_app

FT = wire.FrameType


class Owner:
    def __init__(self, fail=False):
        self.fail = fail
        self.failed = []
        self.lost = 0

    def connection_failed(self, status):
        self.failed.append(status)
        if self.fail:
            raise RuntimeError("injected: owner callback")

    def connection_lost(self):
        self.lost += 1


def pair(loop, owner, small=False, **limits):
    node_side, client_side = socket.socketpair()
    if small:
        node_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client_side.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    node_side.setblocking(False)
    conn = _core.TcpConnection(node_side.detach(), loop, **limits)
    conn.owner = owner
    conn.start_reading(lambda: None)
    client_side.setblocking(False)
    return conn, client_side


def record(room, seq, payload=b"m"):
    return _core.encode_room_message(room, seq, pb.CHAT, 0, "u", payload, 0)


def read_all(sock) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


async def test_a_raising_flush_stops_neither_other_rooms_nor_itself():
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop, max_delay=0.0)
    faults = []
    hub.error_handler = lambda where, exc: faults.append((where, exc))
    calls = []

    def observer(*args):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("injected: flush observer")
    hub.flush_observer = observer
    rooms = [hub.room(name, "e", 0) for name in ("a", "b", "c")]
    peers = []
    for room in rooms:
        conn, peer = pair(loop, Owner())
        room.add(conn)
        peers.append(peer)
    for room in rooms:                         # quiet rooms: one call_soon for all
        hub.publish(room.name, "e", 1, record(room.name, 1))
    await asyncio.sleep(0.01)
    assert [r.flushed_seq for r in rooms] == [1, 1, 1]
    assert all(read_all(p) for p in peers)     # every room's members got it
    assert len(faults) == 1 and faults[0][0] is rooms[0]
    for room in rooms:                         # and nobody is stuck as scheduled
        hub.publish(room.name, "e", 2, record(room.name, 2))
    await asyncio.sleep(0.01)
    assert [r.flushed_seq for r in rooms] == [2, 2, 2]
    assert len(calls) == 6


async def test_a_raising_owner_costs_its_connection_not_the_publish():
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop, max_batch_bytes=1024)
    faults = []
    hub.error_handler = lambda where, exc: faults.append((where, exc))
    room = hub.room("r", "e", 0)
    good, good_peer = pair(loop, Owner())
    bad_owner = Owner(fail=True)
    bad, bad_peer = pair(loop, bad_owner, small=True, max_backlog_bytes=16_384)
    room.add(good)
    room.add(bad)
    seq = 0
    while not bad_owner.failed:
        seq += 1
        # 2 KB records: past max_batch_bytes, so each publish flushes inside it
        assert hub.publish("r", "e", seq, record("r", seq, b"x" * 2000)) is True
        assert room.flushed_seq == seq
        read_all(good_peer)
        assert seq < 1000
    assert bad_owner.failed == [_core.STATUS_SLOW]
    assert [w for w, _e in faults] == [bad]
    assert bad.closing and not good.closing
    assert hub.publish("r", "e", seq + 1, record("r", seq + 1, b"x" * 2000)) is True
    assert read_all(good_peer)                 # the others still get every frame
    # the faulty one's stream: whole frames, ending with Error(INTERNAL_ERROR)
    got = bytearray()
    for _ in range(200):
        got += read_all(bad_peer)
        await asyncio.sleep(0.005)
        if bad.closed or got.endswith(b"internal error"):
            break
    frames = list(wire.FrameDecoder().feed(bytes(got)))
    ftype, _flags, body = frames[-1]
    assert ftype == FT.ERROR and pb.Error.FromString(body).reason == pb.INTERNAL_ERROR
    bad_peer.close()
    for _ in range(200):
        if bad.closed:
            break
        await asyncio.sleep(0.005)
    assert bad.closed and bad_owner.lost == 1
    good.close()


class FaultyOwner:
    """Stands in for a session as its connection's owner; its
    connection_failed raises (a bug), the rest is the session's."""

    def __init__(self, session):
        self.session = session

    def connection_failed(self, status):
        raise RuntimeError("injected: session callback")

    def connection_lost(self):
        self.session.connection_lost()


async def _read_frames(reader, decoder, until, timeout=10.0):
    frames = []

    async def fill():
        while not until(frames):
            data = await reader.read(1 << 20)
            if not data:
                return
            frames.extend((t, wire.decode_message(t, b)) for t, _f, b in decoder.feed(data))
    await asyncio.wait_for(fill(), timeout)
    return frames


async def test_node_keeps_serving_when_a_session_callback_raises(caplog):
    caplog.set_level(logging.ERROR, logger="fanout.node")
    async with local_app(max_backlog_bytes=16_384, max_batch_bytes=1024,
                         max_publish_bytes=1 << 16) as app:
        node = app.node
        host, port = node.address

        async def client(user):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(wire.encode_frame(FT.HELLO, pb.Hello(token=token(user)))
                         + wire.encode_frame(FT.JOIN, pb.Join(req_id=1, room="show")))
            return reader, writer

        good_r, good_w = await client("good")
        bad = socket.socket()                    # a member that does not read
        bad.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        bad.setblocking(False)
        await asyncio.get_running_loop().sock_connect(bad, (host, port))
        bad.send(wire.encode_frame(FT.HELLO, pb.Hello(token=token("bad")))
                 + wire.encode_frame(FT.JOIN, pb.Join(req_id=1, room="show")))
        good_dec = wire.FrameDecoder()
        await _read_frames(good_r, good_dec, lambda f: any(t == FT.ACK for t, _ in f))
        for _ in range(100):
            if len(node.sessions) == 2 and len(node.rooms.get("show") or ()) == 2:
                break
            await asyncio.sleep(0.01)
        [bad_session] = [s for s in node.sessions.values() if s.user == "bad"]
        bad_session.conn.owner = FaultyOwner(bad_session)
        # The slow, faulty member is found during a flush inside publish.
        seqs, got = [], []
        while not bad_session.conn.closing:
            seqs.append(await node.publish("show", "gift", os.urandom(3000)))
            assert len(seqs) < 5000
            got += await _read_frames(good_r, good_dec, lambda f: bool(f))
        assert seqs == list(range(1, len(seqs) + 1))   # every publish returned its seq
        got += await _read_frames(
            good_r, good_dec,
            lambda f: sum(len(m.messages) for t, m in got + f if t == FT.BATCH) >= len(seqs))
        assert [m.seq for t, b in got if t == FT.BATCH for m in b.messages] == seqs
        # the faulty one gets Error(INTERNAL_ERROR) as its last frame
        bad.setblocking(True)
        bad_r, bad_w = await asyncio.open_connection(sock=bad)
        bad_frames = await _read_frames(bad_r, wire.FrameDecoder(),
                                        lambda f: bool(f) and f[-1][0] == FT.ERROR)
        assert bad_frames[-1][1].reason == pb.INTERNAL_ERROR
        assert "internal error in the core" in caplog.text
        # and the node keeps serving: a new client pings, publishes go on
        new_r, new_w = await client("newcomer")
        new_w.write(wire.encode_frame(FT.PING, pb.Ping(nonce=5)))
        frames = await _read_frames(new_r, wire.FrameDecoder(),
                                    lambda f: any(t == FT.PONG for t, _ in f))
        assert [m.nonce for t, m in frames if t == FT.PONG] == [5]
        assert await node.publish("show", "gift", b"after") == len(seqs) + 1
        for w in (good_w, bad_w, new_w):
            w.close()
