"""websocket: the engine over WebSocket (issue 11) at the reference load
(one room of 10,000 viewers, 2,000 msg/s of 50 B, reference-room's node
settings), in one run:

* against itself over TCP, alternating (ws, tcp, tcp, ws, ws, tcp, ...):
  the WebSocket path's cost, the node's CPU per delivery and per Batch
  frame written over WebSocket divided by that over TCP, from the medians
  (goal: at most 1.1). At a fixed offered rate the node batches what came
  during its last write round, so messages per frame (and with them CPU per
  delivery) swing between runs with the machine's other load (114 to 248
  messages per frame in the same run); the CPU per frame written, each one a
  send() to one viewer, is the cost the transport can change, and the check
  is on it;
* against the Node WebSocket peers (uWebSockets.js pub/sub with and without
  its batching, and the ws package), each read by c_reader --mode ws, run
  between the engine's rounds: deliveries/s per core and p99 (goal: ahead
  of uWebSockets.js on both).

The engine's viewers are ``fanout load --transport ws``: the node's
WebSocket port, an HTTP upgrade, masked requests, every server message
de-framed in C and checked as over TCP (gaps, reorders, the rolling hash of
every viewer's frames).
"""

from __future__ import annotations

import statistics

from bench.scenarios.harness import Node
from bench.scenarios.load import REF_ROOM, load_args_reference, run_load_on, slim
from bench.scenarios.node_peers import (NODE_PEERS, engine_row, peer_row,
                                        require_node_peers)
from bench.scenarios.peers import run_node_peer

TRANSPORTS = ("ws", "tcp")


def run_engine(transport: str, viewers: int, duration: float, rate: float = 2000,
               **overrides) -> dict:
    """One engine run at the reference settings over ``transport``: the
    load result (slimmed), its row (deliveries per core, p99) and commands."""
    from bench.scenarios.reference_room import REFERENCE_SETTINGS
    node = Node(**dict(REFERENCE_SETTINGS, **overrides))
    try:
        load, cmd = run_load_on(node, load_args_reference(viewers, duration, rate=rate),
                                duration + 400, transport=transport)
    finally:
        node.stop()
    row = engine_row(load)
    frames = load.get("batch_frames_per_s") or 0.0
    row["node_us_per_frame"] = (round(row["cores"] * 1e6 / frames, 3)
                                if row["cores"] and frames else None)
    row["messages_per_frame"] = load.get("messages_per_batch")
    return {"transport": transport, "row": row, "load": slim(load),
            "load_command": cmd, "node_command": node.command}


