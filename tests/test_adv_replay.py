"""Issue 8 item 1: replay amplification. A room holds a full history ring
(1,000 messages of ~500 bytes, published through the admin API) and an
attacker with a valid token asks for it again and again, three ways:

(a) one Hello carrying as many resume points for the room as fit a frame;
(b) 6,000 Join frames for the room in one write;
(c) a join with a replay, then never reading.

Meanwhile a healthy client pings every 10 ms. What must hold: its ping
round trip stays under 50 ms p99; the attacker gets the documented answers
(Error TOO_MANY_ROOMS and the close for (a); one Ack and one replay, then
Error ALREADY_JOINED, or the request budget's close, for (b)); the node's
CPU and the bytes it queues for the attacker stay bounded (they were 9.9 s
and 182 MB); and /readyz answers 200 throughout.
"""

from __future__ import annotations

import base64
import os
import socket
import statistics
import threading
import time

import pytest

from conftest import token
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol import wire
from nodeprobe import metric, ready_status
from rawclient import FT, RawClient
from test_operations import api_publish

ROOM = "hot"
HISTORY = 1000
PAYLOAD = 500

pytestmark = pytest.mark.parametrize("node_loop", ["uvloop"])


def _fill_history(node) -> None:
    for start in range(0, HISTORY, 250):
        # Random text: lz4 cannot shrink the replay much, as with real chat.
        batch = [{"room": ROOM, "kind": "gift",
                  "payload": base64.b64encode(os.urandom(PAYLOAD * 3 // 4)).decode()}
                 for i in range(start, start + 250)]
        assert all("seq" in r for r in api_publish(node, batch))




class Pinger(threading.Thread):
    """A healthy client, a member of the room (so the node holds the room and
    its history): one Ping every 10 ms, its round trips in ``rtts``."""

    def __init__(self, node) -> None:
        super().__init__(daemon=True)
        self.client = RawClient(node.host, node.port)
        assert isinstance(self.client.hello(token("healthy")), pb.AuthOk)
        assert isinstance(self.client.join(ROOM), pb.Ack)
        self.rtts: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        nonce = 0
        while not self.stop.is_set():
            nonce += 1
            sent = time.perf_counter()
            self.client.send(FT.PING, pb.Ping(nonce=nonce))
            while True:
                item = self.client.next(timeout=5)
                if item is None:                 # the node is gone: the test failed already
                    self.rtts.append(float("inf"))
                    return
                if item[0] == FT.PONG and item[1].nonce == nonce:
                    break
            self.rtts.append(time.perf_counter() - sent)
            time.sleep(0.01)


def _read_all(client: RawClient, quiet: float = 1.0, limit: float = 20.0) -> tuple[list, int]:
    """Frames and wire bytes until the node closes or is quiet for ``quiet`` s."""
    frames, size = [], 0
    deadline = time.monotonic() + limit
    client.sock.settimeout(quiet)
    while time.monotonic() < deadline:
        try:
            data = client.sock.recv(1 << 20)
        except socket.timeout:
            break
        except ConnectionResetError:
            client.closed = True
            break
        if not data:
            client.closed = True
            break
        size += len(data)
        frames += [(t, wire.decode_message(t, b)) for t, _f, b in client.decoder.feed(data)]
    return frames, size


def test_replay_amplification_is_bounded_and_others_stay_fast(start_node):
    node = start_node("--presence-interval-ms", "0")
    pinger = Pinger(node)
    pinger.start()
    _fill_history(node)
    time.sleep(0.5)                                # flushed into the ring
    cpu_before = node.proc.cpu()

    # (a) One Hello, as many resume points for the room as fit a 64 KiB frame.
    point = pb.ResumePoint(room=ROOM, last_seq=1)
    count = (65_536 - 200) // len(pb.Hello(resume=[point]).SerializeToString())
    hello = pb.Hello(token=token("attacker"), device_id="a", resume=[point] * count)
    assert len(hello.SerializeToString()) <= 65_536
    a = RawClient(node.host, node.port)
    a.send(FT.HELLO, hello)
    frames_a, bytes_a = _read_all(a)
    print(f"(a) {count} resume points: {[FT(t).name for t, _ in frames_a[:5]]}, {bytes_a} bytes")
    assert [t for t, _ in frames_a] == [FT.ERROR] and a.closed
    # TOO_MANY_ROOMS; or the frame limit before authentication
    # (max_hello_bytes) refuses the Hello first: FRAME_TOO_LARGE, or
    # BAD_COMPRESSION when the body was lz4 and inflates past it. Either way:
    # no replay.
    assert frames_a[0][1].reason in (pb.TOO_MANY_ROOMS, pb.FRAME_TOO_LARGE,
                                     pb.BAD_COMPRESSION)
    assert bytes_a < 1024
    assert ready_status(node) == 200

    # (b) 6,000 Joins for the room in one write, read to the end.
    b = RawClient(node.host, node.port)
    assert isinstance(b.hello(token("attacker2")), pb.AuthOk)
    joins = b"".join(wire.encode_frame(FT.JOIN, pb.Join(req_id=i + 1, room=ROOM, last_seq=1))
                     for i in range(6000))
    b.send_raw(joins)
    frames_b, bytes_b = _read_all(b)
    kinds = [t for t, _ in frames_b]
    acks = [m for t, m in frames_b if t == FT.ACK]
    replayed = sum(len(m.messages) for t, m in frames_b if t == FT.BATCH)
    errors = [m for t, m in frames_b if t == FT.ERROR]
    reasons = {pb.Reason.Name(e.reason) for e in errors}
    print(f"(b) {len(acks)} Ack, {replayed} messages replayed, {len(errors)} Errors "
          f"{sorted(reasons)}, {bytes_b} bytes")
    assert len(acks) == 1 and acks[0].req_id == 1
    assert replayed == HISTORY - 1                 # after last_seq 1, once: not 6,000 times
    assert reasons <= {"ALREADY_JOINED", "TOO_MANY_REQUESTS"} and errors
    already = [e for e in errors if e.reason == pb.ALREADY_JOINED]
    assert [e.req_id for e in already] == list(range(2, len(already) + 2))
    assert all(e.room == ROOM for e in already)
    assert kinds.index(FT.ACK) < kinds.index(FT.ERROR)
    assert bytes_b < 2 * HISTORY * PAYLOAD + 6000 * 100      # was 182 MB
    assert ready_status(node) == 200

    # (c) A join with a replay, then never reading (a tiny receive buffer).
    c = RawClient(node.host, node.port, rcvbuf=4096)
    assert isinstance(c.hello(token("attacker3")), pb.AuthOk)
    c.send_raw(joins[:len(joins) // 6000 * 100])   # its first 100 Joins, one write
    time.sleep(1.0)
    backlog = metric(node, "fanout_write_backlog_bytes")
    print(f"(c) write backlog with a stalled attacker: {backlog:.0f} bytes")
    assert backlog < 2 * HISTORY * PAYLOAD + (1 << 20)
    assert ready_status(node) == 200

    pinger.stop.set()
    pinger.join(5)
    cpu = node.proc.cpu() - cpu_before
    rtts = sorted(pinger.rtts)
    p50 = statistics.median(rtts)
    p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]
    print(f"healthy ping: {len(rtts)} round trips, p50 {p50 * 1000:.2f} ms, "
          f"p99 {p99 * 1000:.2f} ms, max {rtts[-1] * 1000:.2f} ms; node CPU {cpu:.2f} s")
    assert len(rtts) > 100
    assert p99 < 0.050
    assert cpu < 3.0                                           # was 9.9 s for (a) alone
    c.close()
