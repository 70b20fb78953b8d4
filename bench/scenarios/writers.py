"""writer-threads: the reference load (10,000 viewers, 2,000 msg/s) with
the node's writes on the event loop (``--write-threads 0``, the engine
before issue 10) and on 1 or 2 writer threads, at two flush windows: what
chose the defaults (docs/architecture.md, "Writer threads")."""

from __future__ import annotations

from bench.scenarios.harness import Node
from bench.scenarios.load import load_args_reference, load_deliveries, run_load
from bench.scenarios.reference_room import REFERENCE_SETTINGS

GRID = [(0, 100), (0, 50), (1, 100), (1, 50), (2, 50)]


def writer_threads(quick: bool) -> dict:
    viewers = 300 if quick else 10000
    duration = 4.0 if quick else 20.0
    rows = []
    for threads, max_delay in GRID:
        node = Node(**dict(REFERENCE_SETTINGS, write_threads=threads, max_delay_ms=max_delay))
        try:
            load, cmd, _ = run_load(node.host, node.port, load_args_reference(viewers, duration),
                                    duration + 300, admin_port=node.admin_port,
                                    node_pid=node.proc.pid)
            m = node.metrics()
        finally:
            node.stop()
        lat = dict(load.get("latency_ms") or {})
        lat.pop("histogram", None)
        count = m.get("fanout_event_loop_lag_seconds_count") or 0
        state = load.get("node_at_window_end") or {}
        rows.append({
            "write_threads": threads, "max_delay_ms": max_delay,
            "deliveries_per_s": load_deliveries(load), "latency_ms": lat,
            "gaps": load.get("gaps"), "messages_per_batch": load.get("messages_per_batch"),
            "node_cores": (load.get("cpu") or {}).get("node_window_cores"),
            "level_at_window_end": state.get("degradation_level"),
            "ready_at_window_end": state.get("ready"),
            "mean_loop_lag_ms": round(1000 * m.get("fanout_event_loop_lag_seconds_sum", 0)
                                      / count, 2) if count else None,
            "node_loop_lag": load.get("node_loop_lag"),
            "load_command": cmd, "node_command": node.command})
    return {"viewers": viewers, "duration_s": duration, "rate_in": 2000, "rows": rows}
