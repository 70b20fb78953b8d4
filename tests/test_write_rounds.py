"""The core's writer threads (pyx/core/rounds.pxd) on real socketpairs: one
writer per socket, order per connection with several threads, the fd
lifetime rule (close during a round, with fd reuse attempted), slow
consumers cut during a threaded round, and what waits for a round."""

from __future__ import annotations

import asyncio
import os
import random
import socket

import pytest

from fanout import _core
from fanout.protocol import fanout_pb2 as pb

from test_core import MAX, make_pair, record

PING = 0x01          # any type will do for a control frame here


def frames_of(data: bytes):
    frames, used = _core.parse_frames(data, MAX)
    assert used == len(data), "the stream ends inside a frame"
    return frames


def seqs_and_controls(data: bytes) -> list:
    """The stream as a list: seqs of batches, ("c", body) for control frames."""
    out = []
    for ftype, _flags, body in frames_of(data):
        if ftype == 0x43:
            out.extend(m.seq for m in pb.Batch.FromString(body).messages)
        else:
            out.append(("c", body))
    return out


async def read_all(sock: socket.socket, idle: float = 0.0) -> bytes:
    """Everything the peer has: until the socket is empty, and then stays
    empty for `idle` seconds (a backlog the loop drains needs a few turns)."""
    out = bytearray()
    quiet = 0.0
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            if quiet >= idle:
                return bytes(out)
            await asyncio.sleep(0.005)
            quiet += 0.005
            continue
        if not chunk:
            return bytes(out)
        out += chunk
        quiet = 0.0


def threaded_hub(loop, threads=2, min_members=1, **kw):
    return _core.Hub(loop, max_delay=0.0, write_threads=threads,
                     thread_min_members=min_members, **kw)


async def test_threaded_round_same_frame_in_order_everywhere():
    """300 members, 2 writer threads, 120 flushes with control frames sent
    to random members in between: every member gets every seq once and in
    order, and every control frame once, in the order it was sent. (A
    control frame may overtake a batch still waiting for the room's round:
    order is kept per stream, batches among batches.)"""
    loop = asyncio.get_running_loop()
    hub = threaded_hub(loop)
    try:
        room = hub.room("r", "e", 0)
        pairs = [make_pair(loop) for _ in range(300)]
        for conn, _ in pairs:
            room.add(conn)
        rng = random.Random(7)
        sent_controls = {i: [] for i in range(len(pairs))}
        got = {i: bytearray() for i in range(len(pairs))}
        seq = 0
        for flush in range(120):
            for _ in range(rng.randint(1, 4)):
                seq += 1
                hub.publish("r", "e", seq, record("r", seq))
            hub.flush("r")
            # a control frame to a few members, right after the flush
            for i in rng.sample(range(len(pairs)), 5):
                body = f"ctl-{flush}-{i}".encode()
                pairs[i][0].send(_core.core_frame(PING, body))
                sent_controls[i].append((seq, body))
            if flush % 10 == 0:
                await asyncio.sleep(0)          # let rounds come back meanwhile
            if flush % 30 == 0:
                for i, (_, peer) in enumerate(pairs):
                    got[i] += await read_all(peer, 0.0)
        hub.settle()
        for i, (conn, peer) in enumerate(pairs):
            data = bytes(got[i]) + await read_all(peer)
            items = seqs_and_controls(data)
            assert [x for x in items if not isinstance(x, tuple)] == list(range(1, seq + 1))
            # control frames: each once, in the order they were sent
            assert [x for x in items if isinstance(x, tuple)] == [
                ("c", body) for _, body in sent_controls[i]]
            assert conn.backlog_frames == 0
        assert hub.rounds >= 100 and hub.rounds_in_flight == 0
        assert room.stats()["deliveries"] == seq * len(pairs)
        for conn, _ in pairs:
            conn.close()
    finally:
        hub.close()


