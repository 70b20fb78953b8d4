"""writer-threads: the reference load (10,000 viewers, 2,000 msg/s) with
the node's writes on the event loop (``--write-threads 0``, the engine
before issue 10) and on 1 or 2 writer threads, at two flush windows: what
chose the defaults (docs/architecture.md, "Writer threads")."""

from __future__ import annotations

from bench.scenarios.reference_room import REFERENCE_SETTINGS
from bench.scenarios.scaling import run_node_load

GRID = [(0, 100), (0, 50), (1, 100), (1, 50), (2, 50)]


def writer_threads(quick: bool) -> dict:
    viewers = 300 if quick else 10000
    duration = 4.0 if quick else 20.0
    rows = [run_node_load(viewers, 2000, duration, threads,
                          dict(REFERENCE_SETTINGS, max_delay_ms=max_delay))
            for threads, max_delay in GRID]
    return {"viewers": viewers, "duration_s": duration, "rate_in": 2000, "rows": rows}
