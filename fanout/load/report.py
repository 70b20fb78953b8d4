"""The report of a run: the workers' counters merged, the result document
(:func:`build_result`, schema :data:`SCHEMA`), the live terminal view
(:class:`Progress`, with ``rich``) and the few lines :func:`summary` prints.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import time
from typing import Any

from .config import LoadConfig
from .publisher import Publisher
from .verify import (CHECK_METHOD, decoded_viewers, end_counts, error_counts,
                     expected_deliveries, passed, verification)

__all__ = ["SCHEMA", "Progress", "build_result", "cpu_self", "merge", "proc_cpu", "summary"]

#: Version tag of the JSON result.
SCHEMA = "fanout.load/1"

_MAX_FIELDS = ("last_connected_ns", "last_join_ns", "latency_max_ns", "t")
_SKIP_FIELDS = ("lat_p50_ns", "lat_p99_ns", "first_connect_ns")


def merge(stats: list[dict]) -> dict:
    """Sum the workers' counters (maxima for times, merged dicts for breakdowns)."""
    out: dict[str, Any] = {}
    for s in stats:
        if s is None:
            continue
        for key, value in s.items():
            if key in _SKIP_FIELDS:
                continue
            if isinstance(value, dict):
                d = out.setdefault(key, {})
                for k, v in value.items():
                    d[k] = d.get(k, 0) + v
            elif key in _MAX_FIELDS:
                out[key] = max(out.get(key, 0), value)
            else:
                out[key] = out.get(key, 0) + value
    firsts = [s["first_connect_ns"] for s in stats if s and s.get("first_connect_ns")]
    out["first_connect_ns"] = min(firsts) if firsts else 0
    p50s = [s["lat_p50_ns"] for s in stats if s and s.get("lat_p50_ns") is not None]
    p99s = [s["lat_p99_ns"] for s in stats if s and s.get("lat_p99_ns") is not None]
    out["lat_p50_ns"] = max(p50s) if p50s else None
    out["lat_p99_ns"] = max(p99s) if p99s else None
    return out


def proc_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) used so far by process ``pid``."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_self() -> float:
    """CPU seconds (user + system) used so far by this process."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


def _rate(a: dict, b: dict, key: str, seconds: float) -> float:
    return (b.get(key, 0) - a.get(key, 0)) / seconds if seconds > 0 else 0.0


class Progress:
    """The live terminal view (rich), or nothing."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        self.live = None
        self.phase = "starting"
        self.t0 = time.monotonic()
        self.prev: tuple[float, dict] | None = None
        self.rates: dict[str, float] = {}
        self.publisher: Publisher | None = None
        #: When publishing ends (monotonic), once it has started.
        self.ends_at: float | None = None
        if cfg.progress:
            try:
                from rich.console import Console
                from rich.live import Live
            except ImportError:     # a lean install: the run goes on without the view
                print("fanout load: no live view without the rich package "
                      "(pip install 'fanout-im[tools]')", file=sys.stderr, flush=True)
                return

            console = Console(stderr=True)
            self.live = Live(self._render({}), console=console, refresh_per_second=4,
                             transient=False)
            self.live.start()

    def update(self, phase: str | None, merged: dict) -> None:
        if phase:
            self.phase = phase
        if self.live is None:
            return
        now = time.monotonic()
        if self.prev is None or now - self.prev[0] >= 0.5:
            if self.prev is not None:
                dt = now - self.prev[0]
                for key in ("deliveries", "frames", "wire_bytes", "batch_frames"):
                    self.rates[key] = _rate(self.prev[1], merged, key, dt)
                if self.publisher is not None:
                    self.rates["published"] = (self.publisher.accepted
                                               - self.prev[1].get("_published", 0)) / dt
            merged = dict(merged)
            merged["_published"] = self.publisher.accepted if self.publisher else 0
            self.prev = (now, merged)
            self.live.update(self._render(merged))

    def _render(self, m: dict):
        from rich.table import Table

        r = self.rates
        table = Table(title=self.title(time.monotonic()), show_header=False, box=None,
                      pad_edge=False)
        table.add_column(style="bold cyan", justify="right")
        table.add_column()
        dl = r.get("deliveries", 0.0)
        table.add_row("viewers", f"{m.get('joined', 0):,} joined · {m.get('live', 0):,} live · "
                                 f"{m.get('connect_failed', 0):,} failed · "
                                 f"{m.get('retries', 0):,} retries")
        table.add_row("published", f"{r.get('published', 0.0):,.0f} msg/s accepted")
        table.add_row("deliveries", f"{dl:,.0f} /s")
        table.add_row("frames", f"{r.get('frames', 0.0):,.0f} /s "
                                f"({r.get('batch_frames', 0.0):,.0f} batches/s)")
        wire = r.get("wire_bytes", 0.0)
        per = f" · {wire / dl:.1f} B/msg" if dl else ""
        table.add_row("wire", f"{wire * 8 / 1e6:,.1f} Mbit/s{per}")
        table.add_row("latency", f"p50 {_fmt_ms(m.get('lat_p50_ns'))} · "
                                 f"p99 {_fmt_ms(m.get('lat_p99_ns'))} (worst process)")
        table.add_row("checks", f"gaps {m.get('gaps', 0)} · reorders {m.get('reorders', 0)} · "
                                f"slow-consumer cuts {m.get('slow_cuts', 0)}")
        return table

    def title(self, now: float) -> str:
        """The phase, the time so far, and the publishing plan: its total
        length, and once it has started, the time left (a drain of at most
        ``drain_timeout`` follows)."""
        cfg = self.cfg
        length = cfg.warmup + cfg.duration
        if self.ends_at is None:
            plan = f"then {length:g} s of publishing"
        else:
            left = max(0.0, self.ends_at - now)
            plan = (f"{left:4.1f} s of {length:g} s left" if left else "publishing done")
        return f"fanout load · {self.phase} · {now - self.t0:5.1f} s · {plan}"

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def _fmt_ms(ns) -> str:
    return "-" if ns is None else f"{ns / 1e6:.1f} ms"


