"""Fan-out of one frame to N socketpairs: the engine's write path against a
naive Python loop and a C baseline, measured in one run.

    .venv/bin/python bench/fanout_socketpairs.py [--members 1000]
        [--frame-bytes 2048] [--rounds 200] [--repeat 5] [--json out.json]

Variants, each on N fresh AF_UNIX socketpairs:

  engine  fanout._core Hub + Room with N Connection members; per round one
          hub.publish() + hub.flush() (one frame to every member);
  naive   the same frame bytes, sock.send(frame) in a Python for-loop;
  c       bench/c_reference.c (compiled here with cc -O2): one writev per
          socket in C, the kernel's cost with nothing above it;
  c_send  the same C loop calling send(MSG_DONTWAIT | MSG_NOSIGNAL), the
          call the engine's fast path makes (its writev only drains a
          backlog). writev also pays the generic file-write path, so c_send
          is the like-for-like floor and c the writev baseline.

Each round is timed around the writes only; every peer is then drained (not
timed) so socket buffers never fill and every write is a whole-frame write.
Repeats interleave the variants (engine, naive, c, c_send, engine, ...) so a noisy
neighbour hurts every variant alike; the report is the median per variant and
the ratios between medians. Absolute rates are not comparable across runs on
a shared machine; the ratios are the result.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import uvloop

from fanout import _core
from fanout.wire import FrameType

ROOT = Path(__file__).resolve().parent.parent
C_SOURCE = ROOT / "bench" / "c_reference.c"
C_BINARY = ROOT / "build" / "c_reference"
ROOM, EPOCH, SENDER = "bench", "e1", "s"
HEADER = 8
# Seqs in [2**14, 2**21) encode as a 3-byte varint, so every round's record,
# and therefore every frame, has exactly the same size.
FIRST_SEQ = 1 << 14
TS_MS = 1_763_900_000_000
MAX_FRAME = 64 * 1024   # well under the AF_UNIX send buffer: no short writes


# ---------------------------------------------------------------- helpers

def machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "uvloop": uvloop.__version__,
        "loadavg": os.getloadavg()[0],
    }


def record_for(seq: int, frame_bytes: int) -> bytes:
    """A RoomMessage record whose uncompressed BATCH frame is frame_bytes."""
    def rec(n: int) -> bytes:
        return _core.encode_room_message(ROOM, seq, 1, 0, SENDER, b"x" * n, TS_MS)
    overhead = HEADER + len(rec(0))
    if frame_bytes < overhead:
        raise SystemExit(f"--frame-bytes must be at least {overhead}")
    n = frame_bytes - overhead
    # The payload's length varint grows with n; shrink until it fits exactly.
    while n > 0 and HEADER + len(rec(n)) > frame_bytes:
        n -= 1
    record = rec(n)
    if HEADER + len(record) != frame_bytes:   # e.g. a 1-byte gap a varint skips
        raise SystemExit(f"cannot build a frame of exactly {frame_bytes} bytes")
    return record


def socketpairs(n: int) -> list[tuple[socket.socket, socket.socket]]:
    pairs = []
    for _ in range(n):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.setblocking(False)
        b.setblocking(False)
        pairs.append((a, b))
    return pairs


def drain(peers: list[socket.socket], buf: bytearray) -> int:
    """Read every peer empty; returns the bytes read."""
    total = 0
    for s in peers:
        while True:
            try:
                got = s.recv_into(buf)
            except BlockingIOError:
                break
            if not got:
                raise RuntimeError("peer saw EOF during the benchmark")
            total += got
    return total


# ---------------------------------------------------------------- variants

class Owner:
    """The control-layer stand-in: the core reports slow/dead members here."""

    def __init__(self, failures: list[int]):
        self.failures = failures

    def connection_failed(self, status: int) -> None:
        self.failures.append(status)

    def connection_lost(self) -> None:
        pass


async def run_engine(n: int, frame_bytes: int, rounds: int) -> dict:
    loop = asyncio.get_running_loop()
    pairs = socketpairs(n)
    peers = [p for _, p in pairs]
    # compress_min=0: the frame is exactly the record, so every variant
    # writes the same number of bytes (lz4 belongs to another benchmark).
    hub = _core.Hub(loop, compress_min=0)
    room = hub.room(ROOM, EPOCH, FIRST_SEQ - 1)
    failures: list[int] = []
    conns = []
    for node_side, _ in pairs:
        conn = _core.Connection(node_side.detach(), loop, max_backlog_bytes=1 << 24)
        conn.owner = Owner(failures)
        room.add(conn)
        conns.append(conn)
    expected = n * frame_bytes
    buf = bytearray(MAX_FRAME)
    seconds = 0.0
    queued = 0
    seq = FIRST_SEQ
    try:
        for r in range(rounds + 1):            # round 0 is an untimed warm-up
            record = record_for(seq, frame_bytes)
            t0 = time.perf_counter()
            hub.publish(ROOM, EPOCH, seq, record)
            hub.flush(ROOM)
            elapsed = time.perf_counter() - t0
            seq += 1
            # A member left with a backlog took a short write; its rest goes
            # out when the loop sees the socket writable, so let it run.
            queued += sum(1 for c in conns if c.backlog_frames)
            got = 0
            if r == 0:
                # The engine must write exactly the frame the other variants do.
                first = peers[0].recv(MAX_FRAME)
                if first != _core.pack_frame(FrameType.BATCH, record):
                    raise RuntimeError("engine frame differs from pack_frame(BATCH, record)")
                got = len(first)
            got += drain(peers, buf)
            deadline = time.monotonic() + 5
            while got < expected and not failures and time.monotonic() < deadline:
                await asyncio.sleep(0)
                got += drain(peers, buf)
            if failures:
                raise RuntimeError(f"engine round {r}: members failed with {failures[:5]}")
            if got != expected:
                raise RuntimeError(f"engine round {r}: peers got {got} bytes, want {expected}")
            if r:
                seconds += elapsed
            # Let the flush the publish scheduled (call_soon) run and find the
            # room empty, as it would in a node, so nothing piles up.
            await asyncio.sleep(0)
        sent = sum(c.frames_sent for c in conns)
        if sent != n * (rounds + 1):
            raise RuntimeError(f"engine sent {sent} frames, want {n * (rounds + 1)}")
    finally:
        for c in conns:
            c.close()
        for p in peers:
            p.close()
    return {"writes_per_s": n * rounds / seconds, "seconds": seconds,
            "failures": len(failures), "short_writes": queued}


def run_naive(n: int, frame_bytes: int, rounds: int) -> dict:
    pairs = socketpairs(n)
    nodes = [a for a, _ in pairs]
    peers = [b for _, b in pairs]
    frame = _core.pack_frame(FrameType.BATCH, record_for(FIRST_SEQ, frame_bytes))
    expected = n * frame_bytes
    buf = bytearray(MAX_FRAME)
    seconds = 0.0
    short = eagain = 0
    try:
        for r in range(rounds + 1):            # round 0 is an untimed warm-up
            t0 = time.perf_counter()
            for s in nodes:
                try:
                    if s.send(frame) != frame_bytes:
                        short += 1
                except BlockingIOError:
                    eagain += 1
            elapsed = time.perf_counter() - t0
            got = drain(peers, buf)
            if r:
                seconds += elapsed
            if got != expected and not (short or eagain):
                raise RuntimeError(f"naive round {r}: peers got {got} bytes, want {expected}")
    finally:
        for a, b in pairs:
            a.close()
            b.close()
    return {"writes_per_s": n * rounds / seconds, "seconds": seconds,
            "short_writes": short, "eagain": eagain}


def build_c() -> None:
    cc = os.environ.get("CC") or shutil.which("cc")
    if not cc:
        raise SystemExit("no C compiler (cc) found: the C baseline is part of the result")
    C_BINARY.parent.mkdir(exist_ok=True)
    subprocess.run([cc, "-O2", "-Wall", "-o", str(C_BINARY), str(C_SOURCE)], check=True)


def run_c(n: int, frame_bytes: int, rounds: int, call: str) -> dict:
    # Exit status 1 still comes with a JSON line (errors counted in it).
    proc = subprocess.run([str(C_BINARY), str(n), str(frame_bytes), str(rounds), call],
                          capture_output=True, text=True)
    if not proc.stdout.strip():
        raise RuntimeError(f"c_reference {call} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=1000)
    ap.add_argument("--frame-bytes", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", metavar="PATH", help="also write the results here")
    args = ap.parse_args(argv)
    n, size, rounds = args.members, args.frame_bytes, args.rounds
    if not 0 < size <= MAX_FRAME:
        ap.error(f"--frame-bytes must be in 1..{MAX_FRAME}")
    if n < 1 or rounds < 1 or args.repeat < 1:
        ap.error("--members, --rounds and --repeat must be positive")
    # Each variant holds 2n fds at a time (closed before the next one runs).
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if 2 * n + 64 > limit:
        ap.error(f"--members {n} needs {2 * n + 64} fds, the limit is {limit}")
    if rounds + 1 >= (1 << 21) - FIRST_SEQ:
        ap.error("--rounds too large for fixed-size records")

    info = machine()
    print("machine: {nproc} CPUs, {cpu_model}; Python {python}, uvloop {uvloop}; "
          "kernel {kernel}; load {loadavg:.2f}".format(**info))
    print(f"members {n}, frame {size} B, rounds {rounds}, repeat {args.repeat}")
    build_c()

    loop = uvloop.new_event_loop()
    runs: dict[str, list[dict]] = {"engine": [], "naive": [], "c": [], "c_send": []}
    try:
        for i in range(args.repeat):
            for name in runs:
                gc.collect()   # a collection inside a timed loop is noise
                if name == "engine":
                    res = loop.run_until_complete(run_engine(n, size, rounds))
                elif name == "naive":
                    res = run_naive(n, size, rounds)
                elif name == "c":
                    res = run_c(n, size, rounds, "writev")
                else:
                    res = run_c(n, size, rounds, "send")
                runs[name].append(res)
            print(f"  repeat {i + 1}: " + ", ".join(
                f"{k} {v[-1]['writes_per_s'] / 1e3:.0f}k/s" for k, v in runs.items()))
    finally:
        loop.close()

    variants = {}
    for name, rs in runs.items():
        rates = [r["writes_per_s"] for r in rs]
        variants[name] = {
            "writes_per_s": statistics.median(rates),
            "min": min(rates), "max": max(rates),
            "failures": sum(r.get("failures", 0) for r in rs),
            "short_writes": sum(r.get("short_writes", 0) for r in rs),
            "eagain": sum(r.get("eagain", 0) for r in rs),
            "errors": sum(r.get("errors", 0) for r in rs),
            "runs": rates,
        }
    eng = variants["engine"]["writes_per_s"]
    ratios = {"engine/c": eng / variants["c"]["writes_per_s"],
              "engine/c_send": eng / variants["c_send"]["writes_per_s"],
              "engine/naive": eng / variants["naive"]["writes_per_s"]}

    print()
    print(f"{'variant':8} {'median writes/s':>16} {'min':>10} {'max':>10} "
          f"{'ns/write':>9}  short/eagain/fail")
    for name, v in variants.items():
        print(f"{name:8} {v['writes_per_s']:16,.0f} {v['min']:10,.0f} {v['max']:10,.0f} "
              f"{1e9 / v['writes_per_s']:9.0f}  "
              f"{v['short_writes']}/{v['eagain']}/{v['failures'] + v['errors']}")
    print("   ".join(f"{k} {v:.2f}" for k, v in ratios.items()))

    result = {
        "machine": info,
        "params": {"members": n, "frame_bytes": size, "rounds": rounds,
                   "repeat": args.repeat},
        "command": " ".join([".venv/bin/python", "bench/fanout_socketpairs.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "variants": variants,
        "ratios": ratios,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if any(v["failures"] or v["errors"] for v in variants.values()):
        raise SystemExit("failed connections or write errors: the figures are invalid")
    return result


if __name__ == "__main__":
    main()