async def test_close_during_round_keeps_fd_until_round_ends():
    """A member closed while its round is out keeps its descriptor: new
    sockets opened meanwhile never get that number (so never this room's
    frame), and the descriptor is closed once the round is reconciled."""
    loop = asyncio.get_running_loop()
    hub = threaded_hub(loop)
    try:
        room = hub.room("r", "e", 0)
        pairs = [make_pair(loop) for _ in range(64)]
        for conn, _ in pairs:
            room.add(conn)
        victims = pairs[::8]
        hub.publish("r", "e", 1, record("r", 1, b"x" * 20000))
        hub.flush("r")                          # the round is out now
        assert hub.rounds_in_flight == 1
        fds = [conn.fd for conn, _ in victims]
        for conn, _ in victims:
            conn.close()
            assert conn.closed and conn.fd == -1
        for fd in fds:
            os.fstat(fd)                        # still open: the round may write to it
        # Try to take the numbers: fresh sockets get the lowest free fds.
        fresh = [socket.socketpair() for _ in range(64)]
        taken = {s.fileno() for pair in fresh for s in pair}
        assert not taken & set(fds)
        for a, b in fresh:
            a.close()
            b.close()
        hub.settle()
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)                    # closed once the round was back
        for conn, peer in pairs:
            if conn not in [c for c, _ in victims]:
                assert seqs_and_controls(await read_all(peer)) == [1]
                conn.close()
    finally:
        hub.close()


async def test_close_then_new_member_reuses_number_only_after_round():
    """The round cannot write to a socket that took a closed member's
    number: the number is not free before the round is reconciled."""
    loop = asyncio.get_running_loop()
    hub = threaded_hub(loop)
    try:
        room = hub.room("r", "e", 0)
        pairs = [make_pair(loop) for _ in range(8)]
        for conn, _ in pairs:
            room.add(conn)
        hub.publish("r", "e", 1, record("r", 1))
        hub.flush("r")
        old = pairs[0][0]
        old_fd = old.fd
        old.close()
        newcomer, newcomer_peer = make_pair(loop)
        assert newcomer.fd != old_fd
        hub.settle()
        assert await read_all(newcomer_peer) == b""    # got nothing of the round
        again, _ = make_pair(loop)
        assert again.fd == old_fd or again.fd != newcomer.fd   # the number is free now
        for conn in (newcomer, again, *(c for c, _ in pairs[1:])):
            conn.close()
    finally:
        hub.close()


async def test_slow_consumers_cut_during_threaded_rounds():
    """Members that never read are cut by the backlog bound while rounds
    write to everyone else; the rest get every seq in order."""
    loop = asyncio.get_running_loop()
    hub = threaded_hub(loop)
    try:
        room = hub.room("r", "e", 0)
        fast = [make_pair(loop) for _ in range(100)]
        slow = [make_pair(loop, sndbuf=4096, max_backlog_bytes=64 * 1024) for _ in range(10)]
        for conn, _ in fast + slow:
            room.add(conn)
        payload = os.urandom(3000)             # incompressible: 3 kB a frame
        got = {id(peer): bytearray() for _, peer in fast}
        for seq in range(1, 301):
            hub.publish("r", "e", seq, record("r", seq, payload))
            hub.flush("r")
            if seq % 5 == 0:
                await asyncio.sleep(0.002)
                for _, peer in fast:
                    try:
                        while True:
                            chunk = peer.recv(1 << 20)
                            if not chunk:
                                break
                            got[id(peer)] += chunk
                    except BlockingIOError:
                        pass
        hub.settle()
        for conn, _ in slow:
            assert conn.owner.failed and conn.owner.failed[0] == _core.STATUS_SLOW
        await asyncio.sleep(0.1)               # backlogs the loop drains
        for conn, peer in fast:
            data = bytes(got[id(peer)]) + await read_all(peer, 0.02)
            assert seqs_and_controls(data) == list(range(1, 301))
            assert not conn.owner.failed
            conn.close()
        for conn, _ in slow:
            conn.close()
    finally:
        hub.close()


async def test_short_write_rest_goes_before_frames_queued_meanwhile():
    """A frame larger than the socket buffer: the thread writes part of it;
    a control frame sent during the round goes out after its rest, and the
    stream stays whole."""
    loop = asyncio.get_running_loop()
    hub = threaded_hub(loop)
    try:
        room = hub.room("r", "e", 0)
        conn, peer = make_pair(loop, sndbuf=4096)
        room.add(conn)
        hub.publish("r", "e", 1, record("r", 1, os.urandom(60000)))
        hub.flush("r")
        conn.send(_core.core_frame(PING, b"after"))     # queued behind the round
        hub.settle()
        assert conn.backlog_frames == 2                 # the rest of 1, then the control
        data = await read_all(peer, 0.3)
        assert seqs_and_controls(data) == [1, ("c", b"after")]
        assert conn.backlog_frames == 0 and not conn.owner.failed
        conn.close()
    finally:
        hub.close()


