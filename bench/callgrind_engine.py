"""The engine's fan-out rounds alone, for an instruction count that noise
cannot move (docs/benchmarks.md, "Before and after the structure work").

    valgrind --tool=callgrind --callgrind-out-file=build/cg.out \\
        .venv/bin/python bench/callgrind_engine.py [--rounds 400] [--members 100] [--metrics]
    callgrind_annotate --inclusive=yes --auto=no build/cg.out | grep -E 'Hub_|send_'

Run it from the root of the tree to measure: it uses that tree's
``bench/fanout_socketpairs.py`` and build, so the same file measures an
older checkout too.

Runs :class:`bench.fanout_socketpairs.EngineFanout` (one frame to every
member per round, peers drained after each) and nothing else; callgrind
counts user-space instructions only, so the kernel's share of a write is not
in them. Compare the inclusive counts of ``Hub.publish`` + ``Hub.flush``
(the timed work of a round) between two builds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.getcwd())

import uvloop  # noqa: E402

from bench.fanout_socketpairs import EngineFanout  # noqa: E402


async def rounds(members: int, count: int, frame_bytes: int, observer: bool) -> None:
    eng = EngineFanout(asyncio.get_running_loop(), members, frame_bytes, observer=observer)
    try:
        await eng.run(count)
        eng.check_sent()
    finally:
        eng.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--members", type=int, default=100)
    ap.add_argument("--frame-bytes", type=int, default=2048)
    ap.add_argument("--metrics", action="store_true",
                    help="with a node's metrics on (the engine_obs variant)")
    args = ap.parse_args()
    uvloop.run(rounds(args.members, args.rounds, args.frame_bytes, args.metrics))


if __name__ == "__main__":
    main()
