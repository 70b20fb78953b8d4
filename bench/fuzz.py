#!/usr/bin/env python
"""Stateful fuzzer of a real ``fanout node`` process, with an oracle.

    python bench/fuzz.py --inputs 1000000 --seed 1 [--concurrency 96] [--json out.json]

It starts a node (``fanout._testbase.NodeProcess``, as tests and bench do)
and drives it over many concurrent loopback connections with non-blocking
sockets and one selector. Each connection follows a script drawn from the
seed: a valid Hello followed by hundreds to thousands of Join, Leave, Chat,
Ping and Refresh frames with mutated fields (empty, 128/129-byte, huge and
invalid-UTF-8 room names, random req_ids, last_seq/epoch mixes, duplicate
resume points), sometimes with one malformed frame in the middle; sequences
without a Hello; malformed frames of every kind (bad version, reserved bits,
oversized declared lengths, truncated bodies, bad lz4 size prefixes, lz4
bombs, unknown types, random bytes); scripts split at every byte boundary
across writes or written many frames per write; connections that stall
mid-frame, half-close, or stop reading for seconds. A publisher thread feeds
a few rooms through the admin API, and a separate "canary" process keeps
pinging and measures its round trips.

The oracle:

* 0 crashes: the node process is alive at the end;
* 0 hangs: every connection is answered (a final sentinel Ping gets its
  Pong) or closed within ``--deadline`` seconds after its last write, and
  every canary ping is answered within it;
* 0 tracebacks: no ``Traceback`` or ``internal error`` in the node's log;
* every close the node initiates is preceded by an ``Error``/``Kick`` with a
  closing reason from ``fanout.proto``; a reset without one is accepted only
  for connections over a limit (those that stop reading, or refused at
  accept);
* every frame the node sends has a valid header.

Inputs are counted as frames written whole plus raw chunks (byte splits,
random bytes, partial frames). The scripts are a function of ``--seed`` and
the connection's number; the interleaving of connections is not.
A JSON summary is printed (and written with ``--json``); the exit status is 0
when the oracle holds.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import re
import selectors
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import lz4.block

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fanout._testbase import NodeProcess  # noqa: E402
from fanout.protocol import fanout_pb2 as pb  # noqa: E402
from fanout.protocol.auth import mint  # noqa: E402

from bench.scenarios.probes import (HDR, Background, admin_publish, canary, corrected, fb, frame,  # noqa: E402
                                    fv, percentiles_ms, varint)

SECRET = "fuzz-secret-not-for-production-use-0123456789"
API_KEY = "fuzz-api-key-not-for-production-0123456789"
MAX_FRAME = 65536
SENTINEL = 0x5E5E_5E5E_5E5E_5E5E            # the last Ping's nonce: everything before it was handled
HOT_ROOMS = ["fuzz:hot0", "fuzz:hot1", "fuzz:hot2"]
ROOMS = HOT_ROOMS + [f"fuzz:r{i}" for i in range(13)]
USERS = [f"u{i}" for i in range(40)]
REQUEST_REASONS = frozenset(range(20, 30))   # Error reasons that leave the connection open
DEFINED = {v.number: v.name for v in pb.Reason.DESCRIPTOR.values if v.number}
CLOSING = {n: name for n, name in DEFINED.items() if n not in REQUEST_REASONS}
SERVER_TYPES = frozenset(range(0x41, 0x49))
T_ERROR, T_KICK, T_PONG = 0x42, 0x44, 0x45


# --------------------------------------------------------------------- encoding
# Bodies are assembled by hand so that fields can carry what a protobuf
# library refuses to encode: invalid UTF-8, out-of-range integers, wrong wire types.

def lz4_frame(ftype: int, body: bytes) -> bytes:
    return frame(ftype, lz4.block.compress(body, store_size=True), flags=1)


class Gen:
    """Mutated field values and frames, all drawn from one ``random.Random``.

    ``hostile`` adds what the node must refuse by closing (invalid UTF-8 in
    string fields): a session drawing those ends early, so most sessions
    stay decodable and get deep into their script.
    """

    def __init__(self, rng: random.Random, tokens: dict, hostile: bool = False):
        self.r = rng
        self.tokens = tokens
        self.hostile = hostile

    def _odd(self, clean: list, hostile: list):
        return self.r.choice(clean + hostile if self.hostile else clean)

    def room(self) -> bytes:
        r = self.r
        if r.random() < 0.85:
            return r.choice(ROOMS).encode()
        return self._odd([b"", b"x" * 128, b"y" * 129, "\u00e9".encode() * 64, b"\x00",
                          b"z" * 4000, b"w" * r.randrange(1, 300), "\u2603".encode() * 50,
                          b"q" * 60000 if r.random() < 0.03 else b"q" * 1000],
                         [b"\xff\xfe", b"ok\xc3", b"\xed\xa0\x80"])

    def req_id(self) -> int:
        r = self.r
        return r.choice([0, 1, 2, 0xFFFFFFFF, 1 << 32, r.getrandbits(32), r.getrandbits(64),
                         r.randrange(1, 1000)])

    def seq(self) -> int:
        r = self.r
        return r.choice([0, 0, 1, 2, r.randrange(1, 2000), (1 << 64) - 1, r.getrandbits(63)])

    def epoch(self) -> bytes:
        r = self.r
        return self._odd([b"", b"", b"e", b"0" * 12, r.randbytes(6).hex().encode(), b"E" * 500],
                         [b"\xff"])

    def hello_body(self, token: bytes | None = None) -> bytes:
        r = self.r
        tok = token if token is not None else r.choice(self.tokens["valid"])
        resume = b""
        if r.random() < 0.4:
            pts = [fb(1, self.room()) + fv(2, self.seq()) + fb(3, self.epoch())
                   for _ in range(r.choice([1, 2, 5, 16, 17, 40]))]
            if r.random() < 0.3:                          # duplicate resume points
                pts += pts[:r.randrange(1, len(pts) + 1)]
            resume = b"".join(varint(4 << 3 | 2) + varint(len(p)) + p for p in pts)
        dc = self._odd([b"", b"mobile", b"web", b"d" * 200, b"x" * 3000], [b"\xff"])
        return (fb(1, tok) + fb(2, r.choice([b"", b"fuzz", r.randbytes(4).hex().encode()]))
                + fb(3, dc) + resume + fb(5, r.choice([b"", b"fuzz/1", b"c" * 500])))

    def refresh(self) -> bytes:
        tok = self.r.choice(self.tokens["valid"] + self.tokens["bad"])
        return frame(0x06, fv(1, self.req_id()) + fb(2, tok))

    def request(self) -> bytes:
        """One valid-ish client frame after Hello (Refresh aside)."""
        r = self.r
        x = r.random()
        if x < 0.30:
            return frame(0x02, fv(1, self.req_id()) + fb(2, self.room()) + fv(3, self.seq())
                         + fb(4, self.epoch()))
        if x < 0.42:
            return frame(0x03, fv(1, self.req_id()) + fb(2, self.room()))
        if x < 0.62:
            payload = r.choice([b"", b"hi", r.randbytes(r.randrange(1, 200)), b"p" * 2048,
                                b"p" * 2049, b"P" * 20000 if r.random() < 0.1 else b"p" * 300])
            body = fv(1, self.req_id()) + fb(2, self.room()) + fb(3, payload)
            return lz4_frame(0x04, body) if r.random() < 0.05 else frame(0x04, body)
        f = frame(0x05, fv(1, r.getrandbits(r.choice([8, 32, 64]))))
        return f if r.random() < 0.95 else frame(0x05, b"\x08\x01\x20\x07")   # + unknown field

    def malformed(self) -> tuple[bytes, str]:
        """A frame the node must refuse by closing, and what it is."""
        r = self.r
        body = fv(1, 5)
        k = r.randrange(14)
        if k == 0:
            return frame(0x05, body, version=r.choice([0, 2, 0x7F, 0xFF])), "bad_version"
        if k == 1:
            return frame(0x05, body, flags=r.choice([0x02, 0x80, 0xFE, 0x07])), "reserved_flags"
        if k == 2:
            return frame(0x05, body, reserved=r.randrange(1, 256)), "reserved_byte"
        if k == 3:
            return frame(0x02, b"", length=r.choice([MAX_FRAME + 1, 1 << 24, 0xFFFFFFFF])), \
                "oversized_length"
        if k == 4:
            return frame(0x02, b"\x01\x02", flags=1), "lz4_short_prefix"
        if k == 5:
            return frame(0x02, struct.pack("<I", r.choice([MAX_FRAME + 1, 0xFFFFFFFF]))
                         + b"\x00" * 8, flags=1), "lz4_size_over_limit"
        if k == 6:                                       # a real bomb: 16 MiB of zeros in ~64 KB
            return frame(0x04, lz4.block.compress(b"\x00" * (MAX_FRAME * 4), store_size=True),
                         flags=1), "lz4_bomb"
        if k == 7:
            blk = lz4.block.compress(body * 50, store_size=False)
            return frame(0x05, struct.pack("<I", r.choice([3, 99, 101])) + blk, flags=1), \
                "lz4_size_mismatch"
        if k == 8:
            return frame(0x05, struct.pack("<I", 64) + os.urandom(r.randrange(1, 40)),
                         flags=1), "lz4_garbage"
        if k == 9:
            return frame(r.choice([0x00, 0x07, 0x3F, 0x41, 0x43, 0x45, 0x80, 0xFF]), body), \
                "unknown_type"
        if k == 10:
            return frame(0x02, b"\x08\xff\xff"), "truncated_varint"
        if k == 11:
            return frame(0x02, b"\x0f" + os.urandom(4)), "bad_wire_type"
        if k == 12:
            return frame(0x02, b"\x12\x64ab"), "short_length_field"
        return frame(0x01, self.hello_body()), "second_hello"


class Pools:
    """Frames drawn once from the seed; scripts pick from them (fast), and
    add a few of their own from the connection's generator."""

    def __init__(self, seed: int, tokens: dict):
        self.tokens = tokens
        clean = Gen(random.Random(seed), tokens)
        hostile = Gen(random.Random(seed + 1), tokens, hostile=True)
        self.requests = [clean.request() for _ in range(30000)]
        self.hostile = [hostile.request() for _ in range(3000)]
        self.refresh = [clean.refresh() for _ in range(300)]


