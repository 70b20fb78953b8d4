"""A stall tracer for a node process: which work held the event loop.

    python -m bench.stalltrace --out FILE [--threshold-ms 1] -- node ARGS...

runs ``fanout ARGS`` (a ``fanout node``) in this process with four probes
and writes what they saw to FILE (JSON) when the node exits:

* **stalls**: a heartbeat timer due every millisecond records each gap
  between two of its runs over ``--threshold-ms`` (the loop was busy that
  long): a histogram, the count, sum and longest per second of the run
  (``by_second``), and the longest ones with their time.
* **who**: a watchdog thread samples the loop thread's Python stack
  (``sys._current_frames``) every 0.2 ms while the heartbeat is overdue;
  each stall carries the innermost node frames seen during it. The switch
  interval is lowered to 0.2 ms so the watchdog gets the GIL inside long
  Python work; C work that holds the GIL (the core's send loops) shows as
  the Python frame that called it, or as ``loop:C`` when uvloop called the
  core directly (a room flush or a client read).
* **timed**: the node's periodic work (``Node._sweep``, ``Node._presence``,
  ``RoomTable.send_presence``) and the admin API's publish handler step,
  each timed per call.
* **gc**: every collection, per generation, from ``gc.callbacks``.

The probes cost the node about 1,000 timer runs/s and a thread that sleeps
0.2 ms at a time: a traced run's latency figures are not results, its
stall list is the point. ``python -m bench.scenarios stalls-quiet`` runs it
under the quiet-rooms load.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import json
import sys
import threading
import time

HEARTBEAT = 0.001
WATCH = 0.0002
KEEP = 60                      # longest stalls kept with their samples
BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_MS) + 1)
        self.total = 0.0
        self.n = 0
        self.max = 0.0

    def add(self, ms: float) -> None:
        i = 0
        while i < len(BUCKETS_MS) and ms >= BUCKETS_MS[i]:
            i += 1
        self.counts[i] += 1
        self.total += ms
        self.n += 1
        self.max = max(self.max, ms)

    def json(self) -> dict:
        labels = ["<1"] + [f">={b}" for b in BUCKETS_MS]
        return {"n": self.n, "total_ms": round(self.total, 1), "max_ms": round(self.max, 2),
                "by_ms": {lab: c for lab, c in zip(labels, self.counts) if c}}


class Tracer:
    def __init__(self, threshold_ms: float) -> None:
        self.threshold = threshold_ms / 1000
        self.t0 = time.perf_counter()
        self.stalls = Histogram()
        self.longest: list[tuple[float, float, dict]] = []     # (ms, at_s, samples)
        self.by_frame: dict[str, float] = {}                   # frame -> stall ms
        self.timed: dict[str, Histogram] = {}
        self.gc = {g: Histogram() for g in range(3)}
        self.gc_long: list[tuple[float, int, float, int]] = []  # (at_s, gen, ms, collected)
        self._gc_start = 0.0
        self._beat = 0.0
        self._samples: dict[str, int] = {}
        self._loop_thread = threading.get_ident()
        self._lock = threading.Lock()
        self.heartbeats = 0
        self.by_second: dict[int, list] = {}        # second -> [stalls, ms, max ms]

    # ------------------------------------------------------------ heartbeat

    def start_heartbeat(self, loop: asyncio.AbstractEventLoop) -> None:
        self._beat = time.perf_counter()

        def beat():
            now = time.perf_counter()
            gap = now - self._beat
            self._beat = now
            self.heartbeats += 1
            with self._lock:
                samples, self._samples = self._samples, {}
            if gap > self.threshold + HEARTBEAT:
                ms = (gap - HEARTBEAT) * 1000
                self.stalls.add(ms)
                share = ms / max(1, sum(samples.values()))
                for frame, count in samples.items():
                    self.by_frame[frame] = self.by_frame.get(frame, 0.0) + share * count
                self.longest.append((ms, now - self.t0, samples))
                sec = self.by_second.setdefault(int(now - self.t0), [0, 0.0, 0.0])
                sec[0] += 1
                sec[1] += ms
                sec[2] = max(sec[2], ms)
                if len(self.longest) > 4 * KEEP:
                    self.longest.sort(key=lambda s: -s[0])
                    del self.longest[KEEP:]
            loop.call_later(HEARTBEAT, beat)
        loop.call_later(HEARTBEAT, beat)
        threading.Thread(target=self._watch, daemon=True, name="stall-watchdog").start()

    def _watch(self) -> None:
        while True:
            time.sleep(WATCH)
            if time.perf_counter() - self._beat < HEARTBEAT + self.threshold:
                continue
            frame = sys._current_frames().get(self._loop_thread)
            name = _where(frame)
            with self._lock:
                self._samples[name] = self._samples.get(name, 0) + 1

    # ------------------------------------------------------------ timed calls

    def time_method(self, cls, name: str, label: str) -> None:
        original = getattr(cls, name)
        hist = self.timed.setdefault(label, Histogram())

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                hist.add((time.perf_counter() - t) * 1000)
        timed.__name__ = original.__name__
        setattr(cls, name, timed)

    def time_coroutine(self, cls, name: str, label: str) -> None:
        """Each step of the coroutine (loop time it holds, not its waits)."""
        original = getattr(cls, name)
        hist = self.timed.setdefault(label, Histogram())

        async def timed(*args, **kwargs):
            coro = original(*args, **kwargs)
            value, error = None, None
            while True:
                t = time.perf_counter()
                try:
                    fut = coro.send(value) if error is None else coro.throw(error)
                except StopIteration as stop:
                    hist.add((time.perf_counter() - t) * 1000)
                    return stop.value
                hist.add((time.perf_counter() - t) * 1000)
                value, error = None, None
                try:
                    value = await _Yield(fut)
                except BaseException as exc:        # cancellation, a failed wait
                    error = exc
        setattr(cls, name, timed)

    # ------------------------------------------------------------ gc

    def on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            now = time.perf_counter()
            ms = (now - self._gc_start) * 1000
            self.gc[info["generation"]].add(ms)
            if ms >= self.threshold * 1000 and len(self.gc_long) < 1000:
                self.gc_long.append((round(now - self.t0, 3), info["generation"], round(ms, 2),
                                     info["collected"]))

    def report(self) -> dict:
        self.longest.sort(key=lambda s: -s[0])
        return {
            "seconds": round(time.perf_counter() - self.t0, 1),
            "threshold_ms": self.threshold * 1000, "heartbeats": self.heartbeats,
            "stalls": self.stalls.json(),
            "stall_ms_by_frame": dict(sorted(((k, round(v, 1)) for k, v in self.by_frame.items()),
                                             key=lambda kv: -kv[1])[:40]),
            "longest": [{"ms": round(ms, 2), "at_s": round(at, 3),
                         "samples": dict(sorted(s.items(), key=lambda kv: -kv[1])[:6])}
                        for ms, at, s in self.longest[:KEEP]],
            "by_second": [[t, n, round(ms, 1), round(mx, 2)]
                          for t, (n, ms, mx) in sorted(self.by_second.items())],
            "timed": {k: h.json() for k, h in self.timed.items()},
            "gc": {f"gen{g}": h.json() for g, h in self.gc.items()},
            "gc_over_threshold": [{"at_s": a, "gen": g, "ms": ms, "collected": c}
                                  for a, g, ms, c in self.gc_long],
            "gc_thresholds": gc.get_threshold(), "gc_frozen": gc.get_freeze_count(),
        }


class _Yield:
    """Hand one future to the task and return what it resumes with."""

    def __init__(self, fut) -> None:
        self.fut = fut

    def __await__(self):
        return (yield self.fut)


def _where(frame) -> str:
    """The innermost frames of the loop thread, outside asyncio and uvloop."""
    names = []
    while frame is not None and len(names) < 3:
        code = frame.f_code
        path = code.co_filename
        if "/asyncio/" not in path and "stalltrace" not in path:
            short = path.rsplit("/", 2)
            names.append(f"{code.co_name} ({'/'.join(short[-2:])}:{frame.f_lineno})")
        frame = frame.f_back
    if not names or names[0].startswith(("run (", "_serve (", "main (")):
        return "loop:C (a core flush or read called by the loop)"
    return " < ".join(names)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stalltrace")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold-ms", type=float, default=1.0)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    args = p.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    tracer = Tracer(args.threshold_ms)
    sys.setswitchinterval(WATCH)
    gc.callbacks.append(tracer.on_gc)

    from fanout.server import admin, node, rooms
    tracer.time_method(node.Node, "_sweep", "Node._sweep")
    tracer.time_method(node.Node, "_presence", "Node._presence")
    tracer.time_method(rooms.RoomTable, "send_presence", "RoomTable.send_presence")
    for name in ("_sweep_slice", "_presence_room"):          # after the fix
        if hasattr(node.Node, name):
            tracer.time_method(node.Node, name, f"Node.{name}")
    tracer.time_coroutine(admin.AdminServer, "publish", "admin publish (per step)")
    original_start = node.Node.start

    async def start(self):
        await original_start(self)
        tracer.start_heartbeat(self.loop)
    node.Node.start = start

    def dump():
        with open(args.out, "w") as fh:
            json.dump(tracer.report(), fh, indent=1)
    atexit.register(dump)
    from fanout.cli import main as fanout_main
    return fanout_main(rest)


if __name__ == "__main__":
    sys.exit(main())
