"""The command line: ``python -m bench.scenarios SCENARIO [--quick] [--out DIR]``
runs the scenarios and writes each result to DIR/SCENARIO.json."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import bench.scenarios
from bench.scenarios.adversarial import adversarial
from bench.scenarios.cluster import (cluster_quiet, reconnect_storm, reconnect_storm_channels,
                                     router_throughput, workers_reference)
from bench.scenarios.connections import connect_storm, idle_connections, user_channels
from bench.scenarios.harness import ROOT, machine
from bench.scenarios.node_peers import node_peers
from bench.scenarios.profiles import profile, profile_quiet, profile_storm, stalls_quiet
from bench.scenarios.quiet_rooms import quiet_rooms
from bench.scenarios.reference_room import reference_room
from bench.scenarios.report import summarize
from bench.scenarios.scaling import scaling
from bench.scenarios.soak import soak
from bench.scenarios.sweep import sweep
from bench.scenarios.tls_reference import tls_reference
from bench.scenarios.websocket import websocket
from bench.scenarios.wire_bytes import wire_bytes
from bench.scenarios.writers import writer_threads

RESULTS = ROOT / "bench" / "results"

SCENARIOS = {
    "reference-room": reference_room,
    "quiet-rooms": quiet_rooms,
    "idle-connections": idle_connections,
    "connect-storm": connect_storm,
    "user-channels": user_channels,
    "wire-bytes": wire_bytes,
    "sweep": sweep,
    "profile": profile,
    "profile-storm": profile_storm,
    "profile-quiet": profile_quiet,
    "stalls-quiet": stalls_quiet,
    "adversarial": adversarial,
    "soak": soak,
    "cluster-quiet": cluster_quiet,
    "router-throughput": router_throughput,
    "workers-reference": workers_reference,
    "reconnect-storm": reconnect_storm,
    "reconnect-storm-channels": reconnect_storm_channels,
    "scaling": scaling,
    "writer-threads": writer_threads,
    "node-peers": node_peers,
    "websocket": websocket,
    "tls-reference": tls_reference,
}
# Not part of "all": the hardening scenarios, run on their own (bench/README.md).
SEPARATE = {"adversarial", "soak", "stalls-quiet", "cluster-quiet", "router-throughput",
            "workers-reference", "reconnect-storm", "scaling", "node-peers", "writer-threads",
            "websocket", "tls-reference", "user-channels", "reconnect-storm-channels"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scenarios",
                                description=bench.scenarios.__doc__.split("\n")[0])
    p.add_argument("scenario", choices=[*SCENARIOS, "all"])
    p.add_argument("--quick", action="store_true", help="scaled-down smoke variant")
    p.add_argument("--out", default=str(RESULTS), help="directory for SCENARIO.json")
    p.add_argument("--minutes", type=float, default=None,
                   help="soak: length of the steady part (default 30; --quick: 0.3)")
    args = p.parse_args(argv)
    names = [n for n in SCENARIOS if n not in SEPARATE] if args.scenario == "all" \
        else [args.scenario]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        started = time.time()
        info = machine()
        result = (soak(args.quick, args.minutes) if name == "soak"
                  else SCENARIOS[name](args.quick))
        result = {"scenario": name, "quick": args.quick, "machine": info,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                  "wall_seconds": round(time.time() - started, 1),
                  "command": "python -m bench.scenarios " + name + (" --quick" if args.quick else ""),
                  **result}
        path = out_dir / (name + (".quick" if args.quick else "") + ".json")
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(summarize(name, result))
        print(f"  -> {path}")
    return 0