async def test_flush_during_round_waits_and_batches():
    """A room's next flush waits for its round; what came meanwhile goes out
    in one frame after it, and nothing is lost or reordered."""
    loop = asyncio.get_running_loop()
    hub = threaded_hub(loop)
    try:
        room = hub.room("r", "e", 0)
        pairs = [make_pair(loop) for _ in range(20)]
        for conn, _ in pairs:
            room.add(conn)
        hub.publish("r", "e", 1, record("r", 1))
        hub.flush("r")
        for seq in range(2, 6):
            hub.publish("r", "e", seq, record("r", seq))
        # the scheduled flushes find the round out: they wait for it
        await asyncio.sleep(0.05)
        hub.settle()
        for conn, peer in pairs:
            data = await read_all(peer)
            assert seqs_and_controls(data) == [1, 2, 3, 4, 5]
            conn.close()
        assert room.flushed_seq == 5
    finally:
        hub.close()


async def test_epoch_change_during_round_loses_nothing():
    loop = asyncio.get_running_loop()
    hub = threaded_hub(loop)
    try:
        room = hub.room("r", "e1", 0)
        conn, peer = make_pair(loop)
        room.add(conn)
        hub.publish("r", "e1", 1, record("r", 1))
        hub.flush("r")
        hub.publish("r", "e1", 2, record("r", 2))     # pending while the round is out
        hub.publish("r", "e2", 1, record("r", 1))     # new epoch: 2 must still go out
        hub.flush("r")
        hub.settle()
        assert seqs_and_controls(await read_all(peer)) == [1, 2, 1]
        assert room.epoch == "e2" and room.flushed_seq == 1
        conn.close()
    finally:
        hub.close()


async def test_broadcast_and_small_rooms():
    """A control broadcast to a large room is a round too, in order with the
    batches; a room under thread_min_members is written at once."""
    loop = asyncio.get_running_loop()
    hub = threaded_hub(loop, min_members=10)
    try:
        big = hub.room("big", "e", 0)
        small = hub.room("small", "e", 0)
        bigs = [make_pair(loop) for _ in range(10)]
        smalls = [make_pair(loop) for _ in range(9)]
        for conn, _ in bigs:
            big.add(conn)
        for conn, _ in smalls:
            small.add(conn)
        hub.publish("small", "e", 1, record("small", 1))
        hub.flush("small")
        assert hub.rounds_in_flight == 0              # written on the loop thread
        hub.publish("big", "e", 1, record("big", 1))
        hub.flush("big")
        assert hub.rounds_in_flight == 1
        assert hub.broadcast("big", _core.core_frame(PING, b"presence")) == 10
        hub.publish("big", "e", 2, record("big", 2))
        hub.flush("big")
        hub.settle()
        for _, peer in bigs:
            assert seqs_and_controls(await read_all(peer)) == [1, ("c", b"presence"), 2]
        for _, peer in smalls:
            assert seqs_and_controls(await read_all(peer)) == [1]
        for conn, _ in bigs + smalls:
            conn.close()
    finally:
        hub.close()


async def test_closed_hub_writes_on_the_loop():
    loop = asyncio.get_running_loop()
    hub = threaded_hub(loop)
    room = hub.room("r", "e", 0)
    conn, peer = make_pair(loop)
    room.add(conn)
    hub.publish("r", "e", 1, record("r", 1))
    hub.flush("r")
    hub.close()                                       # settles the round first
    assert hub.write_threads == 0 and hub.rounds == 1
    hub.publish("r", "e", 2, record("r", 2))
    hub.flush("r")
    assert seqs_and_controls(await read_all(peer)) == [1, 2]
    conn.close()


def test_bad_thread_settings():
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError):
            _core.Hub(loop, write_threads=-1)
        with pytest.raises(ValueError):
            _core.Hub(loop, write_threads=2, thread_min_members=0)
    finally:
        loop.close()
