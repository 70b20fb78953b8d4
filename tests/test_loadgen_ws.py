"""The load generator's WebSocket viewers (fanout load --transport ws): a
real run over the node's WebSocket port counts every delivery exactly, and
the same verification as over TCP catches faults in WebSocket framing and in
the frames inside it."""

from __future__ import annotations

import socket
import time

import jwt
import pytest

from conftest import SECRET
from test_loadgen import TinyServer
from fanout import _core
from fanout._loadgen import ws_client_message
from fanout.load import LoadConfig, build_viewers, plan, run
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol import wire
from fanout.server.wsupgrade import accept_key

FT = wire.FrameType


@pytest.mark.timeout(60)
def test_ws_load_against_node_counts_every_delivery(start_node):
    node = start_node("--log-level", "WARNING")
    assert node.ws_port
    result = run(LoadConfig(
        host=node.host, port=node.ws_port, transport="ws", admin_port=node.admin_port,
        api_key=node.api_key, secret=SECRET, viewers=300, rooms=3, processes=2, rate=500,
        warmup=0.5, duration=2.5, decode_every=10, node_pid=node.proc.pid, progress=False))
    accepted = result["published"]["accepted"]
    assert accepted >= 1000
    assert result["expected_deliveries"] == accepted * 100
    assert result["deliveries"] == result["expected_deliveries"]
    assert result["viewers_joined"] == 300
    assert result["gaps"] == result["reorders"] == result["divergences"] == 0
    assert result["check"]["verified_viewers"] == 300
    assert result["check"]["unverified_viewers"] == 0
    assert result["errors"] == {} and result["config"]["transport"] == "ws"
    assert result["latency_ms"]["samples"] > 0
    # every byte read is WebSocket framing around wire frames: a little more
    # per message than over TCP, never less
    assert 20 < result["wire_bytes_per_msg"] < 200
    assert result["ok"] is True


@pytest.mark.timeout(30)
def test_ws_viewers_ping_masked_and_stay_connected(start_node):
    """Pings are masked messages built in C (the node refuses unmasked
    client frames with BAD_FRAME), answered, and keep viewers past the
    node's idle timeout."""
    node = start_node("--log-level", "WARNING", "--ping-interval-ms", "100",
                      "--idle-timeout-ms", "400")
    viewers = build_viewers(plan(LoadConfig(host=node.host, port=node.ws_port, transport="ws",
                                            secret=SECRET, viewers=3, rate=0))[0])
    viewers.start()
    viewers.run_for(1.5)
    stats = viewers.stats()
    viewers.close()
    assert stats["ws_upgrades"] == 3 and stats["joined"] == 3 and stats["live"] == 3, stats
    assert stats["pings_sent"] >= 3 * 5
    assert stats["pongs"] >= stats["pings_sent"] - 3
    assert stats["kicks"] == {} and stats["errors"] == {} and stats["protocol_errors"] == 0


@pytest.mark.timeout(30)
def test_ws_refused_upgrade_ends_the_viewer_with_its_status(start_node):
    node = start_node("--log-level", "WARNING")
    viewers = build_viewers(plan(LoadConfig(host=node.host, port=node.ws_port, transport="ws",
                                            ws_path="/nope", secret=SECRET, viewers=2,
                                            rate=0))[0])
    viewers.start()
    deadline = time.monotonic() + 10
    while viewers.stats()["done"] < 2 and time.monotonic() < deadline:
        viewers.run_for(0.05)
    stats = viewers.stats()
    viewers.close()
    assert viewers.ends() == {"upgrade:404": 2}
    assert stats["ws_upgrades_refused"] == 2 and stats["errnos"] == {"http:404": 2}
    assert stats["retries"] == 0 and stats["joined"] == 0


def test_client_messages_are_masked():
    msg = ws_client_message(b"\x00" * 200, 0x04030201)
    assert msg[:4] == bytes([0x82, 0x80 | 126, 0, 200])
    assert msg[4:8] == bytes([1, 2, 3, 4])
    assert msg[8:] == bytes([1, 2, 3, 4]) * 50          # zeros XOR the key


def _server_msg(payload: bytes, opcode: int = 0x2) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n <= 0xFFFF:
        head = bytes([0x80 | opcode, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 127]) + n.to_bytes(8, "big")
    return head + payload


