#!/usr/bin/env python3
"""The capacity model of docs/cluster.md: what one room of a million viewers
needs (node processes, NATS traffic, router load), computed from the costs
the cluster benchmarks measured on this machine.

    python scripts/capacity_model.py [--results bench/results/cluster]
                                     [--viewers 1000000] [--rate 2000] ...

It reads four results of ``python -m bench.scenarios`` from --results:
router-throughput, workers-reference, cluster-quiet and reconnect-storm
(``NAME.json``, else ``NAME.quick.json``), and prints two markdown tables:
the measured inputs (each with the figure it comes from) and the
projection (each with its formula). Nothing here is measured by the
script itself; every projected figure is arithmetic on the inputs.

The cost model of a node process (one core; ``--workers N`` runs N of them
on a host):

    cores = R * c_m + v * R * c_d

R is the room's message rate, v the viewers the process holds, c_d the
core-seconds per delivery of the fan-out itself (from the single embedded
process of workers-reference, over its measuring window) and c_m the
core-seconds per message a cluster node spends receiving it from NATS
(what the two workers of workers-reference used beyond the fan-out of
their deliveries). The per-message term does not shrink with fewer viewers
per node, which is why the simple "deliveries per node core" figure
(measured at the benchmark's viewers per process) is shown but not used to
project.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

NAMES = ("router-throughput", "workers-reference", "cluster-quiet", "reconnect-storm")


class ModelError(Exception):
    pass


def load_results(directory: Path) -> dict[str, tuple[dict, Path]]:
    found = {}
    for name in NAMES:
        for candidate in (directory / f"{name}.json", directory / f"{name}.quick.json"):
            if candidate.exists():
                found[name] = (json.loads(candidate.read_text()), candidate)
                break
        else:
            raise ModelError(f"no {name}.json (or {name}.quick.json) in {directory}")
    return found


def record_bytes(room: str, payload_bytes: int, sender: str = "user-123456") -> int | None:
    """Size of one room message as the router encodes it (a fanout.v1
    Batch.messages record), for the reference room's message; None when the
    compiled core is not importable."""
    try:
        from fanout import _core
        from fanout.protocol import fanout_pb2 as pb
    except ImportError:
        return None
    return len(_core.encode_room_message(room, 1_000_000, pb.GIFT, 0, sender,
                                         b"x" * payload_bytes, int(time.time() * 1000)))


def _get(doc: dict, *path, default=None):
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return default
        doc = doc[key]
    return doc


def inputs(results: dict[str, tuple[dict, Path]]) -> tuple[dict, list[tuple]]:
    """The measured figures the model uses, and rows describing them."""
    rt, rt_path = results["router-throughput"]
    wr, wr_path = results["workers-reference"]
    cq, cq_path = results["cluster-quiet"]
    rs, rs_path = results["reconnect-storm"]
    rows: list[tuple] = []
    x: dict = {}

    def cmd(doc: dict) -> str:
        return doc.get("command", "python -m bench.scenarios ?")

    def quick(doc: dict) -> str:
        return " (quick run)" if doc.get("quick") else ""

    # Router.
    x["router_per_core"] = rt["messages_per_router_core_s"]
    rows.append(("router: stored messages/s per router core", f"{x['router_per_core']:,}",
                 f"router-throughput{quick(rt)}: stored/s ÷ router CPU share", cmd(rt)))
    x["router_p99_ms"] = _get(rt, "driver", "latency_ms", "p99")
    rows.append(("router: call p99 at that load", f"{x['router_p99_ms']} ms",
                 f"router-throughput{quick(rt)}: {rt['inflight']} calls in flight", cmd(rt)))
    nb = rt["nats_bytes_per_message"]
    x["router_nats_in"], x["router_nats_out"] = nb["in"], nb["out"]
    rows.append(("NATS bytes per message, publish path (call, append, ack, answer)",
                 f"in {nb['in']} B, out {nb['out']} B",
                 f"router-throughput{quick(rt)}: NATS server in/out bytes ÷ stored "
                 "(no node subscribed)", cmd(rt)))

    # Fan-out cost per delivery: the single embedded process, window only.
    single = wr["single"]
    x["rate"] = float(wr.get("rate_in", 2000))
    x["viewers_measured"] = wr["viewers"]
    single_cores = _get(single, "load", "cpu", "node_window_cores")
    if not single_cores:
        raise ModelError(f"{wr_path}: single.load.cpu.node_window_cores missing")
    x["c_d"] = single_cores / single["deliveries_per_s"]
    rows.append(("fan-out: deliveries/s per core (one embedded process)",
                 f"{1 / x['c_d']:,.0f}",
                 f"workers-reference{quick(wr)}: {single['deliveries_per_s']:,.0f} "
                 f"deliveries/s at {single_cores:.3f} cores (measuring window), "
                 f"{wr['viewers']:,} viewers, {x['rate']:,.0f} msg/s", cmd(wr)))

    # The cluster node: two workers over NATS.
    two = wr["workers_2"]
    workers = sorted(k for k in two["cpu_s"] if k.startswith("worker-"))
    x["workers"] = len(workers)
    worker_cpu = sum(two["cpu_s"][k] for k in workers)
    span = two.get("span_s")
    span_note = "span_s"
    if not span:
        load = two.get("load", {})
        span = (_get(load, "connect", "time_to_all_joined_s", default=0) + load["warmup_s"]
                + load["duration_s"] + _get(load, "drain", "seconds", default=0))
        span_note = "span estimated as joined + warm-up + window + drain (file has no span_s)"
    x["worker_cores"] = worker_cpu / span
    x["d_core_cluster"] = two["deliveries_per_s"] / x["worker_cores"]
    rows.append(("cluster node: deliveries/s per node core (--workers 2, at the measured "
                 "viewers)", f"{x['d_core_cluster']:,.0f}",
                 f"workers-reference{quick(wr)}: {two['deliveries_per_s']:,.0f} deliveries/s "
                 f"at {worker_cpu:.2f} worker CPU-s over {span:.1f} s ({span_note})", cmd(wr)))
    c_m = (x["worker_cores"] - x["c_d"] * two["deliveries_per_s"]) / (x["workers"] * x["rate"])
    x["c_m_clamped"] = c_m < 0
    x["c_m"] = max(c_m, 0.0)
    rows.append(("cluster node: CPU per message received from NATS, per node process",
                 f"{x['c_m'] * 1e6:.1f} µs" + (" (clamped from a negative value)"
                                               if x["c_m_clamped"] else ""),
                 "(worker cores − fan-out cost of their deliveries) ÷ (workers × msg/s)", cmd(wr)))

    # NATS bytes per message per node holding the room.
    messages = _get(two, "load", "published", "accepted")
    out_bytes = two["nats_bytes"]["out"]
    if messages:
        per_copy = (out_bytes / messages - x["router_nats_out"]) / x["workers"]
        x["nats_per_copy"] = per_copy
        rows.append(("NATS bytes per message per node holding the room (the republished copy)",
                     f"{per_copy:.0f} B",
                     f"workers-reference{quick(wr)}: (NATS out bytes ÷ {messages:,} messages "
                     f"− publish path out) ÷ {x['workers']} nodes", cmd(wr)))
    else:
        raise ModelError(f"{wr_path}: workers_2.load.published.accepted missing")
    x["record"] = record_bytes("live:ref-0", 50)
    if x["record"]:
        rows.append(("record bytes (one message as the router encodes it)", f"{x['record']} B",
                     "fanout._core.encode_room_message of the reference message "
                     "(50-byte payload)", "computed"))
    x["wire_per_msg"] = _get(two, "load", "wire_bytes_per_msg") or \
        _get(single, "load", "wire_bytes_per_msg")
    rows.append(("client wire bytes per message per viewer (batched, lz4)",
                 f"{x['wire_per_msg']} B", f"workers-reference{quick(wr)}: load tool", cmd(wr)))

    # Latency added by the cluster, and the reconnect storm.
    rows.append(("p99 added by the NATS hop and the router (quiet rooms)",
                 f"{cq['p99_added_ms']} ms",
                 f"cluster-quiet{quick(cq)}: single {cq['median_p99_ms']['single']} ms, "
                 f"cluster {cq['median_p99_ms']['cluster']} ms", cmd(cq)))
    t99 = rs["time_to_resumed_s"]["99%"]
    x["storm_rate"] = 0.99 * rs["clients"] / t99 if t99 else None
    rows.append(("reconnect storm: resumes/s onto one surviving node",
                 f"{x['storm_rate']:,.0f}" if x["storm_rate"] else "n/a",
                 f"reconnect-storm{quick(rs)}: 99% of {rs['clients']:,} clients in {t99} s "
                 "(one router, one node absorbing)", cmd(rs)))
    x["quick"] = any(doc.get("quick") for doc, _ in results.values())
    return x, rows


def project(x: dict, *, viewers: int, rate: float, utilisation: float, max_conns: int,
            cores_per_host: int, presence_interval_s: float, replicas: int) -> list[tuple]:
    """The projection rows: (figure, value, formula)."""
    rows = []
    per_viewer = rate * x["c_d"]                      # cores per viewer
    fixed = rate * x["c_m"]                            # cores per node process
    if fixed >= utilisation:
        raise ModelError(f"at {rate:g} msg/s receiving alone needs {fixed:.2f} cores per "
                         f"process, over the {utilisation:g} allowed")
    by_cpu = (utilisation - fixed) / per_viewer
    per_node = int(min(by_cpu, max_conns))
    bound = "CPU" if by_cpu <= max_conns else f"the connection cap ({max_conns:,})"
    procs = math.ceil(viewers / per_node)
    hosts = math.ceil(procs / cores_per_host)
    simple = math.ceil(viewers * rate / x["d_core_cluster"])
    mb = 1e6

    def add(figure, value, formula):
        rows.append((figure, value, formula))

    add("deliveries/s in the room", f"{viewers * rate:,.0f}", "D = V × R")
    add("CPU per node process for NATS receive", f"{fixed:.3f} cores", "R × c_m")
    add("CPU per viewer", f"{per_viewer:.2e} cores", "R × c_d")
    add("viewers per node process", f"{per_node:,} (bound: {bound})",
        f"min((u − R·c_m) ÷ (R·c_d), cap), u = {utilisation:g}")
    add("node processes (cores)", f"{procs:,}", "P = ceil(V ÷ viewers per process)")
    add(f"hosts of {cores_per_host} cores (`--workers {cores_per_host}`)", f"{hosts:,}",
        "ceil(P ÷ cores per host)")
    add("node processes by the simple formula", f"{simple:,}",
        "ceil(V × R ÷ measured deliveries/s per node core); at the benchmark's viewers "
        "per process, so the per-message cost is over-counted")
    add("client egress per node process", f"{per_node * rate * x['wire_per_msg'] * 8 / 1e9:.2f} "
        "Gbit/s", "viewers per process × R × wire bytes per message")
    add(f"client egress per host ({cores_per_host} processes)",
        f"{cores_per_host * per_node * rate * x['wire_per_msg'] * 8 / 1e9:.1f} Gbit/s",
        "processes per host × client egress per process")
    add("client egress in all", f"{viewers * rate * x['wire_per_msg'] * 8 / 1e9:,.0f} Gbit/s",
        "V × R × wire bytes per message")
    add("NATS → each node process", f"{rate * x['nats_per_copy'] / mb:.2f} MB/s, {rate:,.0f} msg/s",
        "R × NATS bytes per copy (one copy per process holding the room)")
    add(f"NATS → each host ({cores_per_host} processes)",
        f"{cores_per_host * rate * x['nats_per_copy'] * 8 / 1e9:.2f} Gbit/s",
        "processes per host × R × bytes per copy")
    add("NATS egress for the room in all", f"{procs * rate * x['nats_per_copy'] / mb:,.0f} MB/s, "
        f"{procs * rate:,.0f} msg/s", "P × R × bytes per copy")
    add("presence counts through NATS", f"{procs * procs / presence_interval_s:,.0f} msg/s",
        f"P² ÷ presence interval ({presence_interval_s:g} s): every process sends its count "
        "to every process holding the room")
    add("router load of the room", f"{rate / x['router_per_core']:.2f} of one core",
        "R ÷ router msgs/s per core (one room = one partition = one router)")
    add("highest inbound rate of one room", f"{x['router_per_core']:,} msg/s",
        "router msgs/s per core: a room's calls are one partition's, served in order by "
        "one router (measured over 100 rooms; one room alone is not measured)")
    add("router calls when the room fills", f"{viewers:,} logins, {procs:,} joins",
        "one login per connection (on the user's partition, spread over 16), one join per "
        "node process opening the room; the cost of a login (two KV operations) is not "
        "measured here")
    add(f"JetStream writes (history + event log, R{replicas})",
        f"{2 * replicas * rate * x['nats_per_copy'] / mb:.2f} MB/s",
        "2 streams × replicas × R × bytes per copy (a stored message is the record "
        "plus its headers, about the size of the republished copy)")
    if x.get("storm_rate"):
        add("a node process dies: its viewers resumed elsewhere",
            f"{per_node / x['storm_rate']:.1f} s",
            "viewers per process ÷ measured resumes/s (one absorbing node, one router: the "
            "load balancer spreads them wider)")
    return rows


def table(header: tuple, rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=Path("bench/results/cluster"),
                   help="directory with the four results (default bench/results/cluster)")
    p.add_argument("--viewers", type=int, default=1_000_000, help="viewers in the room")
    p.add_argument("--rate", type=float, default=0.0,
                   help="messages/s in the room (default: the benchmark's, 2,000)")
    p.add_argument("--utilisation", type=float, default=0.7,
                   help="CPU share of a node process to plan for (default 0.7)")
    p.add_argument("--max-connections", type=int, default=19_000,
                   help="connections one node process holds (default 19,000, the node's)")
    p.add_argument("--cores-per-host", type=int, default=16)
    p.add_argument("--presence-interval-s", type=float, default=10.0)
    p.add_argument("--replicas", type=int, default=3, help="stream replicas (default 3)")
    args = p.parse_args(argv)
    try:
        results = load_results(args.results)
        x, measured = inputs(results)
        rate = args.rate or x["rate"]
        projected = project(x, viewers=args.viewers, rate=rate, utilisation=args.utilisation,
                            max_conns=args.max_connections, cores_per_host=args.cores_per_host,
                            presence_interval_s=args.presence_interval_s,
                            replicas=args.replicas)
    except ModelError as exc:
        print(f"capacity_model: {exc}", file=sys.stderr)
        return 1
    files = ", ".join(str(path) for _, path in results.values())
    print(f"Measured on this machine ({files}"
          f"{'; QUICK runs: small samples' if x['quick'] else ''}):\n")
    print(table(("input", "value", "from", "command"), measured))
    print(f"\nProjected for {args.viewers:,} viewers in one room at {rate:,.0f} msg/s "
          "(arithmetic on the inputs above, not measured):\n")
    print(table(("figure", "value", "formula"), projected))
    return 0


if __name__ == "__main__":
    sys.exit(main())