# --------------------------------------------------------------------- scripts

class Script:
    """What one connection writes: chunks of (bytes, inputs, frames, yield_after)."""

    __slots__ = ("kind", "chunks", "expect", "noread_s", "half_close", "deadline_extra")

    def __init__(self, kind: str, expect: str = "answer"):
        self.kind = kind
        self.chunks: list[tuple[bytes, int, int, bool]] = []
        self.expect = expect          # "answer": sentinel Pong; "close": the node must close
        self.noread_s = 0.0
        self.half_close = False
        self.deadline_extra = 0.0

    def frames(self, frames: list[bytes], r: random.Random, mode: str | None = None) -> None:
        mode = mode or r.choices(["batch", "single", "split", "bytes"], [70, 8, 15, 7])[0]
        if mode == "bytes":                              # every byte boundary, then batches
            head, frames = frames[:3], frames[3:]
            for b in b"".join(head):
                self.chunks.append((bytes((b,)), 1, 0, True))
            mode = "batch"
        if mode == "split":
            data = b"".join(frames)
            i = 0
            while i < len(data):
                n = r.choice([1, 2, 3, 7, 8, 9, r.randrange(1, 4096)])
                self.chunks.append((data[i:i + n], 1, 0, False))
                i += n
            return
        i = 0
        while i < len(frames):
            k = 1 if mode == "single" else r.choice([1, 4, 16, 64, 256, 1024])
            part = frames[i:i + k]
            self.chunks.append((b"".join(part), len(part), len(part), False))
            i += k

    def raw(self, data: bytes) -> None:
        self.chunks.append((data, 1, 0, False))


