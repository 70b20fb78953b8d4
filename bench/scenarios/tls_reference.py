"""tls-reference: the reference room (one room of 10,000 viewers, 2,000 msg/s
of 50 B, reference-room's node settings) with the viewers on each of the
node's four ports, alternating per round (tcp tls ws wss, then wss ws tls
tcp, ...), each run on a fresh node: deliveries/s per node core, node CPU
per Batch frame written, p99, for TLS against plaintext (goal >= 0.5x per
core) over TCP and over WebSocket. Then each port once flat out (the node
flushing whenever its loop is free, ``max_delay_ms`` 0, fed 4,000 msg/s, as
reference-room runs it): deliveries/s when the node, not the offered load,
is the limit.

The viewers are ``fanout load --transport tls|wss`` (an OpenSSL session per
viewer, the node's certificate from ``fanout cert``, not checked: loopback);
the node's TLS runs in the mode it gets here (``tls_mode auto``: kernel TLS
where the kernel has the tls module, else the core's OpenSSL); the result
records which (``tls_mode``, from fanout.server.tlsconf).
"""

from __future__ import annotations

import subprocess

from bench.scenarios.harness import BUILD, FANOUT
from bench.scenarios.websocket import median_row, run_engine

TRANSPORTS = ("tcp", "tls", "ws", "wss")


def dev_certs() -> dict:
    """A development CA and certificate for the node (``fanout cert``), once."""
    d = BUILD / "bench-certs"
    if not (d / "cert.pem").exists():
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run([FANOUT, "cert", "--dir", str(d)], check=True, capture_output=True,
                       timeout=120)
    return {"tls_port": 0, "wss_port": 0, "tls_cert": str(d / "cert.pem"),
            "tls_key": str(d / "key.pem")}


def tls_reference(quick: bool) -> dict:
    viewers = 300 if quick else 10000
    duration = 4.0 if quick else 20.0
    rounds = 1 if quick else 2
    from fanout.server.tlsconf import kernel_tls_available
    tls = dev_certs()
    ktls, why = kernel_tls_available()
    out: dict = {"viewers": viewers, "rate_in": 2000, "duration_s": duration,
                 "rounds": rounds, "order": [],
                 "tls_mode": {"kernel": ktls, "why": why,
                              "mode": "kernel TLS" if ktls else "core (OpenSSL in the core)"}}
    runs: dict[str, list[dict]] = {t: [] for t in TRANSPORTS}
    for i in range(rounds):
        for transport in (TRANSPORTS if i % 2 == 0 else TRANSPORTS[::-1]):
            runs[transport].append(run_engine(transport, viewers, duration, **tls))
            out["order"].append(transport)
    out["runs"] = runs
    medians = {t: median_row([r["row"] for r in runs[t]]) for t in TRANSPORTS}
    out["medians"] = medians
    flat = {}
    for transport in TRANSPORTS:
        flat[transport] = run_engine(transport, viewers, duration, rate=4000, max_delay_ms=0,
                                     **tls)
        out["order"].append(transport + "_flat_out")
    out["flat_out"] = flat

    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = medians[a][key], medians[b][key]
        return round(x / y, 3) if x and y else None

    out["ratios"] = {
        "tls_per_core_to_tcp": ratio("tls", "tcp", "deliveries_per_core_s"),
        "wss_per_core_to_ws": ratio("wss", "ws", "deliveries_per_core_s"),
        "tls_cpu_per_frame_to_tcp": ratio("tls", "tcp", "node_us_per_frame"),
        "wss_cpu_per_frame_to_ws": ratio("wss", "ws", "node_us_per_frame"),
    }

    def flat_ratio(a: str, b: str, key: str) -> float | None:
        x, y = flat[a]["row"][key], flat[b]["row"][key]
        return round(x / y, 3) if x and y else None

    out["ratios"].update({
        "flat_out_tls_deliveries_to_tcp": flat_ratio("tls", "tcp", "deliveries_per_s"),
        "flat_out_wss_deliveries_to_ws": flat_ratio("wss", "ws", "deliveries_per_s"),
        "flat_out_tls_per_core_to_tcp": flat_ratio("tls", "tcp", "deliveries_per_core_s"),
        "flat_out_wss_per_core_to_ws": flat_ratio("wss", "ws", "deliveries_per_core_s"),
    })
    checks = {
        "every delivery, no gap, on every port": all(
            r["load"].get("gaps") == 0 and r["load"].get("divergences") == 0
            and r["load"].get("deliveries") == r["load"].get("expected_deliveries")
            for rs in runs.values() for r in rs),
        # flat out a port may fall behind for good (that is its capacity):
        # what it delivered must still be exact
        "flat out: no gap, no divergence": all(
            r["load"].get("gaps") == 0 and r["load"].get("divergences") == 0
            for r in flat.values()),
        "tls >= 0.5x tcp per core": (out["ratios"]["tls_per_core_to_tcp"] or 0) >= 0.5,
        "wss >= 0.5x ws per core": (out["ratios"]["wss_per_core_to_ws"] or 0) >= 0.5,
    }
    out["checks"] = checks
    out["verdict"] = "met" if all(checks.values()) else "missed"
    return out


def summary(r: dict) -> str:
    lines = [f"tls-reference: {r['viewers']} viewers, 2,000 msg/s, {r['rounds']} rounds "
             f"(medians); ratios {r['ratios']}; checks {r['checks']} ({r['verdict']})"]
    for name, m in r["medians"].items():
        lines.append(f"    {name:4} {(m['deliveries_per_s'] or 0) / 1e6:7.3f}M/s on {m['cores']} "
                     f"cores = {(m['deliveries_per_core_s'] or 0) / 1e6:7.3f}M per core-s, "
                     f"p99 {m['p99_ms']} ms, {m['node_us_per_frame']} us per frame, "
                     f"{m['messages_per_frame']} msg/frame, gaps {m['gaps']}")
    for name, f in r.get("flat_out", {}).items():
        m = f["row"]
        lines.append(f"    {name:4} flat out {(m['deliveries_per_s'] or 0) / 1e6:7.3f}M/s on "
                     f"{m['cores']} cores = {(m['deliveries_per_core_s'] or 0) / 1e6:7.3f}M per "
                     f"core-s, p99 {m['p99_ms']} ms, {m['node_us_per_frame']} us per frame, "
                     f"{m['messages_per_frame']} msg/frame, gaps {m['gaps']}")
    return "\n".join(lines)
