"""The load generator (fanout load): it measures a real node correctly, and
its checker does catch gaps, reorders, divergences and slow-consumer cuts."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import threading
import time
import urllib.request

import jwt
import pytest

from conftest import SECRET
from fanout import _core
from fanout.protocol import wire
from fanout._loadgen import bucket_index, bucket_value, percentiles_of
from fanout.load.corpus import Corpus, read_stamp
from fanout.load import LoadConfig, build_viewers, plan, run
from fanout.load.report import summary
from fanout.protocol import fanout_pb2 as pb

FT = wire.FrameType


def test_histogram_buckets_are_close():
    for value in (0, 1, 127, 128, 1000, 123_456, 10**9, 7 * 10**12):
        mid = bucket_value(bucket_index(value))
        assert abs(mid - value) <= max(1, value / 64), value
    assert percentiles_of([(bucket_index(10), 99), (bucket_index(10**6), 1)], (50, 99, 100)) \
        == [10, 10, bucket_value(bucket_index(10**6))]


def test_corpus_is_seeded_and_sized():
    a, b = Corpus(7).messages(50), Corpus(7).messages(50)
    assert [(k, s, p[8:]) for k, s, p in a] == [(k, s, p[8:]) for k, s, p in b]
    assert all(len(p) == 50 for _, _, p in a)
    assert {k for k, _, _ in a} == {"chat", "gift"}
    assert abs(read_stamp(a[0][2]) - time.time_ns()) < 60 * 10**9


@pytest.mark.timeout(60)
def test_load_against_node_counts_every_delivery(start_node):
    node = start_node("--log-level", "WARNING")
    result = run(LoadConfig(
        host=node.host, port=node.port, admin_port=node.admin_port, api_key=node.api_key,
        secret=SECRET, viewers=300, rooms=3, processes=2, rate=500, warmup=0.5,
        duration=2.5, decode_every=10, node_pid=node.proc.pid, read_interval=0.05,
        progress=False))
    accepted = result["published"]["accepted"]
    assert accepted >= 1000
    # Every accepted message reached each of the 100 members of its room, exactly.
    assert result["expected_deliveries"] == accepted * 100
    assert result["deliveries"] == result["expected_deliveries"]
    assert result["viewers_joined"] == 300 and result["processes"] == 2
    assert result["gaps"] == result["reorders"] == result["divergences"] == 0
    assert result["check"]["verified_viewers"] == 300
    assert result["check"]["unverified_viewers"] == 0
    assert result["slow_consumer_cuts"] == 0 and result["errors"] == {}
    lat = result["latency_ms"]
    assert lat["samples"] > 0
    assert 0 <= lat["p50"] <= lat["p99"] <= lat["p999"] < 5000
    assert result["deliveries_per_s"] > 0 and result["frames_per_s"] > 0
    assert 20 < result["wire_bytes_per_msg"] < 200
    assert result["cpu"]["workers_s"] > 0 and result["cpu"]["node_s"] is not None
    assert result["connect"]["time_to_all_joined_s"] > 0
    assert result["drain"]["complete"] is True
    assert result["ok"] is True
    assert re.search(r"; node [\d.]+ cores\n", summary(result)), summary(result)
    json.dumps(result)


class TinyServer:
    """Just enough of a node: AuthOk, Ack, then scripted Batch frames.

    The first viewer (user load-0-0) is the decoded one; the second gets one
    altered frame (a divergence), then a Kick(SLOW_CONSUMER).
    """

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.threads = []
        self.done = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    @staticmethod
    def _until_closed(conn):
        """Read (and drop) until the viewer closes its end, or 10 s."""
        conn.settimeout(10)
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    @staticmethod
    def _read(conn, decoder):
        while True:
            data = conn.recv(65536)
            if not data:
                raise ConnectionError("closed")
            frames = decoder.feed(data)
            if frames:
                return frames[0]

    @staticmethod
    def _batch(room, seqs, tweak=b""):
        now = time.time_ns().to_bytes(8, "little")
        body = b"".join(_core.encode_room_message(room, s, pb.CHAT, 0, "u1",
                                                  now + b"hello " + tweak, 0) for s in seqs)
        return wire.encode_frame(FT.BATCH, body, compress_min=0)

    def _serve(self, conn):
        decoder = wire.FrameDecoder()
        with conn:
            try:
                ftype, _, body = self._read(conn, decoder)
            except ConnectionError:        # fanout load's reachability check
                return
            hello = wire.decode_message(ftype, body)
            user = jwt.decode(hello.token, options={"verify_signature": False})["sub"]
            conn.sendall(wire.encode_frame(FT.AUTH_OK, pb.AuthOk(
                user=user, session="s", ping_interval_ms=20_000, idle_timeout_ms=45_000)))
            ftype, _, body = self._read(conn, decoder)
            join = wire.decode_message(ftype, body)
            conn.sendall(wire.encode_frame(FT.ACK, pb.Ack(req_id=join.req_id, room=join.room,
                                                          seq=0, epoch="e1")))
            second = user.endswith("-1")
            time.sleep(0.4)         # after the load generator's (zero) warm-up
            # seq 4 is missing where 5 arrives (a gap), then comes late (a reorder)
            conn.sendall(self._batch(join.room, [1, 2, 3])
                         + self._batch(join.room, [5, 6, 4], b"!" if second else b""))
            if second:
                conn.sendall(wire.encode_frame(FT.KICK, pb.Kick(
                    reason=pb.SLOW_CONSUMER, message="write backlog over its bound")))
                conn.shutdown(socket.SHUT_WR)
            self._until_closed(conn)

    def close(self):
        self.done.set()
        self.sock.close()


@pytest.mark.timeout(30)
def test_checker_catches_gaps_reorders_divergence_and_cuts():
    server = TinyServer()
    try:
        result = run(LoadConfig(port=server.port, viewers=2, rooms=1, processes=1, rate=0,
                                warmup=0, duration=1.0, decode_every=1000, progress=False))
    finally:
        server.close()
    assert result["viewers_joined"] == 2
    assert result["gaps"] == 1 and result["missing_messages"] == 1
    assert result["reorders"] == 1
    assert result["divergences"] == 1        # the second viewer's altered frame
    assert result["slow_consumer_cuts"] == 1
    assert result["errors"] == {"kick:SLOW_CONSUMER": 1}
    assert result["check"]["cut_viewers"] == 1
    assert result["latency_ms"]["samples"] == 6
    assert result["ok"] is False
    # What a run did not measure says so, not "None" (here: the node's CPU).
    text = summary(result)
    assert "None" not in text and "node not measured (--node-pid" in text, text
    assert text.endswith("NOT OK")


@pytest.mark.timeout(30)
def test_viewers_ping_and_stay_connected(start_node):
    """The viewers' Pings (built in C) are frames the node answers, and they
    keep the viewers past the node's idle timeout."""
    node = start_node("--log-level", "WARNING", "--ping-interval-ms", "100",
                      "--idle-timeout-ms", "400")
    viewers = build_viewers(plan(LoadConfig(host=node.host, port=node.port, secret=SECRET,
                                            viewers=3, rate=0))[0])
    viewers.start()
    viewers.run_for(1.5)
    stats = viewers.stats()
    viewers.close()
    assert stats["joined"] == 3 and stats["live"] == 3, stats
    assert stats["pings_sent"] >= 3 * 5
    assert stats["pongs"] >= stats["pings_sent"] - 3        # at most one in flight each
    assert stats["kicks"] == {} and stats["errors"] == {} and stats["protocol_errors"] == 0