def median_row(rows: list[dict]) -> dict:
    """Medians of each figure over runs (None when a run lacks it)."""
    out = {}
    for key in ("deliveries_per_s", "cores", "deliveries_per_core_s", "p99_ms",
                "node_us_per_frame", "messages_per_frame"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["gaps"] = sum(r.get("gaps") or 0 for r in rows)
    out["runs"] = len(rows)
    return out


def websocket(quick: bool) -> dict:
    require_node_peers()
    viewers = 300 if quick else 10000
    duration = 4.0 if quick else 20.0
    rounds = 1 if quick else 3
    peers = ("uws",) if quick else tuple(NODE_PEERS)
    out: dict = {"viewers": viewers, "rate_in": 2000, "duration_s": duration,
                 "rounds": rounds, "order": []}
    engine: dict[str, list[dict]] = {t: [] for t in TRANSPORTS}
    peer_runs: dict[str, list[dict]] = {k: [] for k in peers}
    for i in range(rounds):
        # ABBA order: neither transport always runs first after the peers
        for transport in (TRANSPORTS if i % 2 == 0 else TRANSPORTS[::-1]):
            engine[transport].append(run_engine(transport, viewers, duration))
            out["order"].append(f"engine_{transport}")
        if i < len(peers):
            # one peer per round (the peers are 8x to 300x behind per core,
            # so one run each decides; the engine's rounds need the repeats)
            kind = peers[i]
            peer_runs[kind].append(run_node_peer(kind, viewers, 2000, duration, rooms=1,
                                                 room=REF_ROOM))
            out["order"].append(kind)
    for kind in peers[rounds:]:
        peer_runs[kind].append(run_node_peer(kind, viewers, 2000, duration, rooms=1,
                                             room=REF_ROOM))
        out["order"].append(kind)
    out["engine_runs"] = engine
    out["peer_runs"] = peer_runs
    medians = {f"engine_{t}": median_row([r["row"] for r in engine[t]]) for t in TRANSPORTS}
    for kind, runs in peer_runs.items():
        medians[kind] = median_row([peer_row(r) for r in runs])
    out["medians"] = medians

    ws, tcp = medians["engine_ws"], medians["engine_tcp"]
    # Cost per delivery: node CPU seconds per delivery, WebSocket over TCP;
    # also per run pair (run i of each transport) to show the spread.
    cost = (round(tcp["deliveries_per_core_s"] / ws["deliveries_per_core_s"], 3)
            if ws["deliveries_per_core_s"] and tcp["deliveries_per_core_s"] else None)
    pairs = [round(t["row"]["deliveries_per_core_s"] / w["row"]["deliveries_per_core_s"], 3)
             for w, t in zip(engine["ws"], engine["tcp"])
             if w["row"]["deliveries_per_core_s"] and t["row"]["deliveries_per_core_s"]]
    per_frame = (round(ws["node_us_per_frame"] / tcp["node_us_per_frame"], 3)
                 if ws["node_us_per_frame"] and tcp["node_us_per_frame"] else None)
    versus = {}
    for kind in peers:
        p = medians[kind]
        versus[kind] = {
            "engine_ws_per_core_to_peer": round(ws["deliveries_per_core_s"]
                                                / p["deliveries_per_core_s"], 1)
            if ws["deliveries_per_core_s"] and p["deliveries_per_core_s"] else None,
            "engine_ws_p99_to_peer": round(ws["p99_ms"] / p["p99_ms"], 3)
            if ws["p99_ms"] and p["p99_ms"] else None,
        }
    out["ratios"] = {"ws_cost_per_delivery_to_tcp": cost, "ws_cost_per_pair": pairs,
                     "ws_cost_per_frame_to_tcp": per_frame,
                     "versus_peers": versus}
    uws = [k for k in peers if k.startswith("uws")]
    checks = {
        "ws: every delivery, no gap": all(
            r["load"].get("gaps") == 0 and r["load"].get("divergences") == 0
            and r["load"].get("deliveries") == r["load"].get("expected_deliveries")
            for r in engine["ws"]),
        "ws cost per frame written <= 1.1x tcp": per_frame is not None and per_frame <= 1.1,
        "ahead of uWebSockets.js per core": all(
            (versus[k]["engine_ws_per_core_to_peer"] or 0) > 1 for k in uws),
        "ahead of uWebSockets.js on p99": all(
            (versus[k]["engine_ws_p99_to_peer"] or 1e9) < 1 for k in uws),
    }
    out["checks"] = checks
    out["verdict"] = "met" if all(checks.values()) else "missed"
    return out


def summary(r: dict) -> str:
    lines = [f"websocket: {r['viewers']} viewers, 2,000 msg/s, {r['rounds']} rounds "
             f"(medians); WS cost per frame written {r['ratios']['ws_cost_per_frame_to_tcp']}x "
             f"TCP, per delivery {r['ratios']['ws_cost_per_delivery_to_tcp']}x "
             f"(pairs {r['ratios']['ws_cost_per_pair']}); checks {r['checks']} "
             f"({r['verdict']})"]
    for name, m in r["medians"].items():
        per_core = m["deliveries_per_core_s"] or 0
        vs = r["ratios"]["versus_peers"].get(name)
        lines.append(f"    {name:12} {(m['deliveries_per_s'] or 0) / 1e6:7.3f}M/s on {m['cores']} "
                     f"cores = {per_core / 1e6:7.3f}M per core-s, p99 {m['p99_ms']} ms, "
                     f"gaps {m['gaps']}"
                     + (f", {m['node_us_per_frame']} us per frame, {m['messages_per_frame']} "
                        f"msg/frame" if m.get("node_us_per_frame") else "")
                     + (f"; engine(ws)/peer per core {vs['engine_ws_per_core_to_peer']}x, "
                        f"p99 {vs['engine_ws_p99_to_peer']}x" if vs else ""))
    return "\n".join(lines)
