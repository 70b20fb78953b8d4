#!/usr/bin/env python3
"""Build the protocol's LZ4 dictionary 1: fanout/protocol/lz4dict-1.bin.

A pre-shared dictionary lets LZ4 find matches in a frame's first bytes,
which is all a quiet room's one-message frame has (docs/protocol.md,
section 3). The dictionary is part of the protocol: every client holds the
same bytes, identified by the id 1. It is built here, deterministically,
from a documented sample:

* 15,000 messages from ``fanout.load.corpus.Corpus(seed=1001)`` in the
  shape of the reference load (``bench/peers/stream.py``): half gift
  notices, half chat, each text cut or padded with more chat to 50 bytes
  (``Corpus.pad``).
* Each encoded as the ``Batch`` record a node sends (``0x0A len RoomMessage``)
  in room ``live:sample``, seq from 1, ``server_ts_ms`` from
  1,700,000,000,000 in steps of 7 ms.

Not overfitted to the benchmarks: the wire-bytes scenario uses seed 1 and
the load generator seed 0 (``fanout load --seed``), and a seed draws its own
user population (5,000 random 8-digit ids, nicknames from the generator's
syllables), so a benchmark's user ids are in the sample only by chance
(about 0.3 expected in common), and no benchmark's room name, seq or
timestamp is. What the sample
shares with them is what a deployment's own traffic would: the phrases,
gift names, payload size and message layout of the application.
``--evaluate`` measures it on a stream of yet another seed (1002).

Selection, after zstd's COVER trainer: the sample's records are
concatenated and cut into 1,024 equal epochs; from each, the 64-byte
segment whose distinct 6-byte substrings occur in the most records (each
substring counted once, then spent) is kept. The segments are laid out by
score, best last, since LZ4 reaches at most 64 KiB back and the end of the
dictionary is nearest to the data. The result is exactly 64 KiB.

Usage::

    python scripts/make_dict.py             # (re)write the file
    python scripts/make_dict.py --check     # exit 1 if the file is stale
    python scripts/make_dict.py --evaluate  # bytes per message on a held-out stream
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fanout.load.corpus import Corpus  # noqa: E402
from fanout.protocol import wire  # noqa: E402

OUT = ROOT / "fanout" / "protocol" / "lz4dict-1.bin"
SEED = 1001
SAMPLE = 15_000
PAYLOAD = 50
ROOM = "live:sample"
TS0 = 1_700_000_000_000
SIZE = 64 * 1024
SEGMENT = 64
DMER = 6


def _varint(n: int) -> bytes:
    return wire.encode_varint(n)


def _field(tag: int, data: bytes) -> bytes:
    return bytes([tag]) + _varint(len(data)) + data if data else b""


def _uint(tag: int, v: int) -> bytes:
    return bytes([tag]) + _varint(v) if v else b""


def record(room: str, seq: int, kind: int, sender: str, payload: bytes, ts: int) -> bytes:
    """One Batch record, canonical proto3, as the node encodes it."""
    inner = (_field(0x0A, room.encode()) + _uint(0x10, seq) + _uint(0x18, kind)
             + _field(0x2A, sender.encode()) + _field(0x32, payload) + _uint(0x38, ts))
    return b"\x0a" + _varint(len(inner)) + inner


def sample() -> list[bytes]:
    corpus = Corpus(SEED)
    out = []
    for i in range(SAMPLE):
        kind, sender, text = corpus.message(gift_share=0.5)
        out.append(record(ROOM, i + 1, wire.KIND_CODES[kind], sender,
                          corpus.pad(text, PAYLOAD), TS0 + 7 * i))
    return out


def build(records: list[bytes], size: int = SIZE, k: int = SEGMENT, d: int = DMER) -> bytes:
    """COVER-style selection of size // k segments of k bytes (see module doc)."""
    freq: Counter[bytes] = Counter()
    for r in records:
        freq.update({r[i:i + d] for i in range(len(r) - d + 1)})
    data = b"".join(records)
    nseg = size // k
    epoch = len(data) // nseg
    chosen = []
    for e in range(nseg):
        lo, hi = e * epoch, (e + 1) * epoch
        best, best_pos = -1, lo
        for pos in range(lo, hi - k + 1, 4):
            win = data[pos:pos + k]
            score = sum(freq[m] for m in {win[i:i + d] for i in range(k - d + 1)})
            if score > best:
                best, best_pos = score, pos
        win = data[best_pos:best_pos + k]
        for i in range(k - d + 1):
            freq[win[i:i + d]] = 0
        chosen.append((best, e, win))
    chosen.sort()                       # ascending score: the best segments end up last
    out = b"".join(w for _s, _e, w in chosen)
    assert len(out) == size, len(out)
    return out


def evaluate(data: bytes, seed: int = 1002, n: int = 8000) -> None:
    """Bytes per message with and without ``data`` on a stream of another
    seed (the way the parameters were checked), in 200-message frames and
    alone, and the build time per frame (lz4 level 10, as the node)."""
    import time

    import lz4.block

    corpus = Corpus(seed)
    recs = []
    for i in range(n):
        kind, sender, text = corpus.message(gift_share=0.5)
        recs.append(record("live:val-3", 1 + i, wire.KIND_CODES[kind], sender,
                           corpus.pad(text, PAYLOAD), TS0 + 10 * (i // 20)))
    for per, dicts in ((200, ((b"", "none"), (data, "64 KiB"))),
                       (1, ((b"", "none"), (data[-16384:], "last 16 KiB"), (data, "64 KiB")))):
        bodies = [b"".join(recs[i:i + per]) for i in range(0, min(n, 2000 * per), per)]
        for d, name in dicts:
            t0 = time.perf_counter()
            packed = [lz4.block.compress(b, store_size=False, mode="high_compression",
                                         compression=10, dict=d) for b in bodies]
            spent = (time.perf_counter() - t0) / len(bodies)
            size = sum(8 + min(len(b), (5 if d else 4) + len(p)) for b, p in zip(bodies, packed))
            print(f"seed {seed}, {per:3d} per frame, dictionary {name:11s}: "
                  f"{size / (len(bodies) * per):6.2f} B/msg, {spent * 1e6:7.1f} us per frame")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the file differs from what would be built")
    parser.add_argument("--evaluate", action="store_true",
                        help="print bytes per message on a held-out stream (seed 1002)")
    args = parser.parse_args(argv)
    data = build(sample())
    if args.evaluate:
        evaluate(data)
        return 0
    digest = hashlib.sha256(data).hexdigest()
    shown = OUT.relative_to(ROOT)
    if args.check:
        if not OUT.exists() or OUT.read_bytes() != data:
            print(f"{shown} is out of date; run scripts/make_dict.py", file=sys.stderr)
            return 1
        print(f"{shown} is current (sha256 {digest})")
        return 0
    OUT.write_bytes(data)
    print(f"wrote {shown}: {len(data)} bytes, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
