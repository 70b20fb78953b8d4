"""What a team would pick instead of the engine, in the same run: the Node
peers (uWebSockets.js pub/sub, the ws package's broadcast loop) at the
reference load and flat out, against the engine at both.

Three peers (bench/scenarios/peers.NODE_PEERS): ``uws`` and ``node_ws`` give
the loop back after every message to a large room, as the Python websockets
peer does, so each delivery is a send of its own; ``uws_batched`` publishes
up to 200 due messages per loop turn, and uWS sends each subscriber what it
got in that turn at once: uWS's own batching, as the engine batches.

All of them are read over WebSocket: the engine on its WebSocket port
(``fanout load --transport ws``: one wire frame per message, checked as over
TCP), the peers by ``c_reader --mode ws``. Deliveries per core-second is the
fair measure of cost: the engine sends a Batch frame of about 200 messages
(one WebSocket message) where a peer sends one WebSocket message per
message, which is how each is used. (Until issue 11 the engine was read over
its TCP protocol here; bench/scenarios/websocket.py measures the two
transports against each other.)

``reference-room`` runs the same comparison (``versus_node_peers`` in its
result); ``node-peers`` is that part alone, with the engine runs it needs.
"""

from __future__ import annotations

from bench.scenarios.harness import Node
from bench.scenarios.load import REF_ROOM, load_args_reference, run_load_on, slim
from bench.scenarios.peers import NODE_PEERS, node_peers_ready, run_node_peer

TRANSPORT_NOTE = ("all over WebSocket: the engine on its WebSocket port (fanout load "
                  "--transport ws), the peers read by c_reader --mode ws")


def require_node_peers() -> None:
    """Fail before the long runs, not after them."""
    why = node_peers_ready()
    if why:
        raise RuntimeError(f"the Node peers cannot run: {why}")


def run_node_peers(viewers: int, duration: float, room: str) -> dict:
    """Each Node peer at 2,000 msg/s (``uws``, ...) and flat out
    (``uws_flat_out``, ...), one room of ``viewers``."""
    out = {}
    for kind in NODE_PEERS:
        out[kind] = run_node_peer(kind, viewers, 2000, duration, rooms=1, room=room)
        out[kind + "_flat_out"] = run_node_peer(kind, viewers, 0, duration, rooms=1, room=room)
    return out


def run_engine_ws(viewers: int, duration: float, rate: float, settings: dict
                  ) -> tuple[dict, dict]:
    """The engine with ``settings``, its viewers over WebSocket, as the
    peers are read: (the load result, what the scenario records of it)."""
    node = Node(**settings)
    try:
        load, cmd = run_load_on(node, load_args_reference(viewers, duration, rate=rate),
                                duration + 400, transport="ws")
    finally:
        node.stop()
    return load, {"load": slim(load), "load_command": cmd, "node_command": node.command,
                  "transport": "ws"}


def engine_row(load: dict) -> dict:
    cores = (load.get("cpu") or {}).get("node_window_cores")
    d = load.get("deliveries_per_s") or 0.0
    return {"deliveries_per_s": d, "cores": cores,
            "deliveries_per_core_s": round(d / cores) if cores else None,
            "p99_ms": (load.get("latency_ms") or {}).get("p99"), "gaps": load.get("gaps")}


def peer_row(r: dict) -> dict:
    return {"deliveries_per_s": r["deliveries_per_s"], "cores": r["server_cpu_share"],
            "deliveries_per_core_s": r["deliveries_per_core_s"],
            "p99_ms": r["latency_ms"]["p99"], "gaps": r["gaps"],
            "dropped": r["server"].get("dropped")}


def versus_node_peers(engine_ref: dict, engine_flat: dict | None, peers: dict) -> dict:
    """The engine's deliveries/s per node core and p99 against each Node
    peer's, at the reference load and flat out; ratios are engine / peer."""
    table: dict = {"note": TRANSPORT_NOTE}
    for load_name, engine_load, suffix in (("reference_load", engine_ref, ""),
                                           ("flat_out", engine_flat, "_flat_out")):
        if not engine_load:
            continue
        e = engine_row(engine_load)
        rows = {"engine": e}
        for kind in NODE_PEERS:
            if kind + suffix not in peers:
                continue
            p = peer_row(peers[kind + suffix])
            p["engine_per_core_to_peer"] = (
                round(e["deliveries_per_core_s"] / p["deliveries_per_core_s"], 1)
                if e["deliveries_per_core_s"] and p["deliveries_per_core_s"] else None)
            p["engine_p99_to_peer"] = (round(e["p99_ms"] / p["p99_ms"], 2)
                                       if e["p99_ms"] and p["p99_ms"] else None)
            rows[kind] = p
        table[load_name] = rows
    return table


def summary_lines(table: dict) -> list[str]:
    lines = [f"  vs Node peers ({table['note']}):"]
    for load_name in ("reference_load", "flat_out"):
        for name, r in (table.get(load_name) or {}).items():
            per_core = r["deliveries_per_core_s"]
            lines.append(
                f"    {load_name:14} {name:11} {r['deliveries_per_s'] / 1e6:7.3f}M/s on "
                f"{r['cores']} cores = {(per_core or 0) / 1e6:7.3f}M per core-s, "
                f"p99 {r['p99_ms']} ms, gaps {r['gaps']}"
                + (f"; engine/peer per core {r['engine_per_core_to_peer']}x, "
                   f"p99 {r['engine_p99_to_peer']}x" if name != "engine" else ""))
    return lines


def node_peers(quick: bool) -> dict:
    """The engine at the reference load and flat out, then each Node peer at
    both, on the same room size."""
    require_node_peers()
    from bench.scenarios.reference_room import REFERENCE_SETTINGS
    viewers = 300 if quick else 10000
    duration = 4.0 if quick else 20.0
    out: dict = {"viewers": viewers, "rate_in": 2000, "duration_s": duration,
                 "note": TRANSPORT_NOTE,
                 "node_settings": REFERENCE_SETTINGS}
    runs = {}
    # The engine as reference-room runs it: at 2,000 msg/s, then flat out
    # (flushing whenever its loop is free, fed 4,000 msg/s).
    for name, settings, rate in (("engine", REFERENCE_SETTINGS, 2000),
                                 ("engine_flat_out", dict(REFERENCE_SETTINGS, max_delay_ms=0),
                                  4000)):
        load, entry = run_engine_ws(viewers, duration, rate, settings)
        runs[name] = load
        out[name] = entry
    peers = run_node_peers(viewers, duration, REF_ROOM)
    out.update(peers)
    out["versus_node_peers"] = versus_node_peers(runs["engine"], runs["engine_flat_out"], peers)
    return out
