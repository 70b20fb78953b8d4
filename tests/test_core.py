"""The compiled core on real socketpairs: framing, zero-copy fan-out,
partial writes, slow consumers, and the adaptive flush policy."""

from __future__ import annotations

import asyncio
import socket

import pytest
from hypothesis import given, settings, strategies as st

from fanout import _core
from fanout.protocol import wire
from fanout.protocol import fanout_pb2 as pb

MAX = 1 << 20


# ---------------------------------------------------------------- framing

def test_record_encoding_matches_protobuf():
    cases = [
        ("room-1", 1, pb.CHAT, 0, "alice", b"hi", 1_763_900_000_000),
        ("r", 2**63 + 5, pb.GIFT, 7, "", b"", 0),
        ("直播间", 300, pb.SYSTEM, 0, "系统", "🎁 x 99".encode() * 40, 1),
        ("", 0, 0, 0, "", b"", 0),
    ]
    for room, seq, kind, prio, sender, payload, ts in cases:
        record = _core.encode_room_message(room, seq, kind, prio, sender, payload, ts)
        msg = pb.RoomMessage(room=room, seq=seq, kind=kind, priority=prio, sender=sender,
                             payload=payload, server_ts_ms=ts)
        assert record == pb.Batch(messages=[msg]).SerializeToString()


@given(st.binary(max_size=3000), st.integers(0, 255), st.integers(0, 2000))
def test_pack_parse_roundtrip(body, ftype, compress_min):
    frame = _core.pack_frame(ftype, body, compress_min)
    frames, used = _core.parse_frames(frame + frame, MAX)
    assert used == 2 * len(frame)
    assert [(t, b) for t, _f, b in frames] == [(ftype, body)] * 2
    # the pure-Python reference decoder agrees byte for byte
    assert [(t, b) for t, _f, b in wire.FrameDecoder().feed(frame)] == [(ftype, body)]


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_parse_random_bytes_never_crashes(data):
    try:
        frames, used = _core.parse_frames(data, 64)
    except _core.FrameError as exc:
        assert exc.reason in (pb.BAD_FRAME, pb.FRAME_TOO_LARGE, pb.UNSUPPORTED_VERSION,
                              pb.BAD_COMPRESSION)
    else:
        assert 0 <= used <= len(data)
        assert all(len(body) <= 64 for _t, _f, body in frames)


@given(st.lists(st.binary(max_size=100), min_size=1, max_size=8), st.data())
def test_parse_any_split(bodies, data):
    stream = b"".join(_core.pack_frame(0x43, b) for b in bodies)
    cut = data.draw(st.integers(0, len(stream)))
    frames, used = _core.parse_frames(stream[:cut], MAX)
    rest, used2 = _core.parse_frames(stream[used:], MAX)
    assert [b for _t, _f, b in frames + rest] == bodies
    assert used + used2 == len(stream)


def test_compression_only_when_it_pays():
    small = b"x" * 100
    assert _core.pack_frame(0x43, small, 256)[2] == 0          # under threshold
    incompressible = bytes(range(256)) * 2
    import os
    noise = os.urandom(4000)
    assert _core.pack_frame(0x43, noise, 256)[2] == 0           # would not shrink
    big = b"gift from alice to bob " * 100
    frame = _core.pack_frame(0x43, big, 256)
    assert frame[2] == 1 and len(frame) < len(big) / 4
    assert _core.parse_frames(frame, MAX)[0][0][2] == big
    assert _core.pack_frame(0x43, incompressible, 0)[2] == 0     # 0 disables


# ---------------------------------------------------------------- connections

class Owner:
    def __init__(self):
        self.failed = []
        self.lost = 0

    def connection_failed(self, status):
        self.failed.append(status)

    def connection_lost(self):
        self.lost += 1


def make_pair(loop, sndbuf=None, **limits):
    """(Connection on the node side, plain socket on the client side)."""
    node_side, client_side = socket.socketpair()
    if sndbuf:
        node_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    node_side.setblocking(False)
    conn = _core.TcpConnection(node_side.detach(), loop, **limits)
    conn.owner = Owner()
    client_side.setblocking(False)
    return conn, client_side


