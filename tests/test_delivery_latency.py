"""End-to-end delivery latency in the core (issue 12): the hub reads the
server_ts_ms of each batch's first (oldest) record and counts, once per
frame and in C, the seconds from that acceptance to the frame handed to
every member into a histogram (fanout_delivery_latency_seconds; the node's
/metrics side is tests/test_admin_api.py). Real socketpairs, on both loops."""

from __future__ import annotations

import asyncio
import socket
import time

from fanout import _core
from fanout.protocol import fanout_pb2 as pb


class Owner:
    def connection_failed(self, status):
        pass

    def connection_lost(self):
        pass


def member(loop, room):
    node_side, peer = socket.socketpair()
    node_side.setblocking(False)
    conn = _core.TcpConnection(node_side.detach(), loop)
    conn.owner = Owner()
    room.add(conn)
    peer.setblocking(False)
    return peer


def record(seq, ts_ms, payload=b"m"):
    return _core.encode_room_message("r", seq, pb.GIFT, 0, "u", payload, ts_ms)


def now_ms(ago: float = 0.0) -> int:
    return int((time.time() - ago) * 1000)


def test_the_ts_is_read_from_any_record_and_nothing_from_garbage():
    for payload in (b"", b"x", b"y" * 200, b"z" * 70_000):      # 0-3 byte length varints
        for ts in (1, 1_763_900_000_123, 2**63 + 5):
            rec = _core.encode_room_message("room", 7, pb.CHAT, 9, "sender", payload, ts)
            assert _core.room_record_ts_ms(rec) == ts
            assert pb.Batch.FromString(rec).messages[0].server_ts_ms == ts    # as protobuf reads it
    rec = record(1, 1_763_900_000_123)
    assert _core.room_record_ts_ms(record(1, 0)) == 0               # no ts: omitted
    assert _core.room_record_ts_ms(rec[:-1]) == 0                   # cut short
    assert _core.room_record_ts_ms(b"\x12" + rec[1:]) == 0          # not a messages record
    assert _core.room_record_ts_ms(b"\x0a\x7f" + rec[2:]) == 0      # length past the end
    assert _core.room_record_ts_ms(b"") == 0


BOUNDS = (0.1, 0.4, 0.6, 1.5, 2.5)


def latency(hub) -> tuple[list[int], float]:
    """Per-bucket (not cumulative) counts, the +Inf bucket's last; and the sum."""
    bounds, cumulative, total = hub.latency_histogram()
    assert tuple(bounds) == BOUNDS
    return [b - a for a, b in zip([0] + cumulative, cumulative)], total


async def test_each_frame_counts_its_oldest_message_once():
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop, max_delay=0.0)
    hub.track_latency(BOUNDS)
    room = hub.room("r", "e", 0)
    peers = [member(loop, room) for _ in range(3)]

    # One batch of three (published in one loop turn): the oldest counts,
    # once for the frame (not per member, not per message).
    hub.publish("r", "e", 1, record(1, now_ms(0.5)))
    hub.publish("r", "e", 2, record(2, now_ms(0.05)))
    hub.publish("r", "e", 3, record(3, now_ms()))
    await asyncio.sleep(0.01)
    assert hub.flushes == 1
    counts, total = latency(hub)
    assert counts == [0, 0, 1, 0, 0, 0]                  # in (0.4, 0.6]
    assert 0.5 <= total < 0.6

    # A record without a ts is not counted; a ts from a clock ahead of
    # this one (skew between hosts) counts as 0, never negative.
    hub.publish("r", "e", 4, record(4, 0))
    await asyncio.sleep(0.01)
    assert latency(hub) == (counts, total)
    hub.publish("r", "e", 5, record(5, now_ms(-3.0)))
    await asyncio.sleep(0.01)
    assert latency(hub) == ([1, 0, 1, 0, 0, 0], total)
    # Past the last bound: the +Inf bucket.
    hub.publish("r", "e", 6, record(6, now_ms(60.0)))
    await asyncio.sleep(0.01)
    counts, total = latency(hub)
    assert counts == [1, 0, 1, 0, 0, 1] and total >= 60.5
    for peer in peers:
        peer.close()


async def test_writer_threads_and_queued_frames_carry_their_own_oldest():
    """A frame written by the writer threads counts on reconciliation, and
    one that waited behind the room's round counts its own batch's ts."""
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop, max_delay=0.0, write_threads=1, thread_min_members=1,
                    max_batch_bytes=64)
    hub.track_latency(BOUNDS)
    try:
        room = hub.room("r", "e", 0)
        peers = [member(loop, room) for _ in range(2)]
        # Each record fills a batch (max_batch_bytes): the first frame goes
        # out as a round, the second waits for it in the room's queue.
        hub.publish("r", "e", 1, record(1, now_ms(2.0), b"a" * 60))
        hub.publish("r", "e", 2, record(2, now_ms(1.0), b"b" * 60))
        for _ in range(100):
            if hub.latency_histogram()[1][-1] == 2:
                break
            await asyncio.sleep(0.01)
        assert hub.rounds == 2
        counts, total = latency(hub)
        assert counts == [0, 0, 0, 1, 1, 0]              # (0.6, 1.5] and (1.5, 2.5]
        assert 3.0 <= total < 3.5
        for peer in peers:
            peer.close()
    finally:
        hub.close()


async def test_bounds_are_checked():
    hub = _core.Hub(asyncio.get_running_loop())
    assert hub.latency_histogram() == ([], [0], 0.0)          # not tracked: nothing counted
    for bad in ((), (0.2, 0.1), (0.1, 0.1), tuple(range(1, 34))):
        try:
            hub.track_latency(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")
