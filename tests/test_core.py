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
        dict_id = vector["dictionary"]
        assert flags == (wire.FLAG_LZ4 | wire.FLAG_DICT if dict_id else wire.FLAG_LZ4)
        again = _core.pack_frame(ftype, body, 1, 0, dict_id)
        assert again[2] == flags and _core.parse_frames(again, MAX)[0][0][2] == body


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


# ---------------------------------------------------------------- the pre-shared dictionary

def _corpus_body(n, room="live:9"):
    from fanout.load.corpus import Corpus
    corpus = Corpus(seed=7)
    return b"".join(_core.encode_room_message(room, i + 1, pb.CHAT, 0, sender, corpus.pad(text, 50),
                                              1_763_900_000_000 + i)
                    for i, (_k, sender, text) in enumerate(corpus.message() for _ in range(n)))


@pytest.mark.parametrize("n", [1, 3, 60, 400])     # under and over the small-frame cut
@pytest.mark.parametrize("level", [0, 9])
def test_dictionary_frames_round_trip_through_both_codecs(n, level):
    body = _corpus_body(n)
    plain = _core.pack_frame(0x43, body, 1, level)
    framed = _core.pack_frame(0x43, body, 1, level, 1)
    assert framed[2] == wire.FLAG_LZ4 | wire.FLAG_DICT and framed[wire.HEADER_SIZE + 4] == 1
    assert len(framed) < len(plain)               # the point of it
    assert _core.parse_frames(framed, MAX)[0][0][2] == body == wire.FrameDecoder().feed(framed)[0][2]
    # and the Python encoder's frames decode in the core
    py = wire.encode_frame(0x43, body, compress_min=1, dict_id=1)
    assert _core.parse_frames(py, MAX)[0][0][2] == body


def test_one_message_compresses_with_the_dictionary_only():
    body = _corpus_body(1)
    alone = _core.pack_frame(0x43, body, 1, 9)                  # lz4 alone: about nothing
    framed = _core.pack_frame(0x43, body, 1, 9, 1)
    assert len(alone) > len(body) * 0.9
    assert framed[2] == 3 and len(framed) < len(body) * 0.75


def test_unknown_dictionary_is_bad_compression():
    framed = bytearray(_core.pack_frame(0x43, _corpus_body(20), 1, 0, 1))
    framed[wire.HEADER_SIZE + 4] = 9
    with pytest.raises(_core.FrameError) as err:
        _core.parse_frames(bytes(framed), MAX)
    assert err.value.reason == pb.BAD_COMPRESSION and "dictionary id 9" in str(err.value)
    with pytest.raises(wire.WireError) as err:
        wire.FrameDecoder().feed(bytes(framed))
    assert err.value.reason == pb.BAD_COMPRESSION and "dictionary id 9" in str(err.value)
    with pytest.raises(ValueError):
        _core.pack_frame(0x43, b"x" * 300, 1, 0, 9)
    with pytest.raises(ValueError):
        _core.set_compress_dict(9)
    with pytest.raises(ValueError):
        wire.encode_frame(0x43, b"x" * 300, dict_id=9)


def test_wrong_stated_size_is_bad_compression():
    body = _corpus_body(20)
    framed = bytearray(_core.pack_frame(0x43, body, 1, 0, 1))
    size = len(body) + 1                  # python-lz4 would take this as a mere limit
    framed[8:12] = size.to_bytes(4, "little")
    for decode, error in ((lambda f: _core.parse_frames(f, MAX), _core.FrameError),
                          (lambda f: wire.FrameDecoder().feed(f), wire.WireError)):
        with pytest.raises(error) as err:
            decode(bytes(framed))
        assert err.value.reason == pb.BAD_COMPRESSION


