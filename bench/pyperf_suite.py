"""pyperf suite of fanout's hot paths.

    .venv/bin/python bench/pyperf_suite.py -o build/pyperf.json    # or: make bench
    .venv/bin/python bench/pyperf_suite.py --fast --only 'fanout*,c_*'
    .venv/bin/python -m pyperf show build/pyperf.json

Every benchmark reports time per unit of work (pyperf's ``inner_loops``):

  batch_build_compress            per flush: encode_room_message x200 on the
                                  ~50 B chat/gift corpus + pack_frame with lz4
  fanout_1000_socketpairs         per write: engine Hub.publish + Hub.flush, one
                                  frame (2,048 B) to 1,000 Connection members
  naive_fanout_1000_socketpairs   per write: sock.send(frame) in a Python loop
  c_fanout_1000_socketpairs       per write: bench/c_reference.c, send() per
                                  socket (the like-for-like C baseline); the C
                                  program times its own write loops and the
                                  suite reports that time
  frame_decode                    per frame: fanout._core.parse_frames on a
                                  stream of 40 Batch frames (mostly 200 messages,
                                  lz4)
  frame_decode_wire               per frame: fanout.protocol.wire.FrameDecoder.feed on the
                                  same stream (the pure-Python reference)
  frame_decode_chat[_wire]        the same two on 400 small Chat/Ping frames,
                                  what a node reads (framing cost, no lz4)
  auth_verify                     per token: fanout.protocol.auth.verify of a Hello JWT

The fan-out benchmarks share their setup with bench/fanout_socketpairs.py: a
round writes one frame to every member (timed), then every peer is drained
(not timed). After the run, the suite prints the ratios between medians
(engine/C, engine/naive, core/wire decode). pyperf runs the benchmarks one
after another, not interleaved, so these ratios are noisier than those of
bench/perf_check.py and bench/fanout_socketpairs.py.

Every process of the suite calls workloads.steady_malloc(), so glibc keeps
freed memory. Without it, decoding Batch frames measured mostly page faults,
whose cost depended on what the process had run before.
"""

from __future__ import annotations

import fnmatch
import sys
import time

import pyperf
import uvloop

try:        # as part of the bench package (pytest, python -m bench....)
    from bench import fanout_socketpairs as fs, workloads as w
except ImportError:  # as a script: bench/ is sys.path[0]
    import fanout_socketpairs as fs
    import workloads as w
from fanout import _core

MEMBERS = 1000
FRAME_BYTES = 2048


# Each time function gets pyperf's loop count and returns the seconds of the
# measured work only. Fixtures are built on first use, in the worker process.
_state: dict[str, object] = {}


def time_batch_build(loops: int) -> float:
    msgs = w.corpus()
    build = w.build_batch
    t0 = time.perf_counter()
    for _ in range(loops):
        build(msgs)
    return time.perf_counter() - t0


def time_engine_fanout(loops: int) -> float:
    eng = _state.get("engine")
    if eng is None:
        loop = uvloop.new_event_loop()
        eng = fs.EngineFanout(loop, MEMBERS, FRAME_BYTES)
        _state["engine"], _state["loop"] = eng, loop
        loop.run_until_complete(eng.run(1))            # checks the frame once
    return _state["loop"].run_until_complete(eng.run(loops))


def time_naive_fanout(loops: int) -> float:
    naive = _state.get("naive")
    if naive is None:
        naive = _state["naive"] = fs.NaiveFanout(MEMBERS, FRAME_BYTES)
        naive.run(1)
    return naive.run(loops)


def time_c_fanout(loops: int) -> float:
    res = fs.run_c(MEMBERS, FRAME_BYTES, loops, "send")
    if res["short_writes"] or res["eagain"] or res["errors"]:
        raise RuntimeError(f"c_reference: not a clean run: {res}")
    return res["seconds"]


STREAMS = {"batch": w.batch_stream, "chat": w.chat_stream}
DECODERS = {"core": w.decode_core, "wire": w.decode_wire}