def make_script(seed: int, index: int, pools: Pools) -> Script:
    r = random.Random(seed * 1_000_003 + index)
    g = Gen(r, pools.tokens, hostile=r.random() < 0.2)
    tokens = pools.tokens

    def requests(n: int) -> list[bytes]:
        if not n:
            return []
        out = r.choices(pools.requests, k=n)
        for _ in range(min(n, 8)):                       # a few of this connection's own
            out[r.randrange(n)] = g.request()
        if g.hostile:
            for _ in range(max(1, n // 100)):
                out[r.randrange(n)] = r.choice(pools.hostile)
        if r.random() < 0.15:
            for _ in range(max(1, n // 200)):
                out[r.randrange(n)] = r.choice(pools.refresh)
        return out

    kind = r.choices(["session", "unauth", "malformed", "random_bytes", "bad_token",
                      "stall", "half_close", "noread"],
                     [50, 8, 14, 5, 6, 4, 5, 8])[0]
    sentinel = frame(0x05, fv(1, SENTINEL))
    if kind == "session":
        n = r.choice([10, 50, 200, 1000, 2000, 4000])
        frames = [frame(0x01, g.hello_body())] + requests(n)
        s = Script(kind)
        if r.random() < 0.25:                            # one bad frame, then more traffic
            bad, what = g.malformed()
            frames.insert(r.randrange(2, len(frames) + 1), bad)
            s.kind = "session+" + what
            s.expect = "close"
        else:
            frames.append(sentinel)
        s.frames(frames, r)
        return s
    if kind == "unauth":
        s = Script(kind, "close")
        s.frames(requests(r.choice([1, 5, 100])), r)
        return s
    if kind == "malformed":
        bad, what = g.malformed()
        s = Script("malformed:" + what, "close")
        pre = [frame(0x01, g.hello_body())] if r.random() < 0.6 else []
        pre += requests(r.choice([0, 0, 3, 50])) if pre else []
        tail = requests(r.choice([0, 10, 500]))
        s.frames(pre + [bad] + tail, r)
        return s
    if kind == "random_bytes":
        s = Script(kind, "close")
        for _ in range(r.choice([1, 4, 64])):
            s.raw(r.randbytes(r.choice([1, 8, 9, 100, 4096])))
        # A few random bytes can leave the node waiting for a body: end the stream.
        s.half_close = True
        return s
    if kind == "bad_token":
        s = Script(kind, "close")
        tok = r.choice(tokens["bad"] + [b""])
        s.frames([frame(0x01, g.hello_body(tok))] + requests(3), r)
        return s
    if kind == "stall":                                  # a partial frame, then silence
        s = Script(kind, "close")
        pre = [frame(0x01, g.hello_body())] if r.random() < 0.5 else []
        partial = r.choice([b"\x01", b"\x01\x02\x00", frame(0x02, fv(1, 3) + fb(2, b"room"))[:-2],
                            HDR.pack(1, 2, 0, 0, 1000) + b"\x08"])
        s.frames(pre, r, "batch")
        s.raw(partial)
        s.deadline_extra = 4.0                           # waits out auth/idle timeouts
        return s
    if kind == "half_close":
        s = Script(kind, "close")
        pre = [frame(0x01, g.hello_body())] + requests(r.choice([0, 20]))
        s.frames(pre, r)
        if r.random() < 0.5:
            s.raw(HDR.pack(1, 5, 0, 0, 50) + b"\x08")     # truncated body before EOF
        s.half_close = True
        return s
    # noread: authenticated, in hot rooms, writes a lot and does not read for a while
    s = Script(kind)
    joins = [frame(0x02, fv(1, i + 1) + fb(2, room.encode()) + fv(3, r.choice([0, 1])))
             for i, room in enumerate(HOT_ROOMS)]
    body = requests(r.choice([100, 2000]))
    s.frames([frame(0x01, g.hello_body())] + joins + body + [sentinel], r, "batch")
    s.noread_s = r.choice([1.0, 3.0])
    return s


# --------------------------------------------------------------------- the driver

class Conn:
    __slots__ = ("idx", "sock", "script", "ci", "off", "rbuf", "last", "done_writing",
                 "write_closed", "deadline", "started", "noread_until", "outcome", "resets",
                 "inputs", "frames", "bytes_out", "connected")

    def __init__(self, idx: int, sock: socket.socket, script: Script):
        self.idx, self.sock, self.script = idx, sock, script
        self.ci = self.off = 0
        self.rbuf = bytearray()
        self.last: tuple[int, int, bytes] | None = None
        self.done_writing = self.write_closed = self.connected = False
        self.started = time.monotonic()
        self.deadline = float("inf")
        self.noread_until = 0.0
        self.outcome: str | None = None
        self.inputs = self.frames = self.bytes_out = 0


class Fuzzer:
    def __init__(self, host: str, port: int, args, pools: Pools):
        self.host, self.port, self.args, self.pools = host, port, args, pools
        self.sel = selectors.DefaultSelector()
        self.active: dict[int, Conn] = {}
        self.next_idx = 0
        self.inputs = self.frames_sent = self.raw_chunks = self.bytes_sent = 0
        self.closes: dict[str, int] = {}
        self.kinds: dict[str, int] = {}
        self.violations: dict[str, int] = {}
        self.examples: list[dict] = []
        self.hangs = 0
        self.inputs_by_end: dict[str, int] = {}
        self.send_seconds = 0.0
        self.bad_server_frames = 0
        self.connect_failures = 0
        self.sources = [f"127.0.0.{i}" for i in range(1, args.sources + 1)]

    # -- bookkeeping
    def violation(self, c: Conn, what: str) -> None:
        self.violations[what] = self.violations.get(what, 0) + 1
        if len(self.examples) < 20:
            last = None
            if c.last:
                last = {"type": hex(c.last[0]), "body": c.last[2][:64].hex()}
            self.examples.append({"violation": what, "conn": c.idx, "kind": c.script.kind,
                                  "written_chunks": c.ci, "of": len(c.script.chunks),
                                  "last_frame": last})

    def finish(self, c: Conn, outcome: str, ok: bool = True, what: str = "") -> None:
        if c.outcome is not None:
            return
        c.outcome = outcome
        self.closes[outcome] = self.closes.get(outcome, 0) + 1
        key = "answered" if outcome == "answered" else "closed"
        self.inputs_by_end[key] = self.inputs_by_end.get(key, 0) + c.inputs
        if not ok:
            self.violation(c, what or outcome)
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
        del self.active[c.idx]

    # -- connections
    def open(self) -> None:
        idx = self.next_idx
        self.next_idx += 1
        script = make_script(self.args.seed, idx, self.pools)
        base = script.kind.split(":")[0].split("+")[0]
        self.kinds[base] = self.kinds.get(base, 0) + 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind((self.sources[idx % len(self.sources)], 0))
        s.setblocking(False)
        c = Conn(idx, s, script)
        self.active[idx] = c
        err = s.connect_ex((self.host, self.port))
        if err not in (0, errno.EINPROGRESS):
            self.connect_failures += 1
            self.finish(c, "connect_failed")
            return
        self.sel.register(s, selectors.EVENT_WRITE, c)

    def _interest(self, c: Conn) -> int:
        ev = 0
        if time.monotonic() >= c.noread_until:
            ev |= selectors.EVENT_READ
        if not c.done_writing:
            ev |= selectors.EVENT_WRITE
        return ev

    def _rearm(self, c: Conn) -> None:
        ev = self._interest(c)
        if ev:
            self.sel.modify(c.sock, ev, c)
        else:
            self.sel.unregister(c.sock)        # re-registered by the timer when reading resumes

    def on_write(self, c: Conn) -> None:
        if not c.connected:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                # Refused at accept (listen queue full, or a reset for being over a limit).
                self.connect_failures += 1
                self.finish(c, "refused_" + errno.errorcode.get(err, str(err)),
                            ok=err in (errno.ECONNRESET, errno.ECONNREFUSED))
                return
            c.connected = True
            if c.script.noread_s:
                c.noread_until = time.monotonic() + c.script.noread_s
        chunks = c.script.chunks
        budget = 1 << 18
        while c.ci < len(chunks) and budget > 0:
            data, n_in, n_fr, yield_after = chunks[c.ci]
            try:
                sent = c.sock.send(memoryview(data)[c.off:] if c.off else data)
            except BlockingIOError:
                break
            except OSError:
                # The node closed; what it said last is in our receive queue.
                c.write_closed = True
                break
            budget -= sent
            self.bytes_sent += sent
            c.off += sent
            if c.off < len(data):
                break
            c.off = 0
            c.ci += 1
            self.inputs += n_in
            c.inputs += n_in
            self.frames_sent += n_fr
            if not n_fr:
                self.raw_chunks += n_in
            if yield_after:
                break
        if c.ci >= len(chunks) or c.write_closed:
            c.done_writing = True
            c.deadline = time.monotonic() + self.args.deadline + c.script.deadline_extra \
                + c.script.noread_s
            if c.script.half_close and not c.write_closed:
                try:
                    c.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        self._rearm(c)

    def on_read(self, c: Conn) -> None:
        reset = False
        while True:
            try:
                data = c.sock.recv(1 << 18)
            except BlockingIOError:
                return
            except ConnectionResetError:
                reset, data = True, b""
            except OSError:
                reset, data = True, b""
            if not data:
                break
            if self.parse(c, data):
                return
        self.closed(c, reset)

    def parse(self, c: Conn, data: bytes) -> bool:
        """Consume server frames; True when the connection is finished (sentinel)."""
        buf = c.rbuf
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= 8:
            ver, ftype, flags, res, length = HDR.unpack_from(buf, pos)
            if ver != 1 or res or flags & 0xFC or flags == 0x02 or ftype not in SERVER_TYPES:
                self.bad_server_frames += 1
                self.finish(c, "bad_server_frame", ok=False)
                return True
            if end - pos - 8 < length:
                break
            body = bytes(buf[pos + 8:pos + 8 + length])
            pos += 8 + length
            c.last = (ftype, flags, body)
            if ftype == T_PONG and body.startswith(b"\x08" + varint(SENTINEL)):
                self.finish(c, "answered")
                return True
        del buf[:pos]
        return False

    def closed(self, c: Conn, reset: bool) -> None:
        """EOF or reset from the node: judge the last frame it sent."""
        last = c.last
        reason = None
        closing = False
        if last and last[0] in (T_ERROR, T_KICK):
            body = lz4.block.decompress(last[2]) if last[1] & 1 else last[2]
            msg = (pb.Error if last[0] == T_ERROR else pb.Kick).FromString(body)
            reason = msg.reason
            # docs/protocol.md: a closing Error has req_id 0 and no room, whatever
            # its reason (a Hello refused for its shape: TOO_MANY_ROOMS, BAD_REQUEST).
            closing = reason in CLOSING or (last[0] == T_ERROR and not msg.req_id
                                            and not msg.room)
        if closing:
            self.finish(c, DEFINED.get(reason, str(reason)) + ("+rst" if reset else ""))
            return
        if c.script.half_close:
            self.finish(c, "after_client_eof" + ("+rst" if reset else ""))
            return
        if reset and c.script.kind == "noread":
            self.finish(c, "rst_over_limit")
            return
        what = ("reset" if reset else "eof") + "_without_reason"
        if reason is not None:
            what += f"(last {DEFINED.get(reason, reason)})"
        self.finish(c, what, ok=False)

    def tick(self, now: float) -> None:
        for c in list(self.active.values()):
            if c.noread_until and now >= c.noread_until and c.outcome is None:
                c.noread_until = 0.0
                try:
                    self.sel.modify(c.sock, self._interest(c), c)
                except KeyError:
                    self.sel.register(c.sock, self._interest(c), c)
            if now > c.deadline or (not c.done_writing and now - c.started > 120):
                self.hangs += 1
                self.finish(c, "hang", ok=False)

    def run(self, node_alive) -> float:
        args = self.args
        t0 = time.monotonic()
        last_tick = t0
        while True:
            if self.inputs < args.inputs:
                while len(self.active) < args.concurrency:
                    self.open()
            elif not self.send_seconds:
                self.send_seconds = time.monotonic() - t0
            elif not self.active:
                break
            for key, mask in self.sel.select(0.05):
                c = key.data
                if c.outcome is None and mask & selectors.EVENT_WRITE:
                    self.on_write(c)
                if c.outcome is None and mask & selectors.EVENT_READ:
                    self.on_read(c)
            now = time.monotonic()
            if now - last_tick > 0.1:
                last_tick = now
                self.tick(now)
                if not node_alive():
                    break
        return time.monotonic() - t0


# --------------------------------------------------------------------- helpers

def publisher(admin_port: int, stop: threading.Event, counts: dict) -> None:
    """Keeps the hot rooms' history rings full and their members receiving."""
    i = 0
    while not stop.is_set():
        msgs = [{"room": HOT_ROOMS[(i + k) % len(HOT_ROOMS)], "kind": "gift",
                 "payload": f"gift {i}-{k} " + "x" * 200} for k in range(30)]
        try:
            admin_publish(admin_port, API_KEY, msgs)
            counts["published"] = counts.get("published", 0) + len(msgs)
        except OSError as exc:
            counts["errors"] = counts.get("errors", 0) + 1
            counts["last_error"] = str(exc)
        i += 1
        stop.wait(0.1)


def make_tokens() -> dict:
    valid = [mint(SECRET, u, rooms="*").encode() for u in USERS]
    limited = [mint(SECRET, "lim" + str(i), rooms=ROOMS[:3]).encode() for i in range(3)]
    bad = [mint("wrong-secret-0123456789-0123456789", "u1").encode(),
           mint(SECRET, "old", ttl=-10).encode(), b"not.a.jwt", b"x" * 3000,
           valid[0][:-3] + b"AAA", b"\xff\xfe"]
    return {"valid": valid + limited, "bad": bad}


def log_findings(text: str) -> dict:
    tb = len(re.findall(r"Traceback", text))
    ie = len(re.findall(r"internal error", text, re.IGNORECASE))
    lines = [ln for ln in text.splitlines() if "Traceback" in ln or "internal error" in ln.lower()]
    return {"tracebacks": tb, "internal_errors": ie, "first_lines": lines[:5]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inputs", type=int, default=1_000_000, help="inputs to send (frames + raw chunks)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=96, help="connections open at once")
    p.add_argument("--sources", type=int, default=8, help="source addresses 127.0.0.1..N")
    p.add_argument("--deadline", type=float, default=10.0,
                   help="seconds after its last write within which a connection must be answered or closed")
    p.add_argument("--canary-interval", type=float, default=0.01, help="seconds between canary pings")
    p.add_argument("--node-flag", action="append", default=[],
                   help="extra flag for the node, e.g. --node-flag=--max-frame=4096 (repeatable)")
    p.add_argument("--log", default=None, help="node log file (default: a temporary file)")
    p.add_argument("--json", default=None, help="also write the summary here")
    args = p.parse_args(argv)

    log_path = Path(args.log) if args.log else Path(
        os.environ.get("TMPDIR", "/tmp")) / f"fanout-fuzz-{os.getpid()}.log"
    # Short timeouts so that stalled connections resolve within the deadline;
    # a small ring so replays stay cheap (replay cost is the adversarial
    # scenario's subject); connection admission wide open (not the subject).
    flags = ["--secret", SECRET, "--log-level", "INFO", "--auth-timeout-ms", "1000",
             "--idle-timeout-ms", "3000", "--ping-interval-ms", "1000", "--ring-size", "64",
             "--conn-rate-per-ip", "100000", "--conn-burst-per-ip", "100000",
             "--drain-grace-ms", "1000", "--drain-jitter-ms", "0",
             *[f for nf in args.node_flag for f in nf.split("=", 1)]]
    node = NodeProcess(flags, api_key=API_KEY, cwd=ROOT, log_path=log_path)
    tokens = make_tokens()
    stop_pub = threading.Event()
    pub_counts: dict = {}
    pub = threading.Thread(target=publisher, args=(node.admin_port, stop_pub, pub_counts),
                           daemon=True)
    pub.start()
    can = Background(canary, "127.0.0.1", node.port, mint(SECRET, "canary"),
                     args.canary_interval, args.deadline, HOT_ROOMS[0])
    time.sleep(0.5)
    fz = Fuzzer(node.host, node.port, args, Pools(args.seed, tokens))
    try:
        seconds = fz.run(node.alive)
    finally:
        stop_pub.set()
        can_res = can.result(timeout=args.deadline + 5)
        pub.join(15)
        alive = node.alive()
        exit_status = node.stop()
    findings = log_findings(log_path.read_text(errors="replace"))
    rtts = [r for _, r in can_res.get("samples", [])]
    canary_ok = can_res.get("unanswered") == 0 and can_res.get("closed") is None and rtts
    summary = {
        "seed": args.seed, "inputs": fz.inputs, "frames": fz.frames_sent,
        "raw_chunks": fz.raw_chunks, "bytes_sent": fz.bytes_sent, "seconds": round(seconds, 2),
        # Until every connection was answered or closed: what the node took in.
        "inputs_per_s": round(fz.inputs / seconds) if seconds else None,
        "send_seconds": round(fz.send_seconds, 2),
        "inputs_of_answered_sessions": fz.inputs_by_end.get("answered", 0),
        "connections": fz.next_idx, "connections_by_kind": fz.kinds,
        "closes": dict(sorted(fz.closes.items(), key=lambda kv: -kv[1])),
        "crashes": 0 if alive else 1, "node_exit_status": exit_status,
        "hangs": fz.hangs, "tracebacks": findings["tracebacks"],
        "internal_errors": findings["internal_errors"], "log_lines": findings["first_lines"],
        "violations": fz.violations, "violation_examples": fz.examples,
        "bad_server_frames": fz.bad_server_frames, "connect_failures": fz.connect_failures,
        "canary": {**percentiles_ms(rtts), "unanswered": can_res.get("unanswered"),
                   "closed": can_res.get("closed", can_res.get("error")),
                   "corrected": percentiles_ms(corrected(rtts, args.canary_interval * 1000))},
        "published": pub_counts, "node_command": node.command, "node_log": str(log_path),
        "command": "python bench/fuzz.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    summary["ok"] = bool(alive and fz.hangs == 0 and not findings["tracebacks"]
                         and not findings["internal_errors"] and not fz.violations
                         and canary_ok and fz.inputs >= args.inputs)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
