"""reference-room: one room of 10,000 viewers at 2,000 messages/s, the
engine against its peers on the same stream: the C reference flat out and
paced at the engine's frame rate, the naive server and websockets, and the
Node peers (uWebSockets.js, ws) at the reference load and flat out, against
the engine over WebSocket at both (bench/scenarios/node_peers.py: like for
like). The target checks are the engine's over TCP."""

from __future__ import annotations

from bench.scenarios.harness import BUILD, Node
from bench.scenarios.load import (REF_ROOM, load_args_reference, load_args_viewers_only,
                                  run_load, slim)
from bench.scenarios.node_peers import (require_node_peers, run_engine_ws, run_node_peers,
                                        versus_node_peers)
from bench.scenarios.peers import run_c_reference, run_py_peer, write_frames_file
from bench.scenarios.report import TARGETS

# The node at the reference load (sweep and profile run it too). The flush
# window is the default 50 ms: with the writer threads a hot room's next
# flush waits for its write round anyway, so frames batch what came during
# the round (about 60 ms for 10k viewers here), and a wider window only adds
# to the hold (the writer-threads scenario compares the two windows).
REFERENCE_SETTINGS = dict(max_delay_ms=50, room_budget=100000, max_connections=19000,
                          conn_rate_per_ip=100000, conn_burst_per_ip=100000)