class TinyWsServer(TinyServer):
    """Just enough of a node's WebSocket port: the 101, AuthOk, Ack, then
    scripted messages per viewer (by user index):

    0: the decoded viewer; seq 4 is missing where 5 arrives (a gap), then
       comes late (a reorder);
    1: one altered frame (a divergence), then Kick(SLOW_CONSUMER) and Close 4031;
    2: two wire frames in one message (a protocol error);
    3: Close 4031 without its Kick (the reason comes from the close code);
    4: the Batch frames split in two messages each, fragmented (a protocol error).
    Every client frame must be masked: ``unmasked`` counts those that were not.
    """

    def __init__(self):
        self.unmasked = 0
        self.t0 = time.time_ns()
        super().__init__()              # TinyServer's socket and accept loop

    def _read_message(self, conn, buf: bytearray) -> bytes:
        while True:
            if len(buf) >= 4:                 # a client's requests are < 64 KiB
                n, pos = buf[1] & 0x7F, 2
                if n == 126:
                    n, pos = int.from_bytes(buf[2:4], "big"), 4
                masked = buf[1] & 0x80
                end = pos + (4 if masked else 0) + n
                if len(buf) >= end:
                    if not masked:
                        self.unmasked += 1
                        payload = bytes(buf[pos:end])
                    else:
                        key = buf[pos:pos + 4]
                        payload = bytes(b ^ key[i & 3] for i, b in enumerate(buf[pos + 4:end]))
                    del buf[:end]
                    return payload
            data = conn.recv(65536)
            if not data:
                raise ConnectionError("closed")
            buf += data

    def _batch(self, room, seqs, tweak=b""):
        # one timestamp for all: every viewer must get the same bytes
        now = self.t0.to_bytes(8, "little")
        body = b"".join(_core.encode_room_message(room, s, pb.CHAT, 0, "u1",
                                                  now + b"hello " + tweak, 0) for s in seqs)
        return wire.encode_frame(FT.BATCH, body, compress_min=0)

    def _serve(self, conn):
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            head, _, rest = head.partition(b"\r\n\r\n")
            key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:"))
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                         + accept_key(key.decode()).encode() + b"\r\n\r\n")
            buf = bytearray(rest)
            hello = wire.decode_message(*self._frame(self._read_message(conn, buf)))
            user = jwt.decode(hello.token, options={"verify_signature": False})["sub"]
            which = int(user.rsplit("-", 1)[1])
            conn.sendall(_server_msg(wire.encode_frame(FT.AUTH_OK, pb.AuthOk(
                user=user, session="s", ping_interval_ms=20_000, idle_timeout_ms=45_000))))
            join = wire.decode_message(*self._frame(self._read_message(conn, buf)))
            conn.sendall(_server_msg(wire.encode_frame(FT.ACK, pb.Ack(
                req_id=join.req_id, room=join.room, seq=0, epoch="e1"))))
            time.sleep(0.4)         # after the load generator's (zero) warm-up
            first = self._batch(join.room, [1, 2, 3])
            second = self._batch(join.room, [5, 6, 4], b"!" if which == 1 else b"")
            close_4031 = _server_msg(bytes([4031 >> 8, 4031 & 0xFF]) + b"SLOW_CONSUMER", 0x8)
            if which == 2:
                conn.sendall(_server_msg(first + second))
            elif which == 4:
                conn.sendall(bytes([0x02, len(first[:10])]) + first[:10]
                             + bytes([0x80, len(first) - 10]) + first[10:])
            else:
                # one message split over two writes: the carry buffer
                data = _server_msg(first) + _server_msg(second)
                conn.sendall(data[:7])
                time.sleep(0.05)
                conn.sendall(data[7:])
            if which in (1, 3):
                if which == 1:
                    conn.sendall(_server_msg(wire.encode_frame(FT.KICK, pb.Kick(
                        reason=pb.SLOW_CONSUMER, message="write backlog over its bound"))))
                conn.sendall(close_4031)
                conn.shutdown(socket.SHUT_WR)
            self._until_closed(conn)

    @staticmethod
    def _frame(payload: bytes):
        frames = wire.FrameDecoder().feed(payload)
        assert len(frames) == 1
        ftype, _flags, body = frames[0]
        return ftype, body


@pytest.mark.timeout(30)
def test_ws_checker_catches_gaps_reorders_divergence_cuts_and_bad_framing():
    server = TinyWsServer()
    try:
        viewers = build_viewers(plan(LoadConfig(
            port=server.port, transport="ws", viewers=5, rooms=1, processes=1, rate=0,
            decode_every=1000))[0])
        viewers.start()
        deadline = time.monotonic() + 10
        while viewers.stats()["done"] < 4 and time.monotonic() < deadline:
            viewers.run_for(0.05)
        stats, check = viewers.stats(), viewers.verify()
        views = [viewers.viewer(i) for i in range(5)]
        viewers.close()
    finally:
        server.close()
    assert server.unmasked == 0
    assert stats["joined"] == 5 and stats["ws_upgrades"] == 5
    assert stats["gaps"] == 1 and stats["missing"] == 1 and stats["reorders"] == 1
    assert check["divergences"] == 1 and check["divergent_viewers"] == [1]
    assert views[1]["end"] == "kick" and views[1]["end_code"] == pb.SLOW_CONSUMER
    assert views[1]["ws_close"] == 4031 and stats["slow_cuts"] == 1
    assert views[2]["end"] == "protocol" and views[4]["end"] == "protocol"
    assert stats["protocol_errors"] == 2
    assert views[3]["end"] == "error" and views[3]["end_code"] == pb.SLOW_CONSUMER
    assert views[0]["state"] == 4 and views[0]["messages"] == 6
    assert views[3]["batch_frames"] == 2 and check["cut"] == 4
