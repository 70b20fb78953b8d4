"""Fan-out of one frame to N socketpairs: the engine's write path against a
naive Python loop and a C baseline, measured in one run.

    .venv/bin/python bench/fanout_socketpairs.py [--members 1000]
        [--frame-bytes 2048] [--rounds 200] [--repeat 5] [--ws] [--json out.json]

Variants, each on N fresh AF_UNIX socketpairs:

  engine  fanout._core Hub + Room with N Connection members; per round one
          hub.publish() + hub.flush() (one frame to every member), written
          on the loop thread;
  engine_t1, engine_t2  the same written by 1 or 2 of the core's writer
          threads (the timed part waits for the round: hub.settle());
  engine_ws  (--ws) the engine with WebSocket members (_core.WsConnection,
          past the opening handshake): the same frame in one binary message,
          its header written once per round into the frame's headroom; each
          write is the frame and 2-10 bytes more;
  engine_obs  (--variants) the engine with a node's metrics on, as a node
          runs it (NodeMetrics.observe_flush once per frame, and the hub's
          delivery latency histogram): at few members, their per-frame cost;
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

Also a module: bench/pyperf_suite.py, bench/perf_check.py and
bench/test_micro.py reuse EngineFanout, NaiveFanout, run_c and measure().
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
from fanout.protocol.wire import FrameType

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
SEQ_LIMIT = 1 << 21     # first seq whose varint is 4 bytes
VARIANTS = ("engine", "naive", "c", "c_send")


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


class EngineFanout:
    """The engine variant's fixture: one Hub room whose n members are
    Connections on fresh socketpairs. :meth:`run` times rounds of
    ``hub.publish()`` + ``hub.flush()`` (one frame to every member) and drains
    the peers untimed after each. Also used by bench/pyperf_suite.py,
    bench/perf_check.py and bench/test_micro.py."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int, frame_bytes: int,
                 threads: int = 0, kind: str = "tcp", observer: bool = False):
        self.n, self.frame_bytes = n, frame_bytes
        self.kind = kind
        # what a member's socket gets per round: the frame, in a WebSocket
        # message for kind "ws"
        self.ws_head = ws_header(frame_bytes) if kind == "ws" else b""
        self.wire_bytes = frame_bytes + len(self.ws_head)
        pairs = socketpairs(n)
        self.peers = [p for _, p in pairs]
        # compress_min=0: the frame is exactly the record, so every variant
        # writes the same number of bytes (lz4 belongs to another benchmark).
        # threads: the core's writer threads write the round (and the timed
        # part waits for them), else the loop thread does.
        self.threads = threads
        self.hub = _core.Hub(loop, compress_min=0, write_threads=threads, thread_min_members=1)
        if observer:
            from fanout.server.metrics import NodeMetrics
            metrics = NodeMetrics()
            self.hub.flush_observer = metrics.observe_flush
            metrics.track_delivery_latency(self.hub)
        self.room = self.hub.room(ROOM, EPOCH, FIRST_SEQ - 1)
        self.failures: list[int] = []
        self.conns: list = []
        try:
            for node_side, peer in pairs:
                if kind == "ws":
                    conn = _core.WsConnection(node_side.detach(), loop,
                                              max_backlog_bytes=1 << 24)
                    ws_open(conn, peer)
                else:
                    conn = _core.TcpConnection(node_side.detach(), loop,
                                               max_backlog_bytes=1 << 24)
                conn.owner = Owner(self.failures)
                self.room.add(conn)
                self.conns.append(conn)
        except BaseException:
            self.close()
            for node_side, _ in pairs:
                node_side.close()
            raise
        self.seq = FIRST_SEQ
        self.rounds_done = 0
        self.short_writes = 0      # members left with a backlog after a flush
        self._checked = False
        self._buf = bytearray(MAX_FRAME)

    def publish_flush(self, record: bytes) -> None:
        """The timed work of one round: one record in, one frame to every member."""
        self.hub.publish(ROOM, EPOCH, self.seq, record)
        self.hub.flush(ROOM)
        if self.threads:
            self.hub.settle()
        self.seq += 1

    def next_record(self) -> bytes:
        if self.seq >= SEQ_LIMIT:
            raise RuntimeError("too many rounds for fixed-size records")
        return record_for(self.seq, self.frame_bytes)

    async def settle(self, record: bytes) -> None:
        """After a round (untimed): check and drain what every peer got."""
        expected = self.n * self.wire_bytes
        peers = self.peers
        # A member left with a backlog took a short write; its rest goes
        # out when the loop sees the socket writable, so let it run.
        self.short_writes += sum(1 for c in self.conns if c.backlog_frames)
        got = 0
        if not self._checked:
            # The engine must write exactly the frame the other variants do.
            first = peers[0].recv(MAX_FRAME)
            if first != self.ws_head + _core.pack_frame(FrameType.BATCH, record):
                raise RuntimeError("engine frame differs from pack_frame(BATCH, record)")
            got = len(first)
            self._checked = True
        got += drain(peers, self._buf)
        deadline = time.monotonic() + 5
        while got < expected and not self.failures and time.monotonic() < deadline:
            await asyncio.sleep(0)
            got += drain(peers, self._buf)
        if self.failures:
            raise RuntimeError(f"engine round {self.rounds_done}: members failed "
                               f"with {self.failures[:5]}")
        if got != expected:
            raise RuntimeError(f"engine round {self.rounds_done}: peers got {got} bytes, "
                               f"want {expected}")
        self.rounds_done += 1
        # Let the flush the publish scheduled (call_soon) run and find the
        # room empty, as it would in a node, so nothing piles up.
        await asyncio.sleep(0)

    async def run(self, rounds: int) -> float:
        """Run ``rounds`` rounds; returns the seconds spent in the writes."""
        seconds = 0.0
        for _ in range(rounds):
            record = self.next_record()
            t0 = time.perf_counter()
            self.publish_flush(record)
            seconds += time.perf_counter() - t0
            await self.settle(record)
        return seconds

    def check_sent(self) -> None:
        sent = sum(c.frames_sent for c in self.conns)
        if sent != self.n * self.rounds_done:
            raise RuntimeError(f"engine sent {sent} frames, want {self.n * self.rounds_done}")

    def close(self) -> None:
        self.hub.close()
        for c in self.conns:
            c.close()
        for p in self.peers:
            p.close()


