"""What each scenario's result is judged against (the issue's targets) and
the one-line summary printed after it."""

from __future__ import annotations

from bench.scenarios.load import latency_summary
from bench.scenarios.node_peers import summary_lines
from bench.scenarios.tls_reference import summary as tls_summary
from bench.scenarios.websocket import summary as websocket_summary

TARGETS = {
    "reference-room": "≥ 20M deliveries/s, 0 gaps, p99 ≤ 150 ms, ≥ 0.8 × C reference frames/s, node at level 0 and ready, loop lag p99 ≤ 5 ms",
    "quiet-rooms": "p99 ≤ 2 ms and ≤ the naive peer's p99 in the same run",
    "idle-connections": "≤ 2 KiB user-space memory per connection",
    "connect-storm": "≥ 10,000 authenticated connects/s",
    "wire-bytes": "≤ 15% of V1 JSON bytes per delivered message in the reference room",
}


def summarize(name: str, r: dict) -> str:
    if name == "wire-bytes":
        e = r["engine_end_to_end"]
        return (f"wire-bytes: engine {e['bytes_per_message']} B/msg end to end vs V1 JSON "
                f"{r['v1_end_to_end']['bytes_per_message']} B/msg -> ratio "
                f"{r['ratio_engine_to_v1']} ({r['verdict']}; target ≤ 0.15); gaps {e['gaps']}; "
                f"quiet room {r['quiet_room_end_to_end']['bytes_per_message']} B/msg; before: "
                f"{r['before']['reference_room']['ratio_to_v1']}, quiet "
                f"{r['before']['quiet_room']['bytes_per_message']} B/msg")
    if name == "reference-room":
        e = r["engine"]["load"]
        return (f"reference-room: {e['deliveries_per_s'] / 1e6:.2f}M deliveries/s, "
                f"gaps {e['gaps']}, latency {latency_summary(e)}, checks {r['checks']}, "
                f"ratios {r['ratios']} ({r['verdict']})"
                + "".join("\n" + line for line in (summary_lines(r["versus_node_peers"])
                                                     if "versus_node_peers" in r else [])))
    if name == "websocket":
        return websocket_summary(r)
    if name == "tls-reference":
        return tls_summary(r)
    if name == "node-peers":
        return "node-peers:\n" + "\n".join(summary_lines(r["versus_node_peers"]))
    if name == "writer-threads":
        return "writer-threads: " + "; ".join(
            f"{w['write_threads']} threads/{w['max_delay_ms']} ms: "
            f"{(w['deliveries_per_s'] or 0) / 1e6:.2f}M p50 {w['latency_ms'].get('p50')} "
            f"p99 {w['latency_ms'].get('p99')} level {w['level_at_window_end']} "
            f"mean lag {w['mean_loop_lag_ms']} ms" for w in r["rows"])
    if name == "scaling":
        rows = [f"{r['write_threads']}t/{r['viewers']}:{(r['deliveries_per_s'] or 0) / 1e6:.1f}M"
                f"/p99 {r['latency_ms'].get('p99')}" for rs in r["viewers"].values() for r in rs]
        offered = [f"{o['factor']}x: p99 {o['latency_ms'].get('p99')} level "
                   f"{o['level_at_window_end']} dropped {o['dropped_by_overload_control']}"
                   for o in r["offered"]]
        return f"scaling: {', '.join(rows)}; {'; '.join(offered)} ({r['verdict']})"
    if name == "quiet-rooms":
        goals = r.get("goals", {})
        return (f"quiet-rooms: latency {latency_summary(r['engine']['load'])} gaps "
                f"{r['engine']['load']['gaps']}; naive {latency_summary(r['naive'])}; "
                f"p99 <= 2 ms: {'met' if goals.get('p99_at_most_2_ms') else 'missed'}, "
                f"p99 <= naive p99: {'met' if goals.get('p99_at_most_naive_p99') else 'missed'}; "
                f"engine/naive p99 {r['ratios']['engine_p99_to_naive_p99']} ({r['verdict']})")
    if name.startswith("profile"):
        return "profile: top self " + ", ".join(f"{n} {v:.1%}" for n, v in r["top_self"][:6])
    if name == "sweep":
        return "sweep: " + ", ".join(f"{peer} " + " ".join(
            f"{row['viewers']}:{(row['deliveries_per_s'] or 0) / 1e6:.2f}M" for row in rows)
            for peer, rows in r["series"].items())
    if name == "idle-connections":
        return (f"idle-connections: {r['bytes_per_connection']} B/connection over "
                f"{r['connections']} ({r['verdict']})")
    if name == "connect-storm":
        return (f"connect-storm: {r['authenticated_per_s']} authenticated connects/s "
                f"({r['load'].get('connect', {}).get('joined')} of {r['connections']} joined after "
                f"{r['time_to_all_joined_s']} s; node CPU {r['node_cpu_us_per_connect']} µs "
                f"per connect; TCP connects {r['tcp_connects_per_s']}/s): goal "
                f"{r['target']}: {r['verdict']}")
    return r.get("summary", name)
