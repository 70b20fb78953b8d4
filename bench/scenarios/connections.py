"""idle-connections and connect-storm: what the node pays per connection it
holds (user-space memory) and per connection it accepts (connects/s)."""

from __future__ import annotations

import threading
import time

from bench.scenarios.harness import Node, delta
from bench.scenarios.load import (STORM_ADMISSION, STORM_WINDOW, load_args_idle, load_args_storm,
                                  run_load, slim)
from bench.scenarios.report import TARGETS


def idle_connections(quick: bool, **extra) -> dict:
    n = 500 if quick else 19000
    hold = 5.0 if quick else 30.0
    settings = dict(max_connections=19500, conn_rate_per_ip=100000, conn_burst_per_ip=100000,
                    ping_interval_ms=5000, idle_timeout_ms=15000, **extra)
    node = Node(**settings)
    box: dict = {}
    try:
        time.sleep(1.0)
        node.metrics()        # the scrape path's own memory belongs in the baseline
        time.sleep(0.5)
        rss0 = node.proc.rss_kib()
        worker = threading.Thread(target=lambda: box.update(zip(
            ("load", "cmd", "proc"), run_load(node.host, node.port, load_args_idle(n, hold),
                                              hold + 300, node_pid=node.proc.pid))))
        worker.start()
        samples = []          # (connections, node RSS KiB), while the load runs
        while worker.is_alive():
            worker.join(1.0)
            try:
                conns = node.metrics().get("fanout_connections", 0)
            except OSError:
                continue
            samples.append((int(conns), node.proc.rss_kib()))
        if "load" not in box:
            raise RuntimeError("fanout load failed; see above")
    finally:
        node.stop()
    full = sorted(rss for conns, rss in samples if conns >= n)
    # The median of the samples taken while all n were connected (the RSS is
    # steady then; min and max are recorded too).
    rss1 = full[len(full) // 2] if full else max(r for _, r in samples)
    per_conn = (rss1 - rss0) * 1024 / n
    load = box["load"]
    return {
        "connections": n, "hold_s": hold, "node_settings": settings,
        "node_rss_kib_before": rss0, "node_rss_kib_with_connections": rss1,
        "samples_at_full": len(full),
        "rss_kib_at_full_min_max": [full[0], full[-1]] if full else None,
        "bytes_per_connection": round(per_conn, 1),
        "kernel_note": "RSS is the node's user-space memory; socket buffers are kernel memory",
        "load": slim(load), "load_command": box["cmd"],
        "node_command": node.command, "target": TARGETS["idle-connections"],
        "verdict": "met" if per_conn <= 2048 and full else "missed",
    }


def connect_storm(quick: bool, **extra) -> dict:
    n = 500 if quick else 19000
    settings = dict(max_connections=19500, conn_rate_per_ip=1000000,
                    conn_burst_per_ip=1000000,
                    **STORM_ADMISSION, **extra)
    node = Node(**settings)
    try:
        m0 = node.metrics()
        load, cmd, _ = run_load(node.host, node.port, load_args_storm(n), 400,
                                node_pid=node.proc.pid)
        m1 = node.metrics()
    finally:
        node.stop()
    c = load.get("connect", {})
    joined = c.get("joined") or 0
    span = c.get("time_to_all_joined_s")
    # The goal counts authenticated connects: every client connected, sent
    # its Hello, got AuthOk, joined and got the join Ack, from the first
    # connect to the last Ack. The load tool's connects/s counts TCP
    # handshakes, which the kernel completes for the window's last 4,096
    # before the node has even accepted them.
    rate = round(joined / span, 1) if joined and span else None
    node_cpu = load.get("cpu", {}).get("node_s")
    cpu_us = round(node_cpu / joined * 1e6, 1) if node_cpu and joined else None
    return {
        "connections": n, "connect_window": STORM_WINDOW, "node_settings": settings,
        "load": slim(load), "load_command": cmd, "node_command": node.command,
        "authenticated_per_s": rate, "time_to_all_joined_s": span,
        "tcp_connects_per_s": c.get("connects_per_s"),
        # The node's CPU per connect (whole storm, accept to close): the
        # figure that does not depend on what else shares the cores.
        "node_cpu_us_per_connect": cpu_us,
        "refused": int(delta(m1, m0, "fanout_connections_refused_total")),
        "target": TARGETS["connect-storm"],
        "verdict": "met" if rate is not None and rate >= 10000 and joined == n else "missed",
    }


def user_channels(quick: bool) -> dict:
    """What the user's channel costs per connection: connect-storm and
    idle-connections with user_channels 1 (the default) and 0, alternating
    (pairs), on the same machine in the same run."""
    pairs = 1 if quick else 3
    storms: dict[str, list] = {"on": [], "off": []}
    for _ in range(pairs):
        for label, value in (("on", 1), ("off", 0)):
            r = connect_storm(quick, user_channels=value)
            storms[label].append({k: r[k] for k in (
                "authenticated_per_s", "node_cpu_us_per_connect", "time_to_all_joined_s",
                "verdict")})
    idle = {label: idle_connections(quick, user_channels=value)
            for label, value in (("on", 1), ("off", 0))}

    def median(label: str, key: str) -> float | None:
        values = sorted(x[key] for x in storms[label] if x[key] is not None)
        return values[len(values) // 2] if values else None
    on_cpu, off_cpu = median("on", "node_cpu_us_per_connect"), median("off",
                                                                      "node_cpu_us_per_connect")
    on_rate, off_rate = median("on", "authenticated_per_s"), median("off", "authenticated_per_s")
    return {
        "pairs": pairs, "connect_storm": storms,
        "node_cpu_us_per_connect_median": {"on": on_cpu, "off": off_cpu},
        "cpu_per_connect_ratio_on_off": round(on_cpu / off_cpu, 3) if on_cpu and off_cpu
        else None,
        "authenticated_per_s_median": {"on": on_rate, "off": off_rate},
        "bytes_per_connection": {k: v["bytes_per_connection"] for k, v in idle.items()},
        "idle_verdicts": {k: v["verdict"] for k, v in idle.items()},
        "target": "idle-connections and connect-storm targets met with user channels on",
        "verdict": "met" if all(v["verdict"] == "met" for v in idle.values())
        and all(x["verdict"] == "met" for x in storms["on"]) else "missed",
    }
