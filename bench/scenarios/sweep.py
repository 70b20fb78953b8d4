"""sweep: deliveries/s against viewers at the reference load, the engine and
the naive, websockets and Node (uWebSockets.js, ws) peers (the data of
bench/plots.py). The peers are WebSocket servers, the engine is read over its
TCP protocol (until the WebSocket issue lands)."""

from __future__ import annotations

from bench.scenarios.harness import Node
from bench.scenarios.load import REF_ROOM, load_args_reference, load_deliveries, run_load
from bench.scenarios.node_peers import require_node_peers
from bench.scenarios.peers import NODE_PEERS, run_node_peer, run_py_peer
from bench.scenarios.reference_room import REFERENCE_SETTINGS


def sweep(quick: bool) -> dict:
    """Deliveries/s against viewers at the reference load, engine and peers
    (for bench/plots.py)."""
    counts = [50, 150] if quick else [1000, 3000, 10000]
    duration = 4.0 if quick else 15.0
    peer_duration = 3.0 if quick else 10.0
    room = REF_ROOM
    settings = REFERENCE_SETTINGS
    require_node_peers()
    series: dict[str, list] = {"engine": [], "naive": [], "websockets": [],
                               **{kind: [] for kind in NODE_PEERS}}
    for viewers in counts:
        node = Node(**settings)
        try:
            load, cmd, _ = run_load(node.host, node.port,
                                    load_args_reference(viewers, duration),
                                    duration + 240, admin_port=node.admin_port,
                                    node_pid=node.proc.pid)
        finally:
            node.stop()
        lat = dict(load.get("latency_ms") or {})
        lat.pop("histogram", None)
        series["engine"].append({"viewers": viewers, "deliveries_per_s": load_deliveries(load),
                                 "frames_per_s": load.get("frames_per_s"),
                                 "gaps": load.get("gaps"), "cpu": load.get("cpu"),
                                 "latency_ms": lat, "load_command": cmd})
        for peer in ("naive", "websockets", *NODE_PEERS):
            r = (run_node_peer(peer, viewers, 2000, peer_duration, rooms=1, room=room)
                 if peer in NODE_PEERS
                 else run_py_peer(peer, viewers, 2000, peer_duration, rooms=1, room=room))
            series[peer].append({"viewers": viewers, "deliveries_per_s": r["deliveries_per_s"],
                                 "server_cpu_share": r["server_cpu_share"],
                                 "latency_ms": r["latency_ms"], "gaps": r["gaps"]})
    return {"viewers": counts, "rate_in": 2000, "duration_s": duration,
            "peer_duration_s": peer_duration, "node_settings": settings, "series": series}
