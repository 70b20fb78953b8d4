"""CI performance regression check (`make perf-check`, called by .ci/run).

    .venv/bin/python bench/perf_check.py [--repeat 15] [--json out.json]

A short run of the benchmark suite's hot paths. Every check compares the
engine with a baseline measured in the same process, in the same run:

  fanout_1000_vs_c_send   engine fan-out of one 2,048 B frame to 1,000
                          socketpairs vs bench/c_reference.c calling send() on
                          the same number of fresh socketpairs (writes/s)
  small_room_vs_naive     the same at 100 members vs a Python
                          ``sock.send(frame)`` loop (writes/s)
  decode_chat_core_vs_wire  fanout._core.parse_frames vs fanout.protocol.wire.FrameDecoder
                          on 400 small Chat and Ping frames (frames/s): the
                          framing work itself, no lz4
  loop_lag_idle_vs_flush  the event loop's p99 lag idle vs while a room of
                          9,000 socketpair members flushes every 20 ms with
                          one writer thread (bench/loop_lag.py): fails when a
                          large flush blocks the loop (--writes-on-loop shows
                          it does)

Not gated: decoding lz4 Batch frames (pyperf's frame_decode). There, both
decoders spend most of their time in the same lz4 call and in allocating the
inflated bodies. Their ratio was 1.3-1.5 when glibc kept freed memory, and
1.1-3.1 with the default allocator, depending on what the process had run
before. Neither is a ratio a threshold can rely on.

The variants of every check run interleaved, A B, B A, ..., across all
checks, so a noisy neighbour hurts both sides alike. A check's ratio is the
median rate of A over the median rate of B. It fails when that ratio is below
its threshold in bench/perf_thresholds.json. The thresholds sit well below
the ratios this machine measures (see the file), so noise does not fail CI,
while a core that is slower per recipient (FANOUT_SLOW=1, setup.py) does.

Prints a table and exits 1 if any check fails (2 if the run itself was
invalid: errors, short writes, or a missing or unreadable threshold).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import uvloop

try:        # as part of the bench package (python -m bench.perf_check)
    from bench import fanout_socketpairs as fs, loop_lag as ll, workloads as w
except ImportError:  # as a script: bench/ is sys.path[0]
    import fanout_socketpairs as fs
    import loop_lag as ll
    import workloads as w
from fanout import _core

HERE = Path(__file__).resolve().parent
THRESHOLDS = HERE / "perf_thresholds.json"
FRAME_BYTES = 2048


class FanoutCheck:
    """Engine vs a baseline fan-out at n members; rates in writes/s."""

    def __init__(self, name: str, label: str, n: int, rounds: int, baseline: str):
        self.name, self.label, self.n, self.rounds = name, label, n, rounds
        self.variants = ("engine", baseline)
        self.unit = "writes/s"

    def run(self, variant: str, loop: asyncio.AbstractEventLoop) -> float:
        res = fs.run_variant(variant, self.n, FRAME_BYTES, self.rounds, loop)
        bad = {k: res.get(k, 0) for k in ("failures", "short_writes", "eagain", "errors")}
        if any(bad.values()):
            raise InvalidRun(f"{self.name}/{variant}: not a clean run: {bad}")
        return res["writes_per_s"]


class DecodeCheck:
    """Compiled vs pure-Python frame decoding; rates in frames/s."""

    def __init__(self, name: str, label: str, stream, iterations: dict[str, int]):
        # stream: a workloads function returning (bytes, frame count)
        self.name, self.label, self.iterations = name, label, iterations
        self.variants = ("core", "wire")
        self.unit = "frames/s"
        self.stream, self.frames = stream()
        if w.decode_core(self.stream) != w.decode_wire(self.stream):
            raise InvalidRun("the two decoders disagree on the stream")

    def run(self, variant: str, loop: asyncio.AbstractEventLoop) -> float:
        decode = w.decode_core if variant == "core" else w.decode_wire
        stream, k = self.stream, self.iterations[variant]
        t0 = time.perf_counter()
        for _ in range(k):
            decode(stream)
        return k * self.frames / (time.perf_counter() - t0)


class LagCheck:
    """Event-loop lag while a large room flushes vs the idle loop
    (bench/loop_lag.py). The rate of each is 1/p99 lag, so the ratio is
    p99 idle / p99 flushing: small when flushes block the loop."""

    def __init__(self, name: str, label: str, members: int, threads: int, seconds: float):
        self.name, self.label, self.threads, self.seconds = name, label, threads, seconds
        self.members = ll.members_allowed(members)
        self.variants = ("flush", "idle")
        self.unit = "1/p99 lag (1/s)"

    def run(self, variant: str, loop: asyncio.AbstractEventLoop) -> float:
        lag = ll.run(loop, self.members, self.threads, self.seconds, variant == "flush")
        return 1.0 / max(lag, 1e-6)


class InvalidRun(Exception):
    pass


def checks(writer_threads: int = 1) -> list:
    return [
        LagCheck("loop_lag_idle_vs_flush", "loop lag p99, idle/9,000-member flushes",
                 members=9000, threads=writer_threads, seconds=0.5),
        FanoutCheck("fanout_1000_vs_c_send", "engine/c_send fan-out, 1,000 members",
                    n=1000, rounds=80, baseline="c_send"),
        FanoutCheck("small_room_vs_naive", "engine/naive fan-out, 100 members",
                    n=100, rounds=300, baseline="naive"),
        DecodeCheck("decode_chat_core_vs_wire", "core/wire frame decode, Chat/Ping",
                    w.chat_stream, iterations={"core": 2400, "wire": 200}),
    ]


def measure(all_checks: list, repeat: int, progress=None) -> dict[str, dict[str, list[float]]]:
    """Interleaved repeats: every check in every repeat, its two variants in
    alternating order (A B, then B A) so neither always runs first."""
    rates = {c.name: {v: [] for v in c.variants} for c in all_checks}
    loop = uvloop.new_event_loop()
    try:
        for i in range(repeat):
            for c in all_checks:
                order = c.variants if i % 2 == 0 else c.variants[::-1]
                for v in order:
                    gc.collect()   # a collection inside a timed loop is noise
                    rates[c.name][v].append(c.run(v, loop))
            if progress is not None:
                progress(i, rates)
    finally:
        loop.close()
    return rates


def load_thresholds(path: Path) -> dict:
    data = json.loads(path.read_text())
    return data["checks"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=15,
                    help="interleaved repeats of every check (default 15)")
    ap.add_argument("--thresholds", type=Path, default=THRESHOLDS)
    ap.add_argument("--json", metavar="PATH", help="also write the results here")
    ap.add_argument("--writes-on-loop", action="store_true",
                    help="run the loop-lag check with no writer threads (the loop "
                         "writes every member), to show the gate catches it")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be positive")

    started = time.monotonic()
    try:
        thresholds = load_thresholds(args.thresholds)
    except (OSError, ValueError, KeyError) as exc:
        print(f"cannot read thresholds from {args.thresholds}: {exc!r}", file=sys.stderr)
        return 2
    info = fs.machine()
    print("perf-check: {nproc} CPUs, {cpu_model}; Python {python}, uvloop {uvloop}; "
          "load {loadavg:.2f}".format(**info))
    print(f"core: {_core.__file__}")
    fs.build_c()
    all_checks = checks(0 if args.writes_on_loop else 1)
    missing = [c.name for c in all_checks if c.name not in thresholds]
    if missing:
        print(f"no threshold for {', '.join(missing)} in {args.thresholds}", file=sys.stderr)
        return 2

    def progress(i: int, rates: dict) -> None:
        parts = []
        for c in all_checks:
            a, b = (rates[c.name][v][-1] for v in c.variants)
            parts.append(f"{c.name} {a / b:.2f}")
        print(f"  repeat {i + 1}/{args.repeat}: " + ", ".join(parts), flush=True)

    try:
        rates = measure(all_checks, args.repeat, progress)
    except (InvalidRun, RuntimeError) as exc:   # RuntimeError: a fixture's own check
        print(f"invalid run: {exc}", file=sys.stderr)
        return 2

    results = {}
    failed = []
    print()
    print(f"{'check':42} {'ratio':>6} {'repeats min..max':>17} {'threshold':>9}  result")
    for c in all_checks:
        va, vb = c.variants
        ra, rb = rates[c.name][va], rates[c.name][vb]
        ratio = statistics.median(ra) / statistics.median(rb)
        pairs = [a / b for a, b in zip(ra, rb)]
        limit = float(thresholds[c.name]["min_ratio"])
        ok = ratio >= limit
        if not ok:
            failed.append(c.name)
        print(f"{c.label:42} {ratio:6.2f} {min(pairs):8.2f}..{max(pairs):<8.2f} "
              f"{limit:9.2f}  {'pass' if ok else 'FAIL'}")
        results[c.name] = {
            "label": c.label, "ratio": ratio, "threshold": limit, "pass": ok,
            "per_repeat_ratios": pairs, "unit": c.unit,
            "median": {va: statistics.median(ra), vb: statistics.median(rb)},
            "rates": {va: ra, vb: rb},
        }
    print()
    for c in all_checks:
        r = results[c.name]
        print(f"  {c.name}: " + ", ".join(f"{v} {m:,.0f} {c.unit}" for v, m in r["median"].items())
              + " (medians)")
    elapsed = time.monotonic() - started
    verdict = (f"FAILED {len(failed)} of {len(all_checks)} ratios" if failed
               else f"all {len(all_checks)} ratios at or above their thresholds")
    print(f"perf-check: {verdict} ({args.repeat} repeats, {elapsed:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": info, "core": _core.__file__, "repeat": args.repeat,
            "seconds": elapsed, "checks": results}, indent=2) + "\n")
    if failed:
        print(f"performance regression: {', '.join(failed)} below threshold "
              f"({args.thresholds.relative_to(HERE.parent) if args.thresholds.is_relative_to(HERE.parent) else args.thresholds})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