def reference_room(quick: bool) -> dict:
    require_node_peers()
    viewers = 300 if quick else 10000
    duration = 5.0 if quick else 60.0
    peer_duration = 4.0 if quick else 20.0
    room = REF_ROOM
    settings = REFERENCE_SETTINGS
    out: dict = {"viewers": viewers, "duration_s": duration, "rate_in": 2000,
                 "peer_duration_s": peer_duration,
                 "target": TARGETS["reference-room"], "node_settings": settings}
    node = Node(**settings)
    try:
        load, cmd, _ = run_load(node.host, node.port, load_args_reference(viewers, duration),
                                duration + 400, admin_port=node.admin_port,
                                node_pid=node.proc.pid)
        m1 = node.metrics()
    finally:
        node.stop()
    out["engine"] = {"load": slim(load), "node_counters_end": {
        k: v for k, v in m1.items() if k in (
            "fanout_deliveries_total", "fanout_frames_written_total",
            "fanout_slow_consumers_total", "fanout_degraded_messages_total",
            "fanout_batch_bytes_total:raw", "fanout_batch_bytes_total:compressed",
            "fanout_degradation_level")},
        "load_command": cmd, "node_command": node.command}
    per_frame = max(1, round(load.get("messages_per_batch") or 200))

    # The engine flat out: it flushes whenever its loop is free (max_delay_ms
    # 0) and is fed faster than it can flush (4,000 msg/s), so its frames/s is
    # its capacity, not what 2,000 msg/s asks of it.
    node = Node(**dict(settings, max_delay_ms=0))
    try:
        flat, flat_cmd, _ = run_load(node.host, node.port,
                                     load_args_reference(viewers, peer_duration, rate=4000),
                                     peer_duration + 400, admin_port=node.admin_port,
                                     node_pid=node.proc.pid)
    finally:
        node.stop()
    out["engine_flat_out"] = {"load": slim(flat), "load_command": flat_cmd,
                              "node_command": node.command}

    # C reference: the same frames (corpus, messages per frame), the same
    # number of sockets and the same viewers (fanout load), flat out.
    frames_file = BUILD / "reference_frames.bin"
    BUILD.mkdir(exist_ok=True)
    # Enough frames for flat out (seqs must not repeat): about 700k writes/s
    # at most on this machine, spread over the viewers.
    per_viewer_max = min(3000.0, 700000.0 / viewers)
    info = write_frames_file(frames_file, int(peer_duration * per_viewer_max) + 100,
                             per_frame, room)
    cref = run_c_reference(frames_file, viewers, peer_duration,
                           load_args_viewers_only(viewers, peer_duration))
    cref["load"] = slim(cref["load"])
    cref["frames"] = info
    out["c_reference"] = cref
    # The same C server paced at the engine's frame rate per viewer: what the
    # same work costs in CPU without the engine.
    paced_rate = (load.get("batch_frames_per_s") or 0.0) / viewers
    if paced_rate > 0:
        paced = run_c_reference(frames_file, viewers, peer_duration,
                                load_args_viewers_only(viewers, peer_duration),
                                rate=round(paced_rate, 3))
        paced["load"] = slim(paced["load"])
        out["c_reference_paced"] = paced
    out["naive"] = run_py_peer("naive", viewers, 2000, peer_duration, rooms=1, room=room)
    out["websockets"] = run_py_peer("websockets", viewers, 2000, peer_duration, rooms=1,
                                    room=room)
    # The Node peers are WebSocket servers: the engine against them is read
    # over its WebSocket port too, at the reference load and flat out.
    ws_ref, out["engine_ws"] = run_engine_ws(viewers, peer_duration, 2000, settings)
    ws_flat, out["engine_ws_flat_out"] = run_engine_ws(viewers, peer_duration, 4000,
                                                       dict(settings, max_delay_ms=0))
    node_peers = run_node_peers(viewers, peer_duration, room)
    out.update(node_peers)
    out["versus_node_peers"] = versus_node_peers(ws_ref, ws_flat, node_peers)

    eng_fps = load.get("batch_frames_per_s") or 0.0
    c_fps = cref["server"]["frames_per_s"]
    c_fps_viewers = cref["load"].get("batch_frames_per_s") or 0.0
    d = load.get("deliveries_per_s") or 0.0
    lat = load.get("latency_ms", {})
    paced = out.get("c_reference_paced", {}).get("server", {})
    node_cores = (load.get("cpu") or {}).get("node_window_cores")
    out["ratios"] = {
        "engine_frames_per_s_to_c_reference": round(eng_fps / c_fps, 3) if c_fps else None,
        "engine_node_cores_to_c_paced_cores": round(
            node_cores / (paced["cpu_seconds"] / paced["seconds"]), 2)
        if node_cores and paced.get("cpu_seconds") else None,
        "engine_frames_per_s_to_c_reference_as_read": round(eng_fps / c_fps_viewers, 3)
        if c_fps_viewers else None,
        "engine_flat_out_frames_per_s_to_c_reference": round(
            (flat.get("batch_frames_per_s") or 0.0) / c_fps, 3) if c_fps else None,
        "engine_deliveries_to_naive": round(d / out["naive"]["deliveries_per_s"], 1)
        if out["naive"]["deliveries_per_s"] else None,
        "engine_deliveries_to_websockets": round(d / out["websockets"]["deliveries_per_s"], 1)
        if out["websockets"]["deliveries_per_s"] else None,
    }
    state = load.get("node_at_window_end") or {}
    lag = load.get("node_loop_lag") or {}
    out["node_loop_lag"] = lag
    checks = {
        "deliveries_per_s >= 20M": d >= 20e6,
        "gaps == 0": load.get("gaps") == 0 and load.get("divergences") == 0,
        "p99 <= 150 ms": (lat.get("p99") or 1e9) <= 150,
        "node level 0 and ready": state.get("degradation_level") == 0 and bool(state.get("ready")),
        "loop lag p99 <= 5 ms": (lag.get("p99_at_most_ms") or 1e9) <= 5,
        "frames/s >= 0.8 x C": max(out["ratios"]["engine_frames_per_s_to_c_reference"] or 0,
                                   out["ratios"]["engine_flat_out_frames_per_s_to_c_reference"]
                                   or 0) >= 0.8,
    }
    out["checks"] = checks
    out["verdict"] = "met" if all(checks.values()) else "missed"
    return out