def build_result(cfg: LoadConfig, specs: list[dict], finals: list[dict], joined: dict,
                 a: dict, b: dict, pub_a: int, pub_b: int, publisher: Publisher | None,
                 drained: dict, driver_cpu0: float, node_cpu: tuple) -> dict:
    """The result document of a run (:func:`fanout.load.run` describes its keys).

    :param finals: the workers' ``final`` replies; ``joined``, ``a`` and
        ``b``: merged snapshots once all joined and at both ends of the
        measured window; ``pub_a``/``pub_b``: messages accepted by then;
        ``node_cpu``: the node's CPU seconds at start, window start, window
        end and the end of the run.
    """
    from .._loadgen import bucket_value, percentiles_of

    final = merge([f["stats"] for f in finals])
    window = b["t"] - a["t"]
    members = [sum(col) for col in zip(*(f["members"] for f in finals))]
    buckets: dict[int, int] = {}
    for f in finals:
        for index, count in f["latency"]:
            buckets[index] = buckets.get(index, 0) + count
    items = sorted(buckets.items())
    p50, p99, p999 = percentiles_of(items, (50.0, 99.0, 99.9))
    samples = final.get("latency_samples", 0)
    verify = verification(finals)
    deliveries_win = b["deliveries"] - a["deliveries"]
    wire_win = b["wire_bytes"] - a["wire_bytes"]
    connect_span = (joined.get("last_connected_ns", 0) - joined.get("first_connect_ns", 0)) / 1e9
    join_span = (joined.get("last_join_ns", 0) - joined.get("first_connect_ns", 0)) / 1e9
    workers_cpu = sum(f["stats"]["cpu_s"] for f in finals)
    workers_cpu_win = b["cpu_s"] - a["cpu_s"]
    driver_cpu = cpu_self() - driver_cpu0
    pub_cpu = publisher.cpu_s if publisher else 0.0
    node_start, node_a, node_b, node_end = node_cpu
    expected = expected_deliveries(publisher.accepted_by_room if publisher else [], members)
    gaps = final.get("gaps", 0)
    result = {
        "schema": SCHEMA,
        "ok": None,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                   if k not in ("secret", "api_key", "progress")},
        "viewers": cfg.viewers,
        "viewers_joined": joined.get("joined", 0),
        "viewers_live_at_end": final.get("live", 0),
        "rooms": cfg.rooms,
        "processes": len(specs),
        "decoded_viewers": decoded_viewers(specs),
        "duration_s": round(window, 3),
        "warmup_s": cfg.warmup,
        "published": {
            "rate_target": cfg.rate,
            "offered": publisher.sent if publisher else 0,
            "accepted": publisher.accepted if publisher else 0,
            "accepted_per_s": round((pub_b - pub_a) / window, 1) if window > 0 else 0.0,
            "by_kind": dict(publisher.accepted_by_kind) if publisher else {},
            "rejected": dict(publisher.rejected) if publisher else {},
            "requests": publisher.requests if publisher else 0,
            "request_ms_mean": round(publisher.request_s / publisher.requests * 1000, 3)
            if publisher and publisher.requests else None,
            "max_behind_ms": round(publisher.behind * 1000, 1) if publisher else None,
        },
        "deliveries": final.get("deliveries", 0),
        "expected_deliveries": expected,
        "deliveries_per_s": round(deliveries_win / window, 1) if window > 0 else 0.0,
        "frames": final.get("frames", 0),
        "frames_per_s": round(_rate(a, b, "frames", window), 1),
        "batch_frames_per_s": round(_rate(a, b, "batch_frames", window), 1),
        "messages_per_batch": round(deliveries_win / (b["batch_frames"] - a["batch_frames"]), 2)
        if b["batch_frames"] > a["batch_frames"] else None,
        "wire_bytes": final.get("wire_bytes", 0),
        "wire_bytes_per_s": round(wire_win / window, 1) if window > 0 else 0.0,
        "wire_bytes_per_msg": round(wire_win / deliveries_win, 2) if deliveries_win else None,
        "latency_ms": {
            "p50": _ms(p50), "p99": _ms(p99), "p999": _ms(p999),
            "max": _ms(final.get("latency_max_ns")) if samples else None,
            "mean": _ms(final.get("latency_sum_ns", 0) / samples) if samples else None,
            "samples": samples,
            "negative": final.get("latency_negative", 0),
            "histogram": [[bucket_value(i), c] for i, c in items],
        },
        "gaps": gaps,
        "missing_messages": final.get("missing", 0),
        "reorders": final.get("reorders", 0),
        "divergences": verify["divergences"],
        "node_gaps": final.get("node_gaps", 0),
        "slow_consumer_cuts": final.get("slow_cuts", 0),
        "errors": error_counts(final),
        "ended": end_counts(finals),
        "connect": {
            "connects_per_s": round(joined.get("connected", 0) / connect_span, 1)
            if connect_span > 0 else None,
            "time_to_all_joined_s": round(join_span, 3) if joined.get("joined") else None,
            "joined": joined.get("joined", 0),
            "failed": joined.get("connect_failed", 0),
            "retries": joined.get("retries", 0),
        },
        "cpu": {
            "loadgen_s": round(workers_cpu + driver_cpu, 3),
            "workers_s": round(workers_cpu, 3),
            "workers_window_s": round(workers_cpu_win, 3),
            "workers_window_cores": round(workers_cpu_win / window, 3) if window > 0 else None,
            "workers_window_user_s": round(b["cpu_user_s"] - a["cpu_user_s"], 3),
            "workers_window_sys_s": round(b["cpu_sys_s"] - a["cpu_sys_s"], 3),
            "driver_s": round(driver_cpu - pub_cpu, 3),
            "publisher_s": round(pub_cpu, 3),
            "node_s": round(node_end - node_start, 3) if node_start is not None
            and node_end is not None else None,
            "node_window_s": round(node_b - node_a, 3) if node_a is not None
            and node_b is not None else None,
            "node_window_cores": round((node_b - node_a) / window, 3)
            if node_a is not None and node_b is not None and window > 0 else None,
        },
        "check": {
            "method": CHECK_METHOD,
            "verified_viewers": verify["verified"],
            "unverified_viewers": verify["unverified"],
            "silent_viewers": verify["silent"],
            "cut_viewers": verify["cut"],
            "reference_mismatches": verify["reference_mismatches"],
            "cross_process_mismatches": verify["cross_process_mismatches"],
            "join_point_gaps": final.get("join_point_gaps", 0),
            "foreign_messages": final.get("foreign", 0),
            "sampled_batches": final.get("sampled_batches", 0),
            "decoded_frames": final.get("decoded_frames", 0),
            "decoded_messages": final.get("decoded_msgs", 0),
            "unresolved_frames": final.get("unresolved_frames", 0),
        },
        "drain": drained,
        "workers": [{"pid": f["pid"], "viewers": f["stats"]["viewers"],
                     "cpu_s": round(f["stats"]["cpu_s"], 3),
                     "deliveries": f["stats"]["deliveries"]} for f in finals],
    }
    result["ok"] = passed(result, cfg.viewers, publisher is not None)
    return result


