"""TLS against plaintext: one frame fanned out to N members, the core's
write path with and without TLS, in the same run.

    flock /tmp/fanout-bench.lock .venv/bin/python bench/tls_fanout.py \\
        [--members 500] [--frame-bytes 2048] [--rounds 100] [--repeat 5] \\
        [--threads 0,1] [--json out.json]

Variants (each on N fresh AF_UNIX socketpairs, as bench/fanout_socketpairs.py):

  plain_tN  TcpConnection members, one hub.publish() + hub.flush() per
            round (one shared frame to every member), written by the loop
            thread (t0) or by N of the core's writer threads;
  tls_tN    the same members made with a TlsContext: every write is
            SSL_write from C (tlsio.h), on the loop thread or the writer
            threads. The peers are Python ssl sockets that did a real
            handshake (TLS 1.3, the default cipher) with the core first.

Only the writes are timed (publish + flush, and for writer threads the wait
for the round); after each round every peer is drained and, for TLS,
decrypted, untimed, and its byte count checked. With t0 every write runs on
the one loop thread, so writes/s is also deliveries/s per core; with writer
threads the wall time covers the threads that ran (at most one more core
here: 2-core machine). Repeats interleave the variants; the report is the
median per variant and the ratio tls/plain per thread count.

The TLS mode is the one the build gets here: tls_mode auto, which falls
back to the core's OpenSSL on a kernel without the tls ULP; the report says
which mode every connection got. Kernel TLS is measured only on a machine
whose kernel has it (docs/operations.md, "TLS").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fanout_socketpairs import (  # noqa: E402
    EPOCH, FIRST_SEQ, MAX_FRAME, ROOM, Owner, machine, record_for)
from fanout import _core, devcert  # noqa: E402


class Fanout:
    """One room of n members, plaintext or TLS, on socketpairs."""

    def __init__(self, loop, n: int, frame_bytes: int, threads: int, tls_files=None):
        self.n, self.frame_bytes, self.threads = n, frame_bytes, threads
        self.loop = loop
        self.hub = _core.Hub(loop, compress_min=0, write_threads=threads, thread_min_members=1)
        self.room = self.hub.room(ROOM, EPOCH, FIRST_SEQ - 1)
        self.failures: list[int] = []
        self.conns, self.peers = [], []
        self.tls = None
        if tls_files is not None:
            self.tls = _core.TlsContext(str(tls_files.cert), str(tls_files.key), "auto")
            self.client_ctx = ssl.create_default_context(cafile=str(tls_files.ca))
        for _ in range(n):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            a.setblocking(False)
            b.setblocking(False)
            conn = _core.TcpConnection(a.detach(), loop, max_backlog_bytes=1 << 24,
                                       tls=self.tls)
            conn.owner = Owner(self.failures)
            conn.start_reading(lambda c=conn: c.read())
            if self.tls is not None:
                b = self.client_ctx.wrap_socket(b, server_hostname="localhost",
                                                do_handshake_on_connect=False)
            self.conns.append(conn)
            self.peers.append(b)
        self.seq = FIRST_SEQ
        self._buf = bytearray(MAX_FRAME)

    async def handshake(self) -> None:
        if self.tls is None:
            return
        pending = list(self.peers)
        deadline = time.monotonic() + 60
        while pending:
            left = []
            for s in pending:
                try:
                    s.do_handshake()
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    left.append(s)
            pending = left
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} handshakes did not finish")
            await asyncio.sleep(0.001 if pending else 0)
        while any(c.tls_mode is None for c in self.conns):
            await asyncio.sleep(0.001)
        for c in self.conns:
            self.room.add(c)

    def add_plain(self) -> None:
        if self.tls is None:
            for c in self.conns:
                self.room.add(c)

    def modes(self) -> dict:
        out: dict = {}
        for c in self.conns:
            out[c.tls_mode or "plain"] = out.get(c.tls_mode or "plain", 0) + 1
        return out

    def _drain(self) -> int:
        total = 0
        buf = self._buf
        for s in self.peers:
            while True:
                try:
                    got = s.recv_into(buf)
                except (BlockingIOError, ssl.SSLWantReadError):
                    break
                if not got:
                    raise RuntimeError("peer saw EOF during the benchmark")
                total += got
        return total

    async def run(self, rounds: int) -> float:
        seconds = 0.0
        for _ in range(rounds):
            record = record_for(self.seq, self.frame_bytes)
            t0 = time.perf_counter()
            self.hub.publish(ROOM, EPOCH, self.seq, record)
            self.hub.flush(ROOM)
            if self.threads:
                self.hub.settle()
            seconds += time.perf_counter() - t0
            self.seq += 1
            expected = self.n * self.frame_bytes
            got = self._drain()
            deadline = time.monotonic() + 10
            while got < expected and not self.failures and time.monotonic() < deadline:
                await asyncio.sleep(0)
                got += self._drain()
            if self.failures or got != expected:
                raise RuntimeError(f"round: peers got {got} of {expected} bytes, "
                                   f"failures {self.failures[:5]}")
            await asyncio.sleep(0)
        return seconds

    def close(self) -> None:
        self.hub.close()
        for c in self.conns:
            c.close()
        for p in self.peers:
            p.close()


async def one(variant: str, n: int, frame_bytes: int, rounds: int, tls_files) -> dict:
    kind, threads = variant.split("_t")
    fan = Fanout(asyncio.get_running_loop(), n, frame_bytes, int(threads),
                 tls_files if kind == "tls" else None)
    try:
        await fan.handshake()
        fan.add_plain()
        await fan.run(2)                      # untimed warm-up
        seconds = await fan.run(rounds)
        modes = fan.modes()
    finally:
        fan.close()
    return {"writes_per_s": n * rounds / seconds, "seconds": seconds, "modes": modes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--members", type=int, default=500)
    p.add_argument("--frame-bytes", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", default="0,1", help="writer thread counts to measure")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    variants = [f"{kind}_t{t}" for t in threads for kind in ("plain", "tls")]
    results: dict[str, list] = {v: [] for v in variants}
    modes: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = devcert.make(tmp)
        for _ in range(args.repeat):
            for v in variants:
                r = uvloop.run(one(v, args.members, args.frame_bytes, args.rounds, files))
                results[v].append(r["writes_per_s"])
                modes[v] = r["modes"]
    medians = {v: statistics.median(xs) for v, xs in results.items()}
    report = {
        "machine": machine(), "openssl": _core.openssl_version(),
        "members": args.members, "frame_bytes": args.frame_bytes, "rounds": args.rounds,
        "repeat": args.repeat, "writes_per_s": results, "median": medians, "modes": modes,
        "ratio_tls_over_plain": {f"t{t}": medians[f"tls_t{t}"] / medians[f"plain_t{t}"]
                                 for t in threads},
    }
    print(f"{args.members} members, {args.frame_bytes}-byte frames, {args.rounds} rounds, "
          f"median of {args.repeat} ({report['openssl']}):")
    for v in variants:
        print(f"  {v:9s} {medians[v]:>12,.0f} writes/s   connections: {modes[v]}")
    for t, ratio in report["ratio_tls_over_plain"].items():
        print(f"  tls/plain with {t}: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