async def test_room_frames_use_the_process_dictionary():
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop, max_delay=0.0, compress_min=32, compress_level=9)
    room = hub.room("quiet", "e", 0)
    conn, peer = make_pair(loop)
    room.add(conn)
    payload = _corpus_body(1)[-60:]
    frames = []
    before = _core.compress_dict()
    try:
        for seq, dict_id in ((1, 1), (2, 0)):
            _core.set_compress_dict(dict_id)
            assert _core.compress_dict() == dict_id
            hub.publish("quiet", "e", seq, record("quiet", seq, payload))
            frames += _core.parse_frames(await drain(peer, 1), MAX)[0]
    finally:
        _core.set_compress_dict(before)
    assert [f & wire.FLAG_DICT for _t, f, _b in frames] == [wire.FLAG_DICT, 0]
    assert [m.seq for _t, _f, b in frames for m in pb.Batch.FromString(b).messages] == [1, 2]
    conn.close()


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


# ---------------------------------------------------------------- hardening (issue 8)
# The read side (items 4, 8, 12), abort (item 11), the replay cache (item 1)
# and the header message (item 11), on real sockets.

def tcp_pair(loop, small_buffers=False, **limits):
    """(TcpConnection on the node side, client socket) over loopback TCP, so
    an RST is an RST (a socketpair has none)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.socket()
    if small_buffers:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(server.getsockname())
    node_side, _ = server.accept()
    server.close()
    if small_buffers:
        node_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    node_side.setblocking(False)
    conn = _core.TcpConnection(node_side.detach(), loop, **limits)
    conn.owner = Owner()
    client.setblocking(False)
    return conn, client


def ping(nonce):
    return _core.pack_frame(0x05, pb.Ping(nonce=nonce).SerializeToString())


def nonces(frames):
    return [pb.Ping.FromString(b).nonce for _t, _f, b in frames]


async def settle():
    for _ in range(3):
        await asyncio.sleep(0.005)


async def test_carry_never_holds_more_than_one_frame():
    # Item 4: the carry used to take the whole 64 KiB read behind a partial
    # frame, ~2x max_frame. Now at most header + max_frame, in any split.
    import random
    rnd = random.Random(8)
    loop = asyncio.get_running_loop()
    max_frame = 20_000
    conn, peer = make_pair(loop, max_frame=max_frame)
    bodies = [bytes([i % 251]) * rnd.choice([0, 1, 7, 5000, max_frame - 1, max_frame])
              for i in range(60)]
    stream = b"".join(_core.pack_frame(0x43, b) for b in bodies)
    got, pos, peak = [], 0, 0
    while pos < len(stream):
        step = rnd.choice([1, 3, 8, 9, 100, 4096, 30_000, 70_000, 200_000])
        peer.sendall(stream[pos:pos + step])
        pos += step
        await settle()
        while True:
            frames = conn.read()
            got += frames
            peak = max(peak, conn.carry_capacity)
            assert conn.carry_capacity <= 8 + max_frame
            if not frames:
                break
    assert conn.read_error is None
    assert [b for _t, _f, b in got] == bodies
    assert conn.carry_capacity == 0                 # nothing carried: freed
    assert peak > max_frame // 2                    # the bound was exercised
    conn.close()


async def test_carry_grows_with_what_arrived_not_what_is_declared():
    # A header declaring max_frame costs what was sent, not max_frame.
    loop = asyncio.get_running_loop()
    conn, peer = make_pair(loop, max_frame=65_536)
    peer.send(_core.pack_frame(0x05, b"x" * 65_536)[:8 + 10])
    await settle()
    assert conn.read() == [] and conn.carry_capacity == 18
    conn.close()


async def test_frames_before_a_bad_header_are_returned_then_the_error():
    # Item 12: a good frame in the same read as a later bad header used to be
    # dropped with the exception.
    loop = asyncio.get_running_loop()
    for bad, reason in ((b"\x01\x05\x80\x00\x00\x00\x00\x00", pb.BAD_FRAME),
                        (b"\x09\x05\x00\x00\x00\x00\x00\x00", pb.UNSUPPORTED_VERSION),
                        (_core.pack_frame(0x05, b"y" * 600)[:20], pb.FRAME_TOO_LARGE)):
        conn, peer = make_pair(loop, max_frame=500)
        peer.send(ping(1) + ping(2) + bad + ping(3))
        await settle()
        assert nonces(conn.read()) == [1, 2]
        assert conn.read_error.reason == reason
        peer.send(ping(4))
        await settle()
        assert conn.read() == []                # nothing is parsed after the error
        conn.close()


async def test_frames_before_a_bad_lz4_body_are_returned_then_the_error():
    loop = asyncio.get_running_loop()
    conn, peer = make_pair(loop)
    body = b"\x10\x00\x00\x00garbage!"          # declares 16 bytes, corrupt block
    bad = bytes([1, 0x05, 1, 0]) + len(body).to_bytes(4, "big") + body
    # the good frame completes out of the carry, the bad one follows in the same read
    first = ping(1)
    peer.send(first[:5])
    await settle()
    assert conn.read() == []
    peer.send(first[5:] + bad)
    await settle()
    assert nonces(conn.read()) == [1]
    assert conn.read_error.reason == pb.BAD_COMPRESSION
    assert conn.carry_capacity == 0
    conn.close()


async def test_read_takes_at_most_max_frames():
    # Item 8: the budget. Past it no body is copied, and the error says why.
    loop = asyncio.get_running_loop()
    conn, peer = make_pair(loop)
    peer.send(b"".join(ping(i) for i in range(10)))
    await settle()
    assert nonces(conn.read(10)) == list(range(10)) and conn.read_error is None
    peer.send(b"".join(ping(i) for i in range(10)) + ping(99)[:3])
    await settle()
    assert nonces(conn.read(4)) == [0, 1, 2, 3]
    assert conn.read_error.reason == pb.TOO_MANY_REQUESTS
    conn.close()
    conn, peer = make_pair(loop)
    peer.send(ping(1) + ping(2)[:4])             # a partial frame is not a request yet
    await settle()
    assert nonces(conn.read(1)) == [1] and conn.read_error is None
    peer.send(ping(2)[4:])
    await settle()
    assert conn.read(0) == [] and conn.read_error.reason == pb.TOO_MANY_REQUESTS
    conn.close()
    frames, used = _core.parse_frames(ping(1) + ping(2), 100, 2)
    assert nonces(frames) == [1, 2]
    with pytest.raises(_core.FrameError) as err:
        _core.parse_frames(ping(1) + ping(2), 100, 1)
    assert err.value.reason == pb.TOO_MANY_REQUESTS


async def test_max_frame_is_settable():
    loop = asyncio.get_running_loop()
    conn, peer = make_pair(loop, max_frame=100)
    assert conn.max_frame == 100
    with pytest.raises(ValueError):
        conn.max_frame = 0
    conn.max_frame = 5000
    peer.send(_core.pack_frame(0x05, b"a" * 5000))
    await settle()
    assert len(conn.read()) == 1
    conn.max_frame = 100
    peer.send(_core.pack_frame(0x05, b"a" * 101))
    await settle()
    assert conn.read() == [] and conn.read_error.reason == pb.FRAME_TOO_LARGE
    conn.close()


def test_header_messages_show_bytes_unsigned():
    # Item 11: every header byte >= 0x80 is shown as its unsigned value, and
    # a length with the top bit set as the full unsigned 32-bit number.
    cases = [
        (b"\x01\x05\x80\x00\x00\x00\x00\x00", "flags=0x80, reserved=0x00"),
        (b"\x01\x05\x00\xff\x00\x00\x00\x00", "flags=0x00, reserved=0xff"),
        (b"\xfe\x05\x00\x00\x00\x00\x00\x00", "unsupported protocol version 254"),
        (b"\x01\x05\x00\x00\xff\xff\xff\xfe", "frame body of 4294967294 bytes exceeds limit 100"),
        (b"\x01\x05\x00\x00\x80\x00\x00\x01", "frame body of 2147483649 bytes exceeds limit 100"),
    ]
    for header, text in cases:
        with pytest.raises(_core.FrameError) as err:
            _core.parse_frames(header, 100)
        assert text in err.value.message, err.value.message
        assert "-" not in err.value.message


async def wait_until(cond, timeout=2.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond() and loop.time() < deadline:
        await asyncio.sleep(0.005)
    return cond()


def recv_until_reset(sock, timeout=2.0):
    """Bytes the peer got before its connection was reset; None if it was
    closed cleanly (EOF) instead."""
    import time
    sock.settimeout(timeout)
    got = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            return bytes(got)
        except (BlockingIOError, socket.timeout):
            continue
        if not chunk:
            return None
        got += chunk
    raise AssertionError("neither reset nor closed")


async def test_abort_sends_rst_and_tells_the_owner():
    # Item 11: an RST frees the kernel's buffers at once (no FIN_WAIT, no
    # send queue kept for a peer that does not read).
    loop = asyncio.get_running_loop()
    conn, peer = tcp_pair(loop)
    owner = conn.owner
    conn.send(_core.core_frame(0x43, b"before"))
    kick = _core.core_frame(0x44, pb.Kick(reason=pb.SLOW_CONSUMER).SerializeToString())
    conn.abort(kick)
    assert conn.closed and owner.lost == 1
    conn.abort()                                 # idempotent
    got = await loop.run_in_executor(None, recv_until_reset, peer)
    # the socket had room: the best-effort Kick went out before the RST
    assert got == _core.wire_bytes(_core.core_frame(0x43, b"before")) + _core.wire_bytes(kick)
    peer.close()


async def test_abort_drops_unstarted_frames_keeps_the_stream_whole():
    loop = asyncio.get_running_loop()
    conn, peer = tcp_pair(loop, small_buffers=True, max_backlog_bytes=1 << 24)
    sent = [_core.core_frame(0x43, bytes([i]) * 100_000) for i in range(40)]
    for f in sent:
        conn.send(f)
    assert conn.backlog_frames > 1
    wire = [_core.wire_bytes(f) for f in sent]
    written, started = conn.bytes_sent, 0
    while sum(map(len, wire[:started])) < written:
        started += 1
    kick = _core.core_frame(0x44, b"")
    conn.abort(kick)
    peer.setblocking(True)
    got = await loop.run_in_executor(None, recv_until_reset, peer)
    # What the peer got is a prefix of the frames already started, then the
    # Kick: the unstarted ones were dropped, so the RST came early.
    expected = b"".join(wire[:started]) + _core.wire_bytes(kick)
    assert got and expected.startswith(got)     # the send queue dies with the RST
    assert started < len(sent)
    peer.close()


async def test_closing_connection_reads_a_bounded_amount_then_resets():
    # Item 8: a closing connection was read until EAGAIN, without bound.
    loop = asyncio.get_running_loop()
    conn, peer = tcp_pair(loop)
    owner = conn.owner
    conn.start_reading(lambda: None)
    conn.close_after(_core.core_frame(0x42, b""))
    assert conn.closing and not conn.closed
    sent = 0

    def flood():
        nonlocal sent
        peer.setblocking(True)
        peer.settimeout(5)
        chunk = b"\x00" * 65536
        try:
            for _ in range(200):                 # 12.5 MiB, far past the bound
                peer.sendall(chunk)
                sent += len(chunk)
        except (ConnectionResetError, BrokenPipeError):
            return True
        return False

    reset = await loop.run_in_executor(None, flood)
    assert await wait_until(lambda: conn.closed)
    assert owner.lost == 1
    assert reset and sent < 8 << 20, sent
    peer.close()


async def test_closing_connection_under_the_bound_closes_cleanly():
    # What a client had in flight when it was told to go is read and dropped
    # (no RST that could destroy the final frame before it is read).
    loop = asyncio.get_running_loop()
    conn, peer = tcp_pair(loop)
    conn.start_reading(lambda: None)
    final = _core.core_frame(0x42, b"bye")
    conn.close_after(final)
    peer.setblocking(True)
    peer.sendall(b"\x00" * (200 * 1024))
    await asyncio.sleep(0.05)
    assert conn.closing and not conn.closed
    peer.shutdown(socket.SHUT_WR)
    assert await wait_until(lambda: conn.closed)
    got = await loop.run_in_executor(None, recv_until_reset, peer)
    assert got is None                           # EOF, not a reset
    peer.close()


# ---------------------------------------------------------------- replay cache

def _replayed(frames):
    out = []
    for f in frames:
        [(t, _fl, body)], _ = _core.parse_frames(_core.wire_bytes(f), MAX)
        assert t == 0x43
        out.append(pb.Batch.FromString(body).messages)
    return out


def _naive(records, after, flushed, oldest):
    start = max(after + 1, oldest)
    return [records[s] for s in range(start, flushed + 1)]


async def test_replay_matches_a_naive_rebuild_and_is_shared():
    import random
    rnd = random.Random(1)
    loop = asyncio.get_running_loop()
    ring = 300
    hub = _core.Hub(loop, ring_size=ring, ring_bytes=1 << 20)
    room = hub.room("r", "e", 0)
    records = {}
    seq = 0
    for round_ in range(6):                      # the ring wraps several times
        for _ in range(rnd.randint(50, 250)):
            seq += 1
            records[seq] = record("r", seq, bytes([seq % 256]) * rnd.choice([3, 50, 700]))
            hub.publish("r", "e", seq, records[seq])
        hub.flush()
        oldest = room.oldest_seq
        for _ in range(40):
            after = rnd.randint(max(0, oldest - 20), seq)
            max_bytes = rnd.choice([200, 5000, 65536])
            gap_from, gap_to, frames = room.replay(after, max_bytes, 256, 4)
            if after + 1 < oldest:
                assert (gap_from, gap_to) == (after + 1, oldest - 1)
            else:
                assert (gap_from, gap_to) == (0, 0)
            batches = _replayed(frames)
            got = [m.SerializeToString() for b in batches for m in b]
            want = [pb.Batch.FromString(r).messages[0].SerializeToString()
                    for r in _naive(records, after, seq, oldest)]
            assert got == want                    # exact range, no duplicates
            for f in frames:                      # cut by bytes, as before
                assert len(f) - 24 <= max(max_bytes, 800) + 64
            again = room.replay(after, max_bytes, 256, 4)[2]
            assert all(a is b for a, b in zip(again, frames)) and len(again) == len(frames)
        # what the cache holds stays about the ring's size
        assert room.replay_cache_bytes <= (1 << 20) + (1 << 19)


async def test_a_thousand_replays_of_one_range_cost_one_build():
    # Item 1: the whole history was rebuilt and lz4-HC-compressed per requester.
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop, ring_size=1024)
    room = hub.room("r", "e", 0)
    for seq in range(1, 1001):
        hub.publish("r", "e", seq, record("r", seq, b"gift from a fan " * 8))
    hub.flush()
    first = room.replay(1, 65536, 256, 4)[2]
    builds = room.replay_builds
    assert builds <= 1000 // 64 + 2
    for _ in range(1000):
        frames = room.replay(1, 65536, 256, 4)[2]
        assert frames == first and all(a is b for a, b in zip(frames, first))
    assert room.replay_builds == builds          # nothing rebuilt
    assert room.replay_hits >= 1000
    # another start shares every whole chunk: at most one new piece
    room.replay(37, 65536, 256, 4)
    assert room.replay_builds == builds + 1


async def test_replay_cache_follows_the_ring_and_the_epoch():
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop, ring_size=128)
    room = hub.room("r", "e1", 0)
    for seq in range(1, 129):
        hub.publish("r", "e1", seq, record("r", seq, b"old"))
    hub.flush()
    room.replay(0, 65536)
    assert room.replay_cache_bytes > 0
    for seq in range(129, 129 + 70):             # seqs 1..70 leave the ring
        hub.publish("r", "e1", seq, record("r", seq, b"new"))
    hub.flush()
    gap_from, gap_to, frames = room.replay(0, 65536)
    assert (gap_from, gap_to) == (1, 70)
    seqs = [m.seq for b in _replayed(frames) for m in b]
    assert seqs == list(range(71, 199))
    hub.publish("r", "e2", 1, record("r", 1, b"epoch two"))   # new epoch: history restarts
    assert room.replay_cache_bytes == 0
    hub.flush()
    [[msg]] = _replayed(room.replay(0, 65536)[2])
    assert (msg.seq, msg.payload) == (1, b"epoch two")