def drain(sock, n, loop_rounds=2000):
    async def run():
        out = bytearray()
        for _ in range(loop_rounds):
            try:
                chunk = sock.recv(1 << 20)
                out += chunk
            except BlockingIOError:
                pass
            if len(out) >= n:
                return bytes(out)
            await asyncio.sleep(0.001)
        return bytes(out)
    return run()


async def test_partial_writes_resume_in_order():
    loop = asyncio.get_running_loop()
    conn, peer = make_pair(loop, sndbuf=4096, max_backlog_bytes=1 << 24)
    frames = [_core.core_frame(0x43, bytes([i]) * 50_000) for i in range(20)]
    statuses = [conn.send(f) for f in frames]
    assert 1 in statuses                       # SEND_QUEUED: the socket filled up
    assert conn.backlog_frames > 0
    wire = [_core.wire_bytes(f) for f in frames]
    got = await drain(peer, sum(map(len, wire)))
    assert got == b"".join(wire)               # whole, in order, no interleaving
    assert conn.backlog_frames == 0 and conn.backlog_bytes == 0
    owner = conn.owner
    assert owner.failed == []
    conn.close()
    assert owner.lost == 1 and conn.owner is None


async def test_backlog_bound_reports_slow():
    loop = asyncio.get_running_loop()
    conn, peer = make_pair(loop, sndbuf=4096, max_backlog_bytes=100_000)
    frame = _core.core_frame(0x43, b"z" * 10_000)
    for _ in range(200):
        conn.send(frame)
        if conn.owner.failed:
            break
    assert conn.owner.failed == [_core.STATUS_SLOW]
    assert conn.backlog_bytes <= 100_000
    conn.close()


async def test_close_after_delivers_final_frame_then_closes():
    loop = asyncio.get_running_loop()
    conn, peer = make_pair(loop)
    owner = conn.owner
    conn.start_reading(lambda: None)
    bye = _core.core_frame(0x44, pb.Kick(reason=pb.SLOW_CONSUMER).SerializeToString())
    conn.close_after(bye)
    assert conn.closing
    assert conn.send(_core.core_frame(0x43, b"late")) == 4     # SEND_CLOSED, dropped
    got = await drain(peer, len(_core.wire_bytes(bye)))
    assert got == _core.wire_bytes(bye)
    await asyncio.sleep(0.01)
    assert peer.recv(10) == b""                # FIN after the last frame
    peer.close()                               # the node sees EOF and closes
    for _ in range(100):
        if conn.closed:
            break
        await asyncio.sleep(0.01)
    assert conn.closed and owner.lost == 1


async def test_dead_peer_reported():
    loop = asyncio.get_running_loop()
    conn, peer = make_pair(loop)
    peer.close()
    for _ in range(3):
        conn.send(_core.core_frame(0x43, b"x" * 1000))
    assert conn.owner.failed and conn.owner.failed[0] == _core.STATUS_DEAD
    conn.close()


async def test_read_splits_frames_and_keeps_partial_tail():
    loop = asyncio.get_running_loop()
    conn, peer = make_pair(loop, max_frame=1000)
    frames = [_core.pack_frame(0x05, pb.Ping(nonce=i).SerializeToString()) for i in range(5)]
    stream = b"".join(frames)
    peer.send(stream[:-3])
    await asyncio.sleep(0.01)
    got = conn.read()
    assert [pb.Ping.FromString(b).nonce for _t, _f, b in got] == [0, 1, 2, 3]
    peer.send(stream[-3:])
    await asyncio.sleep(0.01)
    assert [pb.Ping.FromString(b).nonce for _t, _f, b in conn.read()] == [4]
    peer.send(_core.pack_frame(0x05, b"x" * 1001))
    await asyncio.sleep(0.01)
    assert conn.read() == []                   # never raises: the error is kept
    assert conn.read_error.reason == pb.FRAME_TOO_LARGE
    assert conn.carry_capacity == 0
    conn.close()


# ---------------------------------------------------------------- rooms and flushes

def record(room, seq, payload=b"m"):
    return _core.encode_room_message(room, seq, pb.CHAT, 0, "u", payload, 0)