def ws_header(frame_bytes: int) -> bytes:
    """A server's header of a binary WebSocket message of ``frame_bytes``."""
    if frame_bytes < 126:
        return bytes([0x82, frame_bytes])
    if frame_bytes <= 0xFFFF:
        return bytes([0x82, 126]) + frame_bytes.to_bytes(2, "big")
    return bytes([0x82, 127]) + frame_bytes.to_bytes(8, "big")


def ws_open(conn, peer: socket.socket) -> None:
    """Take a WsConnection through its opening handshake (the node's
    answer is not checked here: tests/test_websocket.py does)."""
    peer.send(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: ZmFub3V0LWxvYWQtdmlldw==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    items = conn.read()
    if not items or items[0][0] != _core.UPGRADE_REQUEST:
        raise RuntimeError(f"WebSocket connection read {items!r}, not its upgrade request")
    if not conn.accept_upgrade(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"):
        raise RuntimeError("the 101 did not fit the socket")
    if not peer.recv(4096).startswith(b"HTTP/1.1 101"):
        raise RuntimeError("no 101 on the peer")


async def run_engine(n: int, frame_bytes: int, rounds: int, threads: int = 0,
                     kind: str = "tcp", observer: bool = False) -> dict:
    eng = EngineFanout(asyncio.get_running_loop(), n, frame_bytes, threads, kind, observer)
    try:
        await eng.run(1)                       # an untimed warm-up round
        seconds = await eng.run(rounds)
        eng.check_sent()
    finally:
        eng.close()
    return {"writes_per_s": n * rounds / seconds, "seconds": seconds,
            "failures": len(eng.failures), "short_writes": eng.short_writes}


class NaiveFanout:
    """The naive variant's fixture: the same frame bytes, ``sock.send(frame)``
    in a Python for-loop over n socketpairs; :meth:`run` times the loops and
    drains the peers untimed after each."""

    def __init__(self, n: int, frame_bytes: int):
        self.n, self.frame_bytes = n, frame_bytes
        self.pairs = socketpairs(n)
        self.nodes = [a for a, _ in self.pairs]
        self.peers = [b for _, b in self.pairs]
        self.frame = _core.pack_frame(FrameType.BATCH, record_for(FIRST_SEQ, frame_bytes))
        self.short_writes = self.eagain = 0
        self.rounds_done = 0
        self._buf = bytearray(MAX_FRAME)

    def send_all(self) -> None:
        """The timed work of one round: one send per socket, from Python."""
        frame, size = self.frame, self.frame_bytes
        for s in self.nodes:
            try:
                if s.send(frame) != size:
                    self.short_writes += 1
            except BlockingIOError:
                self.eagain += 1

    def settle(self) -> None:
        """After a round (untimed): drain every peer and check the bytes."""
        got = drain(self.peers, self._buf)
        expected = self.n * self.frame_bytes
        if got != expected and not (self.short_writes or self.eagain):
            raise RuntimeError(f"naive round {self.rounds_done}: peers got {got} bytes, "
                               f"want {expected}")
        self.rounds_done += 1

    def run(self, rounds: int) -> float:
        """Run ``rounds`` rounds; returns the seconds spent in the send loops."""
        seconds = 0.0
        for _ in range(rounds):
            t0 = time.perf_counter()
            self.send_all()
            seconds += time.perf_counter() - t0
            self.settle()
        return seconds

    def close(self) -> None:
        for a, b in self.pairs:
            a.close()
            b.close()


def run_naive(n: int, frame_bytes: int, rounds: int) -> dict:
    naive = NaiveFanout(n, frame_bytes)
    try:
        naive.run(1)                           # an untimed warm-up round
        seconds = naive.run(rounds)
    finally:
        naive.close()
    return {"writes_per_s": n * rounds / seconds, "seconds": seconds,
            "short_writes": naive.short_writes, "eagain": naive.eagain}


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


def run_variant(name: str, n: int, frame_bytes: int, rounds: int,
                loop: asyncio.AbstractEventLoop) -> dict:
    """One repeat of one variant on fresh socketpairs (the C ones need
    :func:`build_c` first)."""
    if name == "engine":
        return loop.run_until_complete(run_engine(n, frame_bytes, rounds))
    if name == "engine_obs":
        return loop.run_until_complete(run_engine(n, frame_bytes, rounds, observer=True))
    if name == "engine_ws":
        return loop.run_until_complete(run_engine(n, frame_bytes, rounds, kind="ws"))
    if name.startswith("engine_t"):            # engine_t1, engine_t2: writer threads
        return loop.run_until_complete(run_engine(n, frame_bytes, rounds, int(name[8:])))
    if name == "naive":
        return run_naive(n, frame_bytes, rounds)
    if name == "c":
        return run_c(n, frame_bytes, rounds, "writev")
    if name == "c_send":
        return run_c(n, frame_bytes, rounds, "send")
    raise ValueError(f"unknown variant {name!r}")


def measure(n: int, frame_bytes: int, rounds: int, repeat: int,
            variants: tuple[str, ...] = VARIANTS, *,
            loop: asyncio.AbstractEventLoop | None = None,
            progress=None) -> dict[str, list[dict]]:
    """Interleaved repeats (engine, naive, c, c_send, engine, ...) so a noisy
    neighbour hurts every variant alike. Returns each variant's per-repeat
    results; ``progress(i, runs)`` is called after repeat ``i``."""
    own_loop = loop is None
    if own_loop:
        loop = uvloop.new_event_loop()
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    try:
        for i in range(repeat):
            for name in variants:
                gc.collect()   # a collection inside a timed loop is noise
                runs[name].append(run_variant(name, n, frame_bytes, rounds, loop))
            if progress is not None:
                progress(i, runs)
    finally:
        if own_loop:
            loop.close()
    return runs


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Median, min and max writes/s per variant, and the summed error counts."""
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
    return variants


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=1000)
    ap.add_argument("--frame-bytes", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", action="store_true",
                    help="also the engine written by 1 and 2 writer threads")
    ap.add_argument("--ws", action="store_true",
                    help="also the engine with WebSocket members (engine_ws)")
    ap.add_argument("--variants", metavar="A,B,...",
                    help="only these variants, in this order per repeat (e.g. "
                         "engine,engine_ws for an A/B of the two kinds)")
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
    if rounds + 1 >= SEQ_LIMIT - FIRST_SEQ:
        ap.error("--rounds too large for fixed-size records")

    info = machine()
    print("machine: {nproc} CPUs, {cpu_model}; Python {python}, uvloop {uvloop}; "
          "kernel {kernel}; load {loadavg:.2f}".format(**info))
    print(f"members {n}, frame {size} B, rounds {rounds}, repeat {args.repeat}")
    build_c()

    def progress(i: int, runs: dict[str, list[dict]]) -> None:
        print(f"  repeat {i + 1}: " + ", ".join(
            f"{k} {v[-1]['writes_per_s'] / 1e3:.0f}k/s" for k, v in runs.items()))

    names = (VARIANTS + (("engine_ws",) if args.ws else ())
             + (("engine_t1", "engine_t2") if args.threads else ()))
    if args.variants:
        names = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    runs = measure(n, size, rounds, args.repeat, names, progress=progress)
    variants = summarize(runs)
    rate = {k: v["writes_per_s"] for k, v in variants.items()}
    eng = rate.get("engine")
    ratios = {f"engine/{b}": eng / rate[b] for b in ("c", "c_send", "naive")
              if eng and b in rate}
    if eng and "engine_ws" in rate:
        # per write: the WebSocket member's time over the TCP member's, from
        # the medians and as the median of each repeat's ratio
        ratios["engine/engine_ws"] = eng / rate["engine_ws"]
        ratios["engine/engine_ws per repeat"] = statistics.median(
            a / b for a, b in zip(variants["engine"]["runs"], variants["engine_ws"]["runs"]))
    for t in ("engine_ws", "engine_t1", "engine_t2"):
        if t in rate and "c_send" in rate:
            ratios[f"{t}/c_send"] = rate[t] / rate["c_send"]

    print()
    print(f"{'variant':9} {'median writes/s':>16} {'min':>10} {'max':>10} "
          f"{'ns/write':>9}  short/eagain/fail")
    for name, v in variants.items():
        print(f"{name:9} {v['writes_per_s']:16,.0f} {v['min']:10,.0f} {v['max']:10,.0f} "
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
