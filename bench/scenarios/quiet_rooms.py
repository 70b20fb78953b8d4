"""quiet-rooms: 100 rooms of 100 viewers at 5 messages/s each, the latency of
a room that never fills a batch; the engine against the naive server, each
message published on its own when it is due (the naive peer's pacing).
Judged against both goals of issue 10: p99 <= 2 ms, and p99 <= the naive
peer's p99 in the same run."""

from __future__ import annotations

from bench.scenarios.harness import Node
from bench.scenarios.load import QUIET_SETTINGS, load_args_quiet, run_load_on, slim
from bench.scenarios.peers import run_py_peer
from bench.scenarios.report import TARGETS


def quiet_rooms(quick: bool) -> dict:
    rooms, per_room = (10, 20) if quick else (100, 100)
    duration = 5.0 if quick else 30.0
    peer_duration = 4.0 if quick else 15.0
    settings = QUIET_SETTINGS
    node = Node(**settings)
    try:
        load, cmd = run_load_on(node, load_args_quiet(rooms, per_room, duration), duration + 200)
    finally:
        node.stop()
    naive = run_py_peer("naive", rooms * per_room, rooms * 5, peer_duration, rooms=rooms,
                        room="quiet")
    p99 = (load.get("latency_ms") or {}).get("p99")
    naive_p99 = naive["latency_ms"].get("p99")
    goals = {
        "p99_at_most_2_ms": p99 is not None and p99 <= 2.0,
        "p99_at_most_naive_p99": p99 is not None and naive_p99 is not None and p99 <= naive_p99,
        "no_gaps": load.get("gaps") == 0,
    }
    return {
        "rooms": rooms, "viewers_per_room": per_room, "rate_per_room": 5,
        "duration_s": duration, "peer_duration_s": peer_duration, "node_settings": settings,
        "engine": {"load": slim(load), "load_command": cmd, "node_command": node.command},
        "naive": naive,
        "ratios": {"engine_p99_to_naive_p99": round(p99 / naive["latency_ms"]["p99"], 3)
                   if p99 and naive["latency_ms"]["p99"] else None},
        "target": TARGETS["quiet-rooms"],
        "goals": goals,
        "verdict": "met" if all(goals.values()) else "missed",
    }