async def test_one_frame_object_for_every_member():
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop, max_delay=0.05)
    room = hub.room("r", "e", 0)
    pairs = [make_pair(loop) for _ in range(50)]
    for conn, _ in pairs:
        room.add(conn)
    for seq in range(1, 4):
        hub.publish("r", "e", seq, record("r", seq))
    await asyncio.sleep(0.01)                  # quiet room: flushed this iteration
    received = [await drain(peer, 1) for _, peer in pairs]
    assert len(set(received)) == 1             # byte-identical frame everywhere
    [(ftype, _flags, body)], _ = _core.parse_frames(received[0], MAX)
    assert ftype == 0x43
    assert [m.seq for m in pb.Batch.FromString(body).messages] == [1, 2, 3]
    assert room.stats()["deliveries"] == 150 and room.stats()["frames"] == 1
    for conn, _ in pairs:
        conn.close()


async def test_hot_room_waits_max_delay_full_batch_does_not():
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop, max_delay=0.2, max_batch_bytes=2000)
    room = hub.room("r", "e", 0)
    conn, peer = make_pair(loop)
    room.add(conn)
    for seq in (1, 2, 3):                      # a quiet room may flush 3 times at once
        hub.publish("r", "e", seq, record("r", seq))
        await asyncio.sleep(0.01)
        assert room.flushed_seq == seq         # end of the loop iteration
    hub.publish("r", "e", 4, record("r", 4))
    await asyncio.sleep(0.05)
    assert room.flushed_seq == 3               # hot: held until its next token
    hub.publish("r", "e", 5, record("r", 5))   # joins the held batch
    await asyncio.sleep(0.25)
    assert room.flushed_seq == 5
    hub.publish("r", "e", 6, record("r", 6, b"x" * 2500))   # over max_batch_bytes
    assert room.flushed_seq == 6               # flushed synchronously
    conn.close()


async def test_duplicates_dropped_and_epoch_change_resets():
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop)
    room = hub.room("r", "e1", 0)
    assert hub.publish("r", "e1", 1, record("r", 1))
    assert not hub.publish("r", "e1", 1, record("r", 1))
    hub.flush()
    assert hub.publish("r", "e2", 1, record("r", 1))       # new epoch: history restarts
    assert room.epoch == "e2" and room.last_seq == 1 and room.oldest_seq == 1


async def test_replay_and_gap_from_ring():
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop, ring_size=8)
    room = hub.room("r", "e", 0)
    for seq in range(1, 21):
        hub.publish("r", "e", seq, record("r", seq))
    hub.flush()
    assert room.oldest_seq == 13
    gap_from, gap_to, frames = room.replay(5, 100)
    assert (gap_from, gap_to) == (6, 12)
    seqs = [m.seq for f in frames
            for _t, _f, b in _core.parse_frames(_core.wire_bytes(f), MAX)[0]
            for m in pb.Batch.FromString(b).messages]
    assert seqs == list(range(13, 21))
    assert len(frames) > 1                     # chunked at max_frame_bytes
    assert room.replay(20, 100) == (0, 0, [])
    assert room.replay(15, 65536)[:2] == (0, 0)


async def test_ring_bytes_bound():
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop, ring_size=1000, ring_bytes=10_000)
    room = hub.room("r", "e", 0)
    for seq in range(1, 101):
        hub.publish("r", "e", seq, record("r", seq, b"p" * 500))
    hub.flush()
    assert 100 - room.oldest_seq + 1 <= 20


async def test_sweep_forgets_idle_empty_rooms():
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop)
    hub.room("empty", "e", 0)
    busy = hub.room("busy", "e", 0)
    conn, _ = make_pair(loop)
    busy.add(conn)
    await asyncio.sleep(0.02)
    assert hub.sweep(0.01) == ["empty"]
    assert list(hub.rooms) == ["busy"]
    conn.close()


async def test_publish_never_creates_a_room():
    # The bus is scoped by room: a record for a room this hub does not hold
    # raced a retirement, and is not a reason to hold the room again.
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop)
    assert not hub.publish("nobody-here", "e", 1, record("nobody-here", 1))
    assert hub.rooms == {}


async def test_retire_only_rooms_never_published_to():
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop)
    room = hub.room("r", "e", 0)
    conn, _ = make_pair(loop)
    room.add(conn)
    assert not hub.retire("r")                 # a member
    room.discard(conn)
    hub.room("s", "e", 0)
    hub.publish("s", "e", 1, record("s", 1))
    assert not hub.retire("s")                 # pending
    hub.flush()
    assert not hub.retire("s")                 # history a reconnecting viewer resumes from
    hub.room("t", "e", 7)
    assert not hub.retire("t")                 # history elsewhere: 1-7 were published
    assert hub.retire("r") and "r" not in hub.rooms
    assert not hub.retire("r")
    assert sorted(hub.sweep(-1)) == ["s", "t"]
    conn.close()