def time_decode(loops: int, stream_name: str, decoder: str) -> float:
    key = "stream_" + stream_name
    if key not in _state:
        _state[key] = STREAMS[stream_name]()
    stream, _ = _state[key]
    decode = DECODERS[decoder]
    t0 = time.perf_counter()
    for _ in range(loops):
        decode(stream)
    return time.perf_counter() - t0


def time_auth_verify(loops: int) -> float:
    token = w.auth_token()
    verify = w.verify
    t0 = time.perf_counter()
    for _ in range(loops):
        verify(token)
    return time.perf_counter() - t0


BENCHMARKS = [
    # name, time function, inner loops (units of work per loop), extra args
    ("batch_build_compress", time_batch_build, 1, ()),
    ("fanout_1000_socketpairs", time_engine_fanout, MEMBERS, ()),
    ("naive_fanout_1000_socketpairs", time_naive_fanout, MEMBERS, ()),
    ("c_fanout_1000_socketpairs", time_c_fanout, MEMBERS, ()),
    ("frame_decode", time_decode, "batch", ("batch", "core")),
    ("frame_decode_wire", time_decode, "batch", ("batch", "wire")),
    ("frame_decode_chat", time_decode, "chat", ("chat", "core")),
    ("frame_decode_chat_wire", time_decode, "chat", ("chat", "wire")),
    ("auth_verify", time_auth_verify, 1, ()),
]

# (label, numerator benchmark, denominator benchmark): time(den) / time(num),
# i.e. how many times faster the first is; 1.0 means as fast.
RATIOS = [
    ("engine/c_send fan-out (1,000 members)", "fanout_1000_socketpairs",
     "c_fanout_1000_socketpairs"),
    ("engine/naive fan-out (1,000 members)", "fanout_1000_socketpairs",
     "naive_fanout_1000_socketpairs"),
    ("core/wire decode, Batch frames", "frame_decode", "frame_decode_wire"),
    ("core/wire decode, Chat frames", "frame_decode_chat", "frame_decode_chat_wire"),
]


def _add_cmdline_args(cmd: list[str], args) -> None:
    # Workers count benchmarks by position, so they must see the same filter.
    if args.only:
        cmd.extend(("--only", args.only))


def main() -> None:
    runner = pyperf.Runner(add_cmdline_args=_add_cmdline_args)
    runner.argparser.add_argument(
        "--only", metavar="GLOBS", default="",
        help="comma-separated name patterns of the benchmarks to run (default: all)")
    args = runner.parse_args()
    steady = w.steady_malloc()            # in the manager and in every worker
    patterns = [p for p in args.only.split(",") if p]
    selected = [b for b in BENCHMARKS
                if not patterns or any(fnmatch.fnmatch(b[0], p) for p in patterns)]
    if not selected:
        sys.exit(f"--only {args.only!r} matches none of: "
                 + ", ".join(b[0] for b in BENCHMARKS))
    if not args.worker:
        fs.build_c()
    info = fs.machine()
    runner.metadata["fanout_machine"] = (
        "{nproc} CPUs, {cpu_model}; uvloop {uvloop}; load {loadavg:.2f}".format(**info))
    runner.metadata["fanout_core"] = _core.__file__
    runner.metadata["fanout_steady_malloc"] = str(steady)

    results = {}
    for name, func, inner, extra in selected:
        if isinstance(inner, str):          # per frame of that stream
            inner = STREAMS[inner]()[1]
        results[name] = runner.bench_time_func(name, func, *extra, inner_loops=inner)

    if args.worker:
        return
    # Ratios between medians (time per unit of work) of this run.
    rows = [(label, results.get(a), results.get(b)) for label, a, b in RATIOS]
    rows = [(label, a, b) for label, a, b in rows if a is not None and b is not None]
    if rows:
        print()
        print("ratios of medians (how many times faster; pyperf runs are not interleaved):")
        for label, a, b in rows:
            print(f"  {label:40} {b.median() / a.median():6.2f}")


if __name__ == "__main__":
    main()
