"""The message stream the peers send: the same seeded corpus as `fanout load`.

``fanout.load.corpus`` (the load generator's seeded chat/gift corpus) is the
source. Only where it cannot be imported does a small built-in corpus of the
same shape stand in; :data:`SOURCE` says which one a run used, and every
result file records it.

Also here: the V1-style JSON encoding of a message (the baseline of the
wire-bytes scenario and what ``naive_server.py``, ``ws_server.py`` and the
Node peers in ``node/`` send),
and the engine's encoding of the same message, so both are built from one
place.
"""

from __future__ import annotations

import json
import random
import time
from typing import Iterator, NamedTuple

CHAT, GIFT = 1, 2          # fanout.v1.Kind values


class Msg(NamedTuple):
    kind: int              # CHAT or GIFT
    sender: str            # user id
    payload: bytes         # application bytes (what a client app would send)
    priority: int


def _fallback(seed: int) -> Iterator[Msg]:
    rng = random.Random(seed)
    nick_a = ["小", "阿", "Lucky", "Mr", "cat", "星", "Moon", "夜", "dj", "龙"]
    nick_b = ["鱼", "杰", "Star", "_wang", "coco", "辰", "ray", "雨", "123", "fan"]
    phrases = ["666", "主播好美", "哈哈哈哈", "gg", "来了来了", "这波可以", "前排", "awsl",
               "nice!!", "冲冲冲", "爱了爱了", "what a play", "谢谢老板", "第一次来"]
    emoji = ["", "", "😂", "👍", "🔥", "❤️", "🎉", "😭"]
    gifts = [("rose", 1), ("rocket", 500), ("heart", 10), ("car", 200), ("plane", 1000)]
    users = [f"u{rng.randrange(10**7, 10**8)}" for _ in range(5000)]
    nicks = {u: rng.choice(nick_a) + rng.choice(nick_b) for u in users}
    while True:
        user = rng.choice(users)
        if rng.random() < 0.5:
            text = rng.choice(phrases) + rng.choice(emoji)
            body = {"n": nicks[user], "t": text}
            yield Msg(CHAT, user, json.dumps(body, ensure_ascii=False,
                                             separators=(",", ":")).encode(), 0)
        else:
            gift, value = rng.choice(gifts)
            body = {"n": nicks[user], "g": gift, "c": rng.choice((1, 1, 1, 2, 5, 10))}
            yield Msg(GIFT, user, json.dumps(body, ensure_ascii=False,
                                             separators=(",", ":")).encode(),
                      5 if value >= 200 else 0)


PAYLOAD_BYTES = 50         # the reference load: about 50 B of payload each


def _from_corpus(seed: int) -> Iterator[Msg] | None:
    try:
        from fanout.load.corpus import Corpus
    except ImportError:
        return None
    return _adapt(Corpus(seed), seed)


def _adapt(corpus, seed: int) -> Iterator[Msg]:
    # The load generator's corpus (fanout/load/corpus.py), half chat, half gifts,
    # each payload its text cut or padded with more chat to exactly 50 B.
    # Without the load generator's 8-byte latency stamp: the peers and the
    # wire-bytes scenario compare encodings of the same text, and a V1 JSON
    # line could not carry raw binary anyway.
    while True:
        kind, sender, text = corpus.message(gift_share=0.5)
        yield Msg(GIFT if kind == "gift" else CHAT, sender,
                  corpus.pad(text, PAYLOAD_BYTES), 0)


SOURCE = "builtin"


def messages(seed: int = 1) -> Iterator[Msg]:
    """An endless seeded stream of chat and gift messages."""
    global SOURCE
    gen = _from_corpus(seed)
    if gen is not None:
        SOURCE = "fanout.corpus"
        return gen
    SOURCE = "builtin"
    return _fallback(seed)


def take(n: int, seed: int = 1) -> list[Msg]:
    it = messages(seed)
    return [next(it) for _ in range(n)]


# ---------------------------------------------------------------- encodings

try:
    from fanout.protocol.wire import KIND_NAMES
except ImportError:        # no fanout here: only the built-in corpus's two kinds occur
    KIND_NAMES = {CHAT: "chat", GIFT: "gift"}


def v1_json(room: str, seq: int, m: Msg, ts_ms: int) -> bytes:
    """The V1-style line: every field of the engine's RoomMessage, as JSON.

    The payload (text) is embedded as a JSON string. A corpus payload cut
    to 50 B can end in a split UTF-8 character; it becomes U+FFFD.
    """
    payload = m.payload.decode("utf-8", "replace")
    obj = {"room": room, "seq": seq, "kind": KIND_NAMES.get(m.kind, m.kind),
           "priority": m.priority, "sender": m.sender, "payload": payload, "ts": ts_ms}
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def write_node_stream(path, n: int, seed: int = 1) -> str:
    """The first ``n`` messages of the stream for the Node peers
    (bench/peers/node/common.js), which cannot replay Python's seeded
    corpus: a header line, then one JSON array [kind, priority, sender,
    payload] a line, payload as :func:`v1_json` embeds it. Returns the
    corpus source."""
    it = messages(seed)            # sets SOURCE
    rows = [json.dumps({"corpus": SOURCE, "messages": n})]
    for _ in range(n):
        m = next(it)
        rows.append(json.dumps([KIND_NAMES.get(m.kind, m.kind), m.priority, m.sender,
                                m.payload.decode("utf-8", "replace")],
                               ensure_ascii=False, separators=(",", ":")))
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(rows) + "\n")
    return SOURCE


def now_ms() -> int:
    return time.time_ns() // 1_000_000