def _publish_random(node, room, count, size):
    body = json.dumps({"messages": [
        {"room": room, "kind": "gift", "payload_b64": base64.b64encode(os.urandom(size)).decode()}
        for _ in range(count)]}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{node.admin_port}/v1/publish", data=body, method="POST",
        headers={"Authorization": f"Bearer {node.api_key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        results = json.loads(resp.read())["results"]
    assert all("seq" in r for r in results)


def _online(node, room):
    req = urllib.request.Request(f"http://127.0.0.1:{node.admin_port}/v1/rooms/{room}",
                                 headers={"Authorization": f"Bearer {node.api_key}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["online"]


@pytest.mark.timeout(60)
def test_slow_consumer_cut_is_counted(start_node):
    node = start_node("--log-level", "WARNING", "--max-backlog-bytes", "4096",
                      "--max-backlog-frames", "4", "--close-grace-ms", "5000")
    cfg = LoadConfig(host=node.host, port=node.port, secret=SECRET, viewers=2, rate=0,
                     decode_every=1, room_prefix="slow-")
    spec = plan(cfg)[0]
    viewers = build_viewers(spec)
    viewers.start()
    deadline = time.monotonic() + 10
    while viewers.stats()["joined"] < 2 and time.monotonic() < deadline:
        viewers.poll(20)
    assert viewers.stats()["joined"] == 2
    viewers.pause(1)                                    # viewer 1 stops reading
    deadline = time.monotonic() + 20
    while _online(node, "slow-0") == 2 and time.monotonic() < deadline:
        _publish_random(node, "slow-0", 20, 8000)      # incompressible, ~160 KB a round
        viewers.run_for(0.05)
    assert _online(node, "slow-0") == 1                 # the node cut it
    viewers.pause(1, False)                             # now read what is there: the Kick
    deadline = time.monotonic() + 10
    while viewers.viewer(1)["state"] == 4 and time.monotonic() < deadline:
        viewers.run_for(0.05)
    stats = viewers.stats()
    # The node cuts a slow consumer with an RST (issue 8 item 11): the Kick
    # arrives only if the full socket took it at once, else a reset ends it.
    viewer = viewers.viewer(1)
    if viewer["end"] == "kick":
        assert stats["slow_cuts"] == 1 and viewer["end_code"] == pb.SLOW_CONSUMER
    else:
        assert viewer["end"] == "socket" and stats["slow_cuts"] == 0, (stats, viewer)
    assert "cut as slow consumer" in node.log()
    assert viewers.viewer(0)["state"] == 4              # the reader kept up
    check = viewers.verify()
    assert check["cut"] == 1 and check["divergences"] == 0    # what it got was a prefix
    assert stats["gaps"] == stats["reorders"] == 0
    viewers.close()


def test_publish_tick_of_one_message_interval_sends_each_message_alone(start_node):
    """``tick`` = 1 / rate (``--publish-tick-ms``, quiet-rooms): a request per
    message, when it is due, instead of a request per 10 ms of messages."""
    node = start_node("--log-level", "WARNING")
    result = run(LoadConfig(
        host=node.host, port=node.port, admin_port=node.admin_port, api_key=node.api_key,
        secret=SECRET, viewers=20, rooms=4, processes=1, rate=100, tick=0.01, warmup=0.2,
        duration=1.5, progress=False))
    published = result["published"]
    assert published["accepted"] >= 100 and result["gaps"] == 0
    # At most a message or two share a request (when the publisher ran late).
    assert published["requests"] >= 0.8 * published["accepted"], published


def test_publish_tick_must_be_positive():
    with pytest.raises(ValueError, match="tick"):
        LoadConfig(rate=10, api_key="k", tick=0).validate()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_preflight_says_what_it_found(start_node):
    """Before any worker starts: a closed client port, an admin API that is
    not there, and a wrong key are each reported as what was found; a node
    with a good key passes."""
    from fanout.load import LoadError
    from fanout.load.cli import preflight

    node = start_node("--log-level", "WARNING")

    def check(**changes):
        cfg = LoadConfig(**{**dict(host="127.0.0.1", port=node.port, admin_port=node.admin_port,
                                   api_key=node.api_key, secret=SECRET, rate=10,
                                   progress=False), **changes})
        return preflight(cfg, "127.0.0.1", "127.0.0.1")

    closed = _closed_port()
    with pytest.raises(LoadError, match=f"nothing listens on 127.0.0.1:{closed}"):
        check(port=closed)
    with pytest.raises(LoadError, match=f"admin API at 127.0.0.1:{closed} cannot be reached"):
        check(admin_port=closed)
    with pytest.raises(LoadError, match="refuses the API key"):
        check(api_key="wrong")
    assert "takes the key" in check()
    assert check(rate=0, admin_port=closed) == f"a node takes connections on 127.0.0.1:{node.port}"


def test_progress_title_has_the_plan_and_time_left():
    from fanout.load.report import Progress

    progress = Progress(LoadConfig(warmup=2, duration=10, progress=False))
    assert "then 12 s of publishing" in progress.title(progress.t0 + 1)
    progress.ends_at = progress.t0 + 20
    assert "8.0 s of 12 s left" in progress.title(progress.t0 + 12)
    assert "publishing done" in progress.title(progress.t0 + 21)
