"""Smoke tests of bench/scenarios/ and its peers (bench/peers/).

They check that the scenario commands run and produce correct, complete
results (files written, every message delivered, no gaps) and that each peer
answers its protocol. They never assert on speed: figures from a smoke run
on a shared machine mean nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fanout.protocol.auth import mint
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol.wire import FrameType as FT

from rawclient import RawClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scenarios.harness import PY, Proc, build_c  # noqa: E402
from bench.peers import stream  # noqa: E402
from bench.scenarios.peers import (NODE_PEERS, NODE_PEERS_DIR, run_node_peer,  # noqa: E402
                                   run_py_peer, write_frames_file)



def _run_scenario(name: str, out: Path, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.scenarios", name, "--quick",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = out / f"{name}.quick.json"
    assert path.exists()
    return json.loads(path.read_text())


def test_wire_bytes_quick(tmp_path):
    r = _run_scenario("wire-bytes", tmp_path, 60)
    e = r["engine_end_to_end"]
    assert e["refused"] == 0
    assert e["published"] > 0
    assert e["messages_delivered"] == e["expected_deliveries"]
    assert e["gaps"] == 0
    assert r["v1_end_to_end"]["gaps"] == 0 and r["v1_end_to_end"]["messages"] > 0
    assert 0 < r["ratio_engine_to_v1"] < 1
    assert r["verdict"] in ("met", "missed")
    assert r["machine"]["cpus"] >= 1
    # Batching can only lower the bytes per message.
    per = [row["bytes_per_message"] for row in r["static_by_batch_size"]]
    assert per == sorted(per, reverse=True)
    # The quiet room, with the dictionary and without (the settings before it).
    quiet, before = r["quiet_room_end_to_end"], r["before"]["quiet_room"]
    for side in (quiet, before, r["before"]["reference_room"]):
        assert side["gaps"] == 0 and side["messages_delivered"] == side["expected_deliveries"] > 0
    assert quiet["messages_per_frame"] == 1.0
    assert quiet["bytes_per_message"] < 0.8 * before["bytes_per_message"]


def test_quiet_rooms_quick(tmp_path):
    r = _run_scenario("quiet-rooms", tmp_path, 90)
    load = r["engine"]["load"]
    assert load["gaps"] == 0 and load["reorders"] == 0 and load["divergences"] == 0
    assert load["viewers_joined"] == 200
    assert load["deliveries"] > 0 and load["deliveries"] == load["expected_deliveries"]
    assert r["naive"]["gaps"] == 0 and r["naive"]["reader"]["messages"] > 0
    # Judged against both goals of issue 10, each reported.
    assert set(r["goals"]) == {"p99_at_most_2_ms", "p99_at_most_naive_p99", "no_gaps"}
    assert r["verdict"] == ("met" if all(r["goals"].values()) else "missed")
    assert "--publish-tick-ms" in r["engine"]["load_command"]


def test_websocket_quick(tmp_path):
    """The engine over WebSocket and over TCP, and a Node peer, in one run:
    every delivery checked on both transports, the ratios and checks there."""
    r = _run_scenario("websocket", tmp_path, 120)
    for transport in ("ws", "tcp"):
        (run,) = r["engine_runs"][transport]
        load = run["load"]
        assert load["gaps"] == 0 and load["reorders"] == 0 and load["divergences"] == 0
        assert load["viewers_joined"] == 300 and load["errors"] == {}
        assert load["deliveries"] > 0 and load["deliveries"] == load["expected_deliveries"]
        assert load["config"]["transport"] == transport
        assert ("--transport ws" in run["load_command"]) == (transport == "ws")
    assert r["peer_runs"]["uws"][0]["gaps"] == 0
    assert r["ratios"]["ws_cost_per_delivery_to_tcp"] > 0
    assert r["verdict"] == ("met" if all(r["checks"].values()) else "missed")
    assert r["order"] == ["engine_ws", "engine_tcp", "uws"]


def test_tls_reference_quick(tmp_path):
    """The reference load on all four ports of one node build (TLS with
    `fanout cert`'s certificate): every delivery checked on each."""
    r = _run_scenario("tls-reference", tmp_path, 240)
    assert r["order"] == ["tcp", "tls", "ws", "wss", "tcp_flat_out", "tls_flat_out",
                          "ws_flat_out", "wss_flat_out"]
    for transport, runs in r["runs"].items():
        for run in (*runs, r["flat_out"][transport]):
            load = run["load"]
            assert load["gaps"] == 0 and load["divergences"] == 0 and load["errors"] == {}
            assert load["viewers_joined"] == 300
            assert load["deliveries"] > 0 and load["deliveries"] == load["expected_deliveries"]
            assert load["config"]["transport"] == transport
    assert {"tls_per_core_to_tcp", "wss_per_core_to_ws", "tls_cpu_per_frame_to_tcp",
            "wss_cpu_per_frame_to_ws", "flat_out_tls_per_core_to_tcp"} <= set(r["ratios"])
    assert r["verdict"] == ("met" if all(r["checks"].values()) else "missed")
    assert r["tls_mode"]["mode"]


def test_c_reference_speaks_enough_protocol(tmp_path):
    frames = tmp_path / "frames.bin"
    info = write_frames_file(frames, n_frames=5, per_frame=40, room="r")
    assert info["frames"] == 5
    ref = Proc([build_c("c_tcp_reference"), "--frames", frames,
                "--viewers", 2, "--duration", 5], "c_reference")
    try:
        port = int(ref.wait_line(r"listening on \S+:(\d+)", 10).group(1))
        clients = [RawClient("127.0.0.1", port) for _ in range(2)]
        for i, c in enumerate(clients):
            assert isinstance(c.hello(mint("x" * 32, f"u{i}")), pb.AuthOk)
            ack = c.join("r", req_id=7)
            assert isinstance(ack, pb.Ack) and ack.req_id == 7 and ack.room == "r"
        for c in clients:
            msgs = c.messages(200)
            assert [m.seq for m in msgs] == list(range(1, 201))
            c.send(FT.PING, pb.Ping(nonce=99))
            assert c.expect(FT.PONG).nonce == 99
        stats = ref.json_line(10)
        assert stats["viewers_joined"] == 2
        assert stats["frames_delivered"] == 10 and stats["errors"] == 0
    finally:
        ref.stop()


def test_naive_frame_mode_answers_protocol():
    srv = Proc([PY, "-m", "bench.peers.naive_server", "--format", "frame",
                "--viewers", 1, "--rate", 200, "--duration", 1, "--linger", 5], "naive")
    try:
        port = int(srv.wait_line(r"listening on \S+:(\d+)", 20).group(1))
        c = RawClient("127.0.0.1", port)
        assert isinstance(c.hello("t"), pb.AuthOk)
        assert isinstance(c.join("room"), pb.Ack)
        msgs = c.messages(50)
        assert [m.seq for m in msgs] == list(range(1, 51))
        c.send(FT.PING, pb.Ping(nonce=5))
        while True:
            ftype, msg = c.next()
            if ftype == FT.PONG:
                assert msg.nonce == 5
                break
        result = srv.json_line(10)
        assert result["messages_published"] > 0
    finally:
        srv.stop()


@pytest.mark.parametrize("peer", ["naive", "websockets"])
def test_json_peers_with_c_reader(peer):
    r = run_py_peer(peer, viewers=20, rate=300, duration=1.5, rooms=2)
    assert r["gaps"] == 0
    assert r["reader"]["conns"] == 20
    assert r["reader"]["messages"] > 0
    # Every message published reached every viewer of its room (10 each).
    assert r["reader"]["messages"] == r["messages_published"] * 10
    assert r["reader"]["duplicates"] == 0


@pytest.mark.parametrize("peer", sorted(NODE_PEERS))
def test_node_peers_with_c_reader(peer):
    """The Node peers (`make test` installs them: `make node-peers`)."""
    r = run_node_peer(peer, viewers=20, rate=300, duration=1.0, rooms=2)
    assert r["gaps"] == 0
    assert r["reader"]["conns"] == 20
    assert r["reader"]["messages"] > 0
    assert r["reader"]["messages"] == r["messages_published"] * 10
    assert r["reader"]["duplicates"] == 0
    assert r["server"]["corpus"] == "fanout.corpus"
    assert r["server"].get("dropped", 0) == 0


def test_node_peers_send_the_python_peers_bytes(tmp_path):
    """common.js builds the same V1 JSON lines as stream.v1_json, byte for
    byte (the corpus has emoji, CJK and U+FFFD from payloads cut at 50 B)."""
    path = tmp_path / "stream.jsonl"
    stream.write_node_stream(path, 300)
    script = ("const c = require('./common');"
              "const s = c.loadStream(process.argv[1]);"
              "process.stdout.write(s.msgs.map((m, i) => c.v1Line('live:ref-0', i + 1, m, "
              "1700000000000 + i)).join(''));")
    got = subprocess.run(["node", "-e", script, str(path)], cwd=NODE_PEERS_DIR,
                         capture_output=True, check=True, timeout=30).stdout
    want = b"".join(stream.v1_json("live:ref-0", i + 1, m, 1700000000000 + i)
                    for i, m in enumerate(stream.take(300)))
    assert got == want


def test_adversarial_quick(tmp_path):
    """Issue 8, "How it is shown": the adversarial scenario's small version
    runs every attack against a real node with a healthy client beside it and
    reports each figure with its threshold (it never asserts on speed)."""
    r = _run_scenario("adversarial", tmp_path, 240)
    names = {"replay_hello", "replay_joins", "ping_flood", "connection_flood",
             "closing_flood", "admin_slowloris"}
    assert set(r["attacks"]) == names
    for name, a in r["attacks"].items():
        for part in a["attacker"] if isinstance(a["attacker"], list) else [a["attacker"]]:
            assert "error" not in part, (name, part)     # the attacker's process failed
        assert a["node"]["alive_after"], name
        assert a["node"]["tracebacks_in_log"] == 0, name
        assert a["healthy_ping_during"]["count"] > 0, name
        assert a["healthy_connect"]["tries"] > 0, name
        assert a["node"]["samples"] > 0 and a["node"]["rss_kib_max"] > 0, name
        assert set(a["thresholds"]) == {"ping_p99_under_50ms", "connects_99_of_100_within_1s",
                                        "healthz_200", "rss_bounded", "node_alive"}
        assert a["passed"] == all(a["thresholds"].values())
    # The attacks did what they say.
    hello = r["attacks"]["replay_hello"]["attacker"]
    assert hello["resume_points"] == 200 and hello["first_frame"] is not None
    assert r["attacks"]["replay_hello"]["prepared"]["published"] == 64
    assert r["attacks"]["ping_flood"]["attacker"]["pings_written"] > 1000
    flood = r["attacks"]["connection_flood"]["attacker"]
    assert sum(p["opened"] for p in flood) >= 100
    assert sum(p["bytes_written"] for p in r["attacks"]["closing_flood"]["attacker"]) > 0
    assert r["summary"].startswith("adversarial:")


def test_cluster_scenarios_run(tmp_path):
    """The cluster's benchmarks run end to end (their figures are not
    checked: a smoke run measures nothing): the router driver gets its calls
    stored, and every storm client resumes on the surviving node."""
    router = _run_scenario("router-throughput", tmp_path, 180)
    assert router["driver"]["stored"] > 0 and router["driver"]["refused"] == 0
    storm = _run_scenario("reconnect-storm", tmp_path, 300)
    assert storm["resumed"] == storm["clients"] == 500