# ---------------------------------------------------------------- test vectors

def _vectors():
    import json
    from pathlib import Path
    return json.loads((Path(__file__).parent / "vectors" / "frames.json").read_text())


@pytest.mark.parametrize("vector", _vectors()["valid"], ids=lambda v: v["name"])
def test_core_codec_matches_vectors(vector):
    frame = bytes.fromhex(vector["frame_hex"])
    [(ftype, flags, body)], used = _core.parse_frames(frame, MAX)
    assert used == len(frame) and ftype == vector["type_code"]
    assert body == wire.FrameDecoder().feed(frame)[0][2]
    if not vector["compressed"]:
        assert _core.pack_frame(ftype, body) == frame
    else:
        assert flags == 1 and _core.pack_frame(ftype, body, 1)[8:] != body


@pytest.mark.parametrize("vector", _vectors()["invalid"], ids=lambda v: v["name"])
def test_core_rejects_invalid_vectors(vector):
    with pytest.raises(_core.FrameError) as err:
        _core.parse_frames(bytes.fromhex(vector["frame_hex"]), vector["max_body"])
    assert pb.Reason.Name(err.value.reason) == vector["reason"]


def test_batch_vector_is_concatenated_core_records():
    vector = next(v for v in _vectors()["valid"] if v["type"] == "BATCH" and not v["compressed"])
    body = _core.parse_frames(bytes.fromhex(vector["frame_hex"]), MAX)[0][0][2]
    batch = pb.Batch.FromString(body)
    rebuilt = b"".join(_core.encode_room_message(m.room, m.seq, m.kind, m.priority, m.sender,
                                                 m.payload, m.server_ts_ms)
                       for m in batch.messages)
    assert rebuilt == body


async def test_sampled_flag_rides_on_the_next_batch_only():
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop, max_delay=0.0)
    room = hub.room("r", "e", 0)
    conn, peer = make_pair(loop)
    room.add(conn)
    hub.publish("r", "e", 1, record("r", 1), True)
    hub.flush()
    hub.publish("r", "e", 2, record("r", 2))
    hub.flush()
    data = await drain(peer, 1)
    frames, _ = _core.parse_frames(data, MAX)
    batches = [pb.Batch.FromString(body) for _t, _f, body in frames]
    assert [(b.sampled, [m.seq for m in b.messages]) for b in batches] == [
        (True, [1]), (False, [2])]
    # the two appended bytes are protobuf's own encoding of the flag
    expected = pb.Batch(messages=[pb.RoomMessage(room="r", seq=1, kind=pb.CHAT, sender="u",
                                                 payload=b"m")], sampled=True)
    assert frames[0][2] == expected.SerializeToString()
    conn.close()


async def test_hot_room_flush_rate_is_bounded_by_max_delay():
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop, max_delay=0.1)
    room = hub.room("r", "e", 0)
    conn, peer = make_pair(loop, max_backlog_bytes=1 << 24)
    room.add(conn)
    start = loop.time()
    seq = 0
    while loop.time() - start < 1.0:           # ~200 messages/s for a second
        seq += 1
        hub.publish("r", "e", seq, record("r", seq))
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.15)
    assert room.flushed_seq == seq
    # 1 s / 100 ms, plus the burst of 3 and the final partial window
    assert 8 <= room.frames_built <= 15, room.frames_built
    await drain(peer, 1)
    conn.close()


def test_high_compression_is_smaller_and_decodes_the_same():
    body = b"".join(_core.encode_room_message("live:1", i, pb.GIFT, 0, f"fan{i % 37}",
                                              f"sent a rose x{i % 9} 🌹".encode(), 1_763_900_000_000 + i)
                    for i in range(1, 300))
    fast = _core.pack_frame(0x43, body, 256, 0)
    high = _core.pack_frame(0x43, body, 256, 4)
    assert fast[2] == high[2] == 1 and len(high) < len(fast)
    assert _core.parse_frames(high, MAX)[0][0][2] == body == wire.FrameDecoder().feed(high)[0][2]


# ---------------------------------------------------------------- the transport seam

