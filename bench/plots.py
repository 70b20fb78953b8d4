"""Plots for docs/benchmarks.md from the scenario results (bench/results/).

    .venv/bin/python -m bench.plots [--results bench/results] [--out docs/img]

* ``deliveries_vs_viewers.png``: deliveries/s against viewers in one room at
  the reference load (2,000 messages/s in), engine and peers, from
  ``sweep.json`` (``python -m bench.scenarios sweep``) plus the reference-room
  run itself, log-log.
* ``latency_cdf.png``: latency CDF of the engine in reference-room and
  quiet-rooms, and of the naive and websockets peers in reference-room.
* ``scaling_viewers.png`` and ``latency_vs_offered_load.png``: from
  ``scaling.json`` (``python -m bench.scenarios scaling``): deliveries/s and
  p99 against viewers for 1 and 2 writer threads, and latency against 1x-5x
  the reference rate with the node's degradation.

Only figures of one run are drawn together; the machine is in the title.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COLORS = {"engine": "#1f77b4", "c-reference": "#2ca02c", "naive": "#d62728",
          "websockets": "#ff7f0e", "uws": "#9467bd", "uws_batched": "#e377c2",
          "node_ws": "#8c564b"}


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def latency_points(lat: dict) -> list[tuple[float, float]]:
    """(ms, quantile) points from a latency record: its CDF when it has one,
    else its percentiles."""
    if not lat:
        return []
    if lat.get("histogram"):            # fanout load: [[bucket value ns, count], ...]
        hist = sorted((float(v), int(c)) for v, c in lat["histogram"] if c)
        total = sum(c for _, c in hist)
        pts, seen = [], 0
        for v, c in hist:
            seen += c
            pts.append((v / 1e6, seen / total))
        return pts
    if lat.get("cdf"):
        return [(float(ms), float(q)) for q, ms in lat["cdf"] if ms is not None]
    pts = []
    for key, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999),
                   ("p99.9", 0.999), ("max", 1.0)):
        if lat.get(key) is not None:
            pts.append((float(lat[key]), q))
    return sorted(pts, key=lambda p: p[1])


def engine_latency(load: dict) -> dict:
    lat = dict(load.get("latency_ms") or load.get("latency") or {})
    if "cdf" not in lat and load.get("latency_cdf"):
        lat["cdf"] = load["latency_cdf"]
    return lat


def plot_deliveries(results: Path, out: Path, plt) -> Path | None:
    sweep = _load(results / "sweep.json")
    if not sweep:
        return None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for peer, rows in sweep["series"].items():
        pts = sorted((r["viewers"], r["deliveries_per_s"]) for r in rows
                     if r.get("deliveries_per_s"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=peer,
                    color=COLORS.get(peer))
            for x, y in pts:
                ax.annotate(f"{y / 1e6:.2f}M" if y >= 1e6 else f"{y / 1e3:.0f}k", (x, y),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
    demand = [(v, v * sweep.get("rate_in", 2000)) for v in sweep["viewers"]]
    ax.plot([d[0] for d in demand], [d[1] for d in demand], "k:", label="offered (viewers × 2,000/s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("viewers in one room")
    ax.set_ylabel("deliveries per second (log)")
    m = sweep.get("machine", {})
    ax.set_title(f"Deliveries/s vs viewers, 2,000 msg/s in, one run\n"
                 f"{m.get('cpus')} CPUs, {m.get('cpu', '')[:40]}, node + load generator on one box",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    return _save(fig, out / "deliveries_vs_viewers.png", plt)


def plot_latency(results: Path, out: Path, plt) -> Path | None:
    ref = _load(results / "reference-room.json")
    quiet = _load(results / "quiet-rooms.json")
    curves = []
    if ref:
        curves.append(("engine, reference-room (10k viewers)",
                       latency_points(engine_latency(ref["engine"]["load"])), COLORS["engine"], "-"))
        for peer in ("naive", "websockets"):
            if ref.get(peer):
                lat = dict(ref[peer]["latency_ms"])
                lat["cdf"] = ref[peer]["reader"].get("cdf")
                curves.append((f"{peer}, reference-room", latency_points(lat), COLORS[peer], "-"))
    if quiet:
        curves.append(("engine, quiet-rooms (100 × 100)",
                       latency_points(engine_latency(quiet["engine"]["load"])),
                       COLORS["engine"], "--"))
        if quiet.get("naive"):
            lat = dict(quiet["naive"]["latency_ms"])
            lat["cdf"] = quiet["naive"]["reader"].get("cdf")
            curves.append(("naive, quiet-rooms", latency_points(lat), COLORS["naive"], "--"))
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for label, pts, color, style in curves:
        ax.plot([max(p[0], 0.01) for p in pts], [p[1] for p in pts], style,
                marker="." if len(pts) < 40 else None, linewidth=1.8, label=label, color=color)
    for x, label in ((2, "quiet-rooms target 2 ms"), (150, "reference-room target 150 ms")):
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.text(x * 1.05, 0.03, label, rotation=90, fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("latency, publish to viewer (ms, log)")
    ax.set_ylabel("fraction of messages")
    ax.set_ylim(0, 1.01)
    m = (ref or quiet).get("machine", {})
    ax.set_title(f"Latency CDF\n{m.get('cpus')} CPUs, {m.get('cpu', '')[:40]}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out / "latency_cdf.png", plt)


def plot_scaling(results: Path, out: Path, plt) -> Path | None:
    """Deliveries/s and p99 against viewers, 1 and 2 writer threads."""
    data = _load(results / "scaling.json")
    if not data or not data.get("viewers"):
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    for threads, rows in sorted(data["viewers"].items()):
        xs = [r["viewers"] for r in rows]
        style = "-o" if threads == "1" else "--s"
        a1.plot(xs, [(r["deliveries_per_s"] or 0) / 1e6 for r in rows], style,
                label=f"{threads} writer thread{'s' if threads != '1' else ''}")
        a2.plot(xs, [r["latency_ms"].get("p99") for r in rows], style,
                label=f"{threads} writer thread{'s' if threads != '1' else ''}")
    xs = sorted({r["viewers"] for rows in data["viewers"].values() for r in rows})
    a1.plot(xs, [v * data.get("rate_in", 2000) / 1e6 for v in xs], ":", color="grey",
            label="demand (viewers x 2,000 msg/s)")
    a1.set_xlabel("viewers in the room")
    a1.set_ylabel("deliveries/s (millions)")
    a2.axhline(150, color="grey", linestyle=":", linewidth=1)
    a2.text(xs[0], 155, "reference p99 goal 150 ms", fontsize=8, color="grey")
    a2.set_xlabel("viewers in the room")
    a2.set_ylabel("latency p99 (ms)")
    m = data.get("machine", {})
    fig.suptitle(f"One room at 2,000 msg/s: the engine by writer threads\n"
                 f"{m.get('cpus')} CPUs shared with the viewers' readers", fontsize=10)
    for ax in (a1, a2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out / "scaling_viewers.png", plt)


def plot_offered(results: Path, out: Path, plt) -> Path | None:
    """Latency p99 against offered load (x the reference rate), with the
    node's degradation level at the end of each run."""
    data = _load(results / "scaling.json")
    if not data or not data.get("offered"):
        return None
    rows = data["offered"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    xs = [r["factor"] for r in rows]
    ax.plot(xs, [r["latency_ms"].get("p99") for r in rows], "-o", label="p99")
    ax.plot(xs, [r["latency_ms"].get("p50") for r in rows], "--.", label="p50")
    for r in rows:
        chat = sum(v for k, v in r["dropped_by_overload_control"].items() if "chat" in k)
        ax.annotate(f"level {r['level_at_window_end']}\nchat dropped {chat:,.0f}",
                    (r["factor"], r["latency_ms"].get("p99") or 0), fontsize=7,
                    textcoords="offset points", xytext=(4, 6))
    ax.set_xlabel("offered load (x 2,000 msg/s, 10,000 viewers)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency against offered load, one writer thread", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "latency_vs_offered_load.png", plt)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for fn in (plot_deliveries, plot_latency, plot_scaling, plot_offered):
        path = fn(Path(args.results), out, plt)
        print(f"{fn.__name__}: {path or 'no results to plot'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
