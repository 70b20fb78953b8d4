"""What each scenario's result is judged against (the issue's targets) and
the one-line summary printed after it."""

from __future__ import annotations

from bench.scenarios.load import latency_summary

TARGETS = {
    "reference-room": "≥ 20M deliveries/s, 0 gaps, p99 ≤ 150 ms, ≥ 0.8 × C reference frames/s",
    "quiet-rooms": "p99 ≤ 2 ms and ≤ the naive peer's p99 in the same run",
    "idle-connections": "≤ 2 KiB user-space memory per connection",
    "connect-storm": "≥ 10,000 authenticated connects/s",
    "wire-bytes": "≤ 20% of V1 JSON bytes per delivered message",
}


def summarize(name: str, r: dict) -> str:
    if name == "wire-bytes":
        e = r["engine_end_to_end"]
        return (f"wire-bytes: engine {e['bytes_per_message']} B/msg end to end vs V1 JSON "
                f"{r['v1_end_to_end']['bytes_per_message']} B/msg -> ratio "
                f"{r['ratio_engine_to_v1']} ({r['verdict']}; target ≤ 0.20); gaps {e['gaps']}")
    if name == "reference-room":
        e = r["engine"]["load"]
        return (f"reference-room: {e['deliveries_per_s'] / 1e6:.2f}M deliveries/s, "
                f"gaps {e['gaps']}, latency {latency_summary(e)}, checks {r['checks']}, "
                f"ratios {r['ratios']} ({r['verdict']})")
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
        return (f"connect-storm: {r['connects_per_s']} connects/s, all joined "
                f"after {r['time_to_all_joined_s']} s ({r['verdict']})")
    return r.get("summary", name)
