"""The hot-path workloads the pyperf suite, the pytest-benchmark tests and the
CI perf check share (bench/pyperf_suite.py, bench/test_micro.py,
bench/perf_check.py). The socketpair fan-out fixtures live in
bench/fanout_socketpairs.py.

Every input is built from a fixed seed, so each run measures the same bytes.

* the corpus: the reference load's chat/gift mix, 50 B payloads, from
  :mod:`fanout.load.corpus` as the load generator sends them (:func:`corpus`);
* one flush: 200 messages encoded once each (``encode_room_message``) and
  framed as one lz4-compressed Batch (:func:`build_batch`);
* what a viewer reads: a stream of such Batch frames (:func:`batch_stream`),
  decoded by the core's ``parse_frames`` or by the pure-Python
  ``fanout.protocol.wire.FrameDecoder``;
* what a node reads: small Chat and Ping frames (:func:`chat_stream`);
* a Hello token as the node sees it (:func:`auth_token`, ``fanout.protocol.auth.verify``).
"""

from __future__ import annotations

import ctypes
import random
from dataclasses import dataclass

from fanout import _core
from fanout.protocol import auth
from fanout.load.corpus import Corpus
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol.wire import (DEFAULT_COMPRESS_MIN, KIND_CODES, MAX_SERVER_FRAME, FrameDecoder,
                                  FrameType)

SEED = 20261123
ROOM = "live-88231"
TS_MS = 1_763_900_000_000
#: Messages per flush: the batch size the mission's budget rests on
#: (about 200 messages per frame at about 10 frames/s per viewer).
BATCH_MESSAGES = 200

_PRIORITY = {"chat": 0, "gift": 5, "system": 0}


@dataclass(frozen=True, slots=True)
class Message:
    kind: int
    priority: int
    sender: str
    payload: bytes


def corpus(n: int = BATCH_MESSAGES, seed: int = SEED, size: int = 50) -> list[Message]:
    """``n`` messages of the reference mix from :mod:`fanout.load.corpus` (the
    load generator's corpus): half chat, half gifts, ``size``-byte payloads
    (an 8-byte timestamp, then the text), all from a fixed seed."""
    c = Corpus(seed)
    out = []
    for i in range(n):
        kind, sender, text = c.message(gift_share=0.5)
        payload = c.payload(text, size, ts_ns=TS_MS * 1_000_000 + i * 1_000_000)
        out.append(Message(KIND_CODES[kind], _PRIORITY[kind], sender, payload))
    return out


def encode_all(messages: list[Message], first_seq: int = 1) -> list[bytes]:
    """Each message as its ``Batch.messages`` record, as the logic layer encodes it."""
    enc = _core.encode_room_message
    return [enc(ROOM, first_seq + i, m.kind, m.priority, m.sender, m.payload, TS_MS + i)
            for i, m in enumerate(messages)]


def build_batch(messages: list[Message], first_seq: int = 1,
                compress_min: int = DEFAULT_COMPRESS_MIN) -> bytes:
    """One flush, the way the node does it: every message encoded once,
    the records concatenated into one Batch body, framed with lz4."""
    enc = _core.encode_room_message
    records = [enc(ROOM, first_seq + i, m.kind, m.priority, m.sender, m.payload, TS_MS + i)
               for i, m in enumerate(messages)]
    return _core.pack_frame(FrameType.BATCH, b"".join(records), compress_min)


def batch_stream(frames: int = 40, seed: int = SEED) -> tuple[bytes, int]:
    """What a viewer of a busy room reads: ``frames`` Batch frames, most of
    200 messages, some of a quiet moment's 5-20 (those stay uncompressed
    when under ``DEFAULT_COMPRESS_MIN``). Returns ``(stream, frame_count)``."""
    rng = random.Random(seed + 1)
    msgs = corpus(BATCH_MESSAGES * frames, seed + 2)
    out, seq, pos = [], 1, 0
    for _ in range(frames):
        k = BATCH_MESSAGES if rng.random() < 0.75 else rng.randint(5, 20)
        out.append(build_batch(msgs[pos:pos + k], seq))
        pos += k
        seq += k
    return b"".join(out), frames


def chat_stream(frames: int = 400, seed: int = SEED) -> tuple[bytes, int]:
    """What a node reads from busy viewers: small uncompressed Chat frames
    of the corpus with a Ping now and then. Returns ``(stream, frame_count)``."""
    rng = random.Random(seed + 3)
    msgs = corpus(frames, seed + 4)
    out = []
    for i, m in enumerate(msgs):
        if rng.random() < 0.1:
            body = pb.Ping(nonce=rng.randrange(1 << 32)).SerializeToString()
            out.append(_core.pack_frame(FrameType.PING, body))
        else:
            body = pb.Chat(req_id=i + 1, room=ROOM, payload=m.payload).SerializeToString()
            out.append(_core.pack_frame(FrameType.CHAT, body))
    return b"".join(out), frames


def decode_core(stream: bytes) -> list[tuple[int, int, bytes]]:
    """The compiled decoder (the same checks a node's Connection runs)."""
    frames, used = _core.parse_frames(stream, MAX_SERVER_FRAME)
    if used != len(stream):
        raise RuntimeError("parse_frames left a tail")
    return frames


def decode_wire(stream: bytes) -> list[tuple[int, int, bytes]]:
    """The pure-Python reference decoder the client SDK uses."""
    return FrameDecoder(MAX_SERVER_FRAME).feed(stream)


#: The secret a node would hold (any 32+ byte string; not the dev default).
SECRET = "bench-secret-0123456789abcdef0123456789abcdef"


def steady_malloc() -> bool:
    """Make glibc keep freed memory in the process instead of handing it back
    to the kernel and faulting it in again on the next allocation. Decoding
    a stream allocates and frees ~16 KB bodies by the dozen. With the default
    trim and mmap thresholds, the page faults this causes depended on what
    the process had run before: the Batch-decode ratio core/wire moved
    between 1.1 and 3.1 with the same code. Only the benchmark processes
    call this. Returns False where it is not available (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(mallopt(M_MMAP_THRESHOLD, 1 << 25))


def auth_token(ttl: float = 30 * 24 * 3600.0) -> str:
    """A Hello token as a viewer presents it: a user and a short room list."""
    return auth.mint(SECRET, "u48213377", rooms=[ROOM, "live-10001", "lobby"], ttl=ttl)


def verify(token: str) -> auth.Claims:
    return auth.verify(token, SECRET)
