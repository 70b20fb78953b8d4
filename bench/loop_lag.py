"""Event-loop lag while a large room flushes, against the idle loop.

    .venv/bin/python bench/loop_lag.py [--members 9000] [--threads 1]
        [--seconds 1] [--repeat 5]

A probe on the loop sleeps PROBE_S again and again and records how late
each wake-up is (time.perf_counter). It runs twice on the same fixture:

  idle   nothing else on the loop;
  flush  a room of N members on socketpairs gets a record and a flush every
         FLUSH_EVERY_S, which is one frame to every member.

With the core's writer threads (--threads >= 1) the loop only snapshots and
reconciles each round; with --threads 0 it makes every send() itself, which
is what the CI gate (bench/perf_check.py, loop_lag_idle_vs_flush) must catch.
The report is the p99 lag of each (numpy percentiles) and their ratio.

N is 9,000 by default: the machine allows 20,000 open files per process and
each member is a socketpair (two fds). Frames are small, so socket buffers
never fill during a window and nothing is drained while the probe runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import statistics
import time

import numpy as np
import uvloop

try:        # as part of the bench package (python -m bench.loop_lag, bench.perf_check)
    from bench import fanout_socketpairs as fs
except ImportError:  # as a script: bench/ is sys.path[0]
    import fanout_socketpairs as fs
from fanout import _core
from fanout.protocol import fanout_pb2 as pb

PROBE_S = 0.001
FLUSH_EVERY_S = 0.02
ROOM, EPOCH = "lag", "e"
RECORD_PAYLOAD = b"x" * 150


def members_allowed(wanted: int) -> int:
    """As many members as the open-file limit allows, at most ``wanted``."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(1, min(wanted, (limit - 600) // 2))


class LagFixture:
    """A Hub with one room of ``members`` socketpair members."""

    def __init__(self, loop: asyncio.AbstractEventLoop, members: int, threads: int):
        self.loop = loop
        self.hub = _core.Hub(loop, max_delay=0.0, compress_min=0, write_threads=threads,
                             thread_min_members=256)
        self.room = self.hub.room(ROOM, EPOCH, 0)
        self.conns, self.peers = [], []
        for a, b in fs.socketpairs(members):
            conn = _core.TcpConnection(a.detach(), loop, max_backlog_bytes=1 << 24)
            self.room.add(conn)
            self.conns.append(conn)
            self.peers.append(b)
        self.seq = 0
        self._buf = bytearray(1 << 16)

    async def _flusher(self) -> None:
        while True:
            self.seq += 1
            record = _core.encode_room_message(ROOM, self.seq, pb.CHAT, 0, "u",
                                               RECORD_PAYLOAD, 0)
            self.hub.publish(ROOM, EPOCH, self.seq, record)
            self.hub.flush(ROOM)
            await asyncio.sleep(FLUSH_EVERY_S)

    async def p99_lag(self, seconds: float, flushing: bool) -> float:
        """The probe's p99 lateness over ``seconds``, in seconds."""
        lags = []
        flusher = asyncio.ensure_future(self._flusher()) if flushing else None
        await asyncio.sleep(0)
        end = time.perf_counter() + seconds
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    break
                await asyncio.sleep(PROBE_S)
                lags.append(time.perf_counter() - t0 - PROBE_S)
        finally:
            if flusher is not None:
                flusher.cancel()
                try:
                    await flusher
                except asyncio.CancelledError:
                    pass
        self.hub.settle()
        fs.drain(self.peers, self._buf)
        return float(np.percentile(np.asarray(lags), 99))

    def close(self) -> None:
        self.hub.close()
        for c in self.conns:
            c.close()
        for p in self.peers:
            p.close()


def run(loop: asyncio.AbstractEventLoop, members: int, threads: int, seconds: float,
        flushing: bool) -> float:
    """One measurement on a fresh fixture: the p99 lag in seconds."""
    fix = LagFixture(loop, members, threads)
    try:
        gc.collect()
        return loop.run_until_complete(fix.p99_lag(seconds, flushing))
    finally:
        fix.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=9000)
    ap.add_argument("--threads", type=int, default=1,
                    help="the core's writer threads (0: the loop writes)")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    members = members_allowed(args.members)
    loop = uvloop.new_event_loop()
    idle, busy = [], []
    try:
        for i in range(args.repeat):
            idle.append(run(loop, members, args.threads, args.seconds, False))
            busy.append(run(loop, members, args.threads, args.seconds, True))
            print(f"  repeat {i + 1}: idle p99 {idle[-1] * 1e3:.2f} ms, "
                  f"flushing p99 {busy[-1] * 1e3:.2f} ms")
    finally:
        loop.close()
    mi, mb = statistics.median(idle), statistics.median(busy)
    print(f"members {members}, writer threads {args.threads}, a flush every "
          f"{FLUSH_EVERY_S * 1e3:.0f} ms: loop lag p99 idle {mi * 1e3:.2f} ms, "
          f"flushing {mb * 1e3:.2f} ms (medians of {args.repeat}); idle/flushing {mi / mb:.2f}")


if __name__ == "__main__":
    main()