def summary(result: dict) -> str:
    """A few human-readable lines about a result."""
    lat = result["latency_ms"]
    conn = result["connect"]
    cpu = result["cpu"]
    # Figures a run may not have (no samples, no --node-pid) say why, not "None".
    latency = (f"latency p50 {lat['p50']} ms, p99 {lat['p99']} ms, p99.9 {lat['p999']} ms "
               f"({lat['samples']:,} samples)" if lat["samples"] else
               "latency: no samples (nothing published, or --latency-every too high)")
    wire = (f"{result['wire_bytes_per_msg']} wire B/msg"
            if result["wire_bytes_per_msg"] is not None else "no wire B/msg (no deliveries)")
    node_cpu = (f"node {cpu['node_window_cores']} cores" if cpu["node_window_cores"] is not None
                else "node not measured (--node-pid PID to measure it)")
    lines = [
        f"viewers {result['viewers_joined']:,}/{result['viewers']:,} joined in "
        f"{conn['time_to_all_joined_s']} s ({conn['connects_per_s']} connects/s), "
        f"{result['processes']} process(es), {result['rooms']} room(s)",
        f"published {result['published']['accepted_per_s']:,} msg/s accepted; "
        f"deliveries {result['deliveries_per_s']:,.0f}/s; frames {result['frames_per_s']:,.0f}/s; "
        f"{wire}",
        latency,
        f"gaps {result['gaps']}, reorders {result['reorders']}, divergences "
        f"{result['divergences']}, slow-consumer cuts {result['slow_consumer_cuts']}, "
        f"deliveries {result['deliveries']:,} of {result['expected_deliveries']:,} expected",
        f"cpu: load generator {cpu['workers_window_cores']} cores in the window "
        f"({cpu['loadgen_s']} s total); {node_cpu}",
    ]
    if result["errors"]:
        lines.append("errors: " + ", ".join(f"{k} {v}" for k, v in sorted(result["errors"].items())))
    lines.append("OK" if result["ok"] else "NOT OK")
    return "\n".join(lines)
