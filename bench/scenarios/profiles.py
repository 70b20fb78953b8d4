"""profile, profile-storm, profile-quiet: py-spy of the node under the load
of reference-room, connect-storm and quiet-rooms; where its CPU goes, as
collapsed stacks in build/ and a chart of the top frames in docs/img/."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import threading
import time

from bench.scenarios.harness import BIN, BUILD, ROOT, Node
from bench.scenarios.load import (QUIET_SETTINGS, STORM_ADMISSION, latency_summary,
                                  load_args_quiet, load_args_reference, load_args_storm,
                                  run_load, run_load_on)
from bench.scenarios.reference_room import REFERENCE_SETTINGS


def profile(quick: bool) -> dict:
    """py-spy (native frames on; it pauses the node for each sample, so the
    run's own figures are perturbed) of the node at the reference load: where
    its CPU goes. Writes the collapsed stacks to build/ and a chart of the top
    frames to docs/img/reference_room_profile.png."""
    viewers = 300 if quick else 10000
    duration = 5.0 if quick else 25.0
    settings = REFERENCE_SETTINGS
    return _profile("reference_room", settings, load_args_reference(viewers, duration),
                    publish=True, start_after=3.0 if quick else 8.0,
                    seconds=2 if quick else int(duration - 6), timeout=duration + 300,
                    title="fanout node at the reference load (10k viewers, 2,000 msg/s)")


def profile_storm(quick: bool) -> dict:
    """py-spy of the node during connect-storm: what one connect costs."""
    n = 500 if quick else 19000
    settings = dict(max_connections=19500, conn_rate_per_ip=1000000, conn_burst_per_ip=1000000,
                    **STORM_ADMISSION)
    return _profile("connect_storm", settings, load_args_storm(n), publish=False,
                    start_after=0.0, seconds=2 if quick else 6, timeout=300,
                    title="fanout node during connect-storm (19,000 connects)")


def profile_quiet(quick: bool) -> dict:
    """py-spy of the node during quiet-rooms: where a quiet room's latency goes."""
    rooms, per_room = (10, 20) if quick else (100, 100)
    duration = 5.0 if quick else 20.0
    return _profile("quiet_rooms", QUIET_SETTINGS, load_args_quiet(rooms, per_room, duration),
                    publish=True, start_after=3.0 if quick else 8.0,
                    seconds=2 if quick else int(duration - 6), timeout=duration + 300,
                    title="fanout node in quiet-rooms (100 rooms x 100 viewers, 5 msg/s each)")


def _profile(name: str, settings: dict, load_args: list[str], *, publish: bool,
             start_after: float, seconds: int, timeout: float, title: str) -> dict:
    raw = BUILD / f"{name}_profile.txt"
    BUILD.mkdir(exist_ok=True)
    node = Node(**settings)
    box: dict = {}
    try:
        worker = threading.Thread(target=lambda: box.update(zip(
            ("load", "cmd", "proc"), run_load(node.host, node.port, load_args, timeout,
                                              admin_port=node.admin_port if publish else None,
                                              node_pid=node.proc.pid))))
        worker.start()
        time.sleep(start_after)
        spy_argv = [str(BIN / "py-spy"), "record", "--pid", str(node.proc.pid), "--native",
                    "--rate", "200", "--duration", str(seconds), "--format", "raw",
                    "--output", str(raw)]
        spy = subprocess.run(spy_argv, capture_output=True, text=True)
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed ({spy.returncode}): {spy.stderr[-2000:]}")
        worker.join()
    finally:
        node.stop()
    stacks = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        stacks.append((stack.split(";"), int(count)))
    total = sum(c for _, c in stacks) or 1
    self_time: dict[str, int] = {}
    incl: dict[str, int] = {}
    for frames, count in stacks:
        names = [_frame_name(f) for f in frames]
        self_time[names[-1]] = self_time.get(names[-1], 0) + count
        for fname in set(names):
            incl[fname] = incl.get(fname, 0) + count
    top_self = sorted(self_time.items(), key=lambda kv: -kv[1])[:15]
    top_incl = sorted(incl.items(), key=lambda kv: -kv[1])[:25]
    load = box.get("load", {})
    chart = _profile_chart(name, top_self, total, title)
    return {"samples": total, "py_spy_command": shlex.join(spy_argv),
            "collapsed_stacks": str(raw.relative_to(ROOT)),
            "top_self": [[n, round(c / total, 4)] for n, c in top_self],
            "top_inclusive": [[n, round(c / total, 4)] for n, c in top_incl],
            "chart": chart,
            "load": {k: load.get(k) for k in ("deliveries_per_s", "batch_frames_per_s",
                                              "messages_per_batch", "gaps", "connect")},
            "load_latency_ms": latency_summary(load) if load else None,
            "load_cpu": load.get("cpu"), "load_command": box.get("cmd"),
            "node_command": node.command}


def _frame_name(frame: str) -> str:
    # "function (file:line)" -> "function (file)"; native frames have no file.
    name = re.sub(r":\d+\)$", ")", frame.strip())
    return re.sub(r"\(/[^)]*/(site-packages|lib/python3\.\d+|main)/", "(", name)


def _profile_chart(name: str, top: list, total: int, title: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    out = ROOT / "docs" / "img" / f"{name}_profile.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    names = [n[:70] for n, _ in top][::-1]
    shares = [c / total * 100 for _, c in top][::-1]
    fig, ax = plt.subplots(figsize=(10, 6), dpi=100)
    ax.barh(names, shares, color="#1f77b4")
    for i, v in enumerate(shares):
        ax.text(v + 0.3, i, f"{v:.1f}%", va="center", fontsize=8)
    ax.set_xlabel("share of the node's samples where this frame is on top (self time), %")
    ax.set_title(f"{title}: py-spy --native, self time", fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return str(out.relative_to(ROOT))


def stalls_quiet(quick: bool) -> dict:
    """The stall tracer (bench/stalltrace.py) in the node during quiet-rooms:
    every event-loop stall over 1 ms, what ran during it, the node's
    periodic work timed per call, and every GC pause."""
    rooms, per_room = (10, 20) if quick else (100, 100)
    duration = 5.0 if quick else 25.0
    out = BUILD / "quiet_rooms_stalls.json"
    BUILD.mkdir(exist_ok=True)
    node = Node(command=[str(BIN / "python"), "-m", "bench.stalltrace", "--out", str(out), "--"],
                **QUIET_SETTINGS)
    try:
        load, cmd = run_load_on(node, load_args_quiet(rooms, per_room, duration), duration + 200)
    finally:
        node.stop()
    trace = json.loads(out.read_text())
    return {"trace": trace, "trace_file": str(out.relative_to(ROOT)),
            "load_latency_ms": latency_summary(load), "gaps": load.get("gaps"),
            "load_command": cmd, "node_command": node.command,
            "summary": "stalls-quiet: stalls " + json.dumps(trace["stalls"])
            + "; timed " + json.dumps({k: v["max_ms"] for k, v in trace["timed"].items()})
            + "; gc max " + json.dumps({k: v["max_ms"] for k, v in trace["gc"].items()})
            + f"; latency {latency_summary(load)}"}