def make_prefixed(loop, prefix, **limits):
    node_side, client_side = socket.socketpair()
    node_side.setblocking(False)
    conn = _core.PrefixConnection(node_side.detach(), loop, prefix=prefix, **limits)
    conn.owner = Owner()
    client_side.setblocking(False)
    return conn, client_side


def test_the_base_is_not_a_kind():
    a, b = socket.socketpair()
    with pytest.raises(TypeError):
        _core.Connection(a.detach(), asyncio.new_event_loop())
    b.close()


async def test_prefixed_kind_shares_the_frame_with_tcp_members():
    """One frame object reaches TCP and prefixed members; the prefix is
    written once into the frame's headroom, and TCP members never see it."""
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop)
    room = hub.room("r", "e", 0)
    tcp = [make_pair(loop) for _ in range(3)]
    pre = [make_prefixed(loop, b"PFX!") for _ in range(3)]
    for conn, _ in tcp + pre:
        room.add(conn)
    copies = _core.prefix_copies()
    for seq in (1, 2):
        hub.publish("r", "e", seq, record("r", seq))
        hub.flush()
    plain = [await drain(peer, 1) for _, peer in tcp]
    prefixed = [await drain(peer, 1) for _, peer in pre]
    assert len(set(plain)) == 1 and len(set(prefixed)) == 1
    frames, used = _core.parse_frames(plain[0], MAX)
    assert used == len(plain[0]) and len(frames) == 2
    # prefixed stream: PFX! + frame, PFX! + frame
    stream, seqs = prefixed[0], []
    while stream:
        assert stream[:4] == b"PFX!"
        size = 8 + int.from_bytes(stream[8:12], "big")
        [(ftype, _f, body)], used = _core.parse_frames(stream[4:4 + size], MAX)
        seqs += [m.seq for m in pb.Batch.FromString(body).messages]
        stream = stream[4 + used:]
    assert seqs == [1, 2]
    assert _core.prefix_copies() == copies      # no copy per recipient
    for conn, _ in tcp + pre:
        conn.close()


async def test_two_prefix_kinds_in_one_room_copy_instead_of_clobbering():
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop)
    room = hub.room("r", "e", 0)
    a, pa = make_prefixed(loop, b"AA")
    b, pb_ = make_prefixed(loop, b"BBB")
    room.add(a)
    room.add(b)
    copies = _core.prefix_copies()
    hub.publish("r", "e", 1, record("r", 1))
    hub.flush()
    got_a, got_b = await drain(pa, 1), await drain(pb_, 1)
    assert got_a[:2] == b"AA" and got_b[:3] == b"BBB"
    assert got_a[2:] == got_b[3:]               # the same wire frame behind each
    assert _core.prefix_copies() == copies + 1  # the second kind wrote a copy
    a.close()
    b.close()


async def test_prefixed_partial_writes_and_close_after_keep_the_prefix():
    loop = asyncio.get_running_loop()
    conn, peer = make_prefixed(loop, b"#", max_backlog_bytes=1 << 24)
    conn.start_reading(lambda: None)
    big = [_core.core_frame(0x43, bytes([i]) * 300_000) for i in range(4)]
    for frame in big:
        conn.send(frame)
    assert conn.backlog_frames > 0              # the socketpair filled up
    bye = _core.core_frame(0x44, pb.Kick(reason=pb.SERVER_SHUTDOWN).SerializeToString())
    conn.close_after(bye, drop_queued=False)
    expected = b"".join(b"#" + _core.wire_bytes(f) for f in big + [bye])
    got = await drain(peer, len(expected))
    assert got == expected
    conn.close()


def test_send_refuses_bare_wire_frames():
    loop = asyncio.new_event_loop()
    conn, peer = make_pair(loop)
    with pytest.raises(ValueError, match="core frame"):
        conn.send(_core.pack_frame(0x45, b""))
    wire = _core.pack_frame(0x45, b"")
    for headroom in (bytes([0, 200]) + bytes(14),      # a length past the headroom
                     bytes([3, 0]) + bytes(14)):       # a tag with no prefix
        with pytest.raises(ValueError, match="core frame"):
            conn.send(headroom + wire)
    assert conn.send(bytes(16) + wire) == 0             # what core_frame() builds
    conn.close()
    peer.close()
    loop.close()
