"""wire-bytes: bytes per delivered message, the engine's frames against V1
JSON lines on the same corpus, in frames built offline (by batch size and by
codec) and end to end through a node, counted by viewers of its own."""

from __future__ import annotations

import http.client
import selectors
import socket
import threading
import time

from bench.peers import stream
from bench.scenarios.harness import API_KEY, SECRET, Node
from bench.scenarios.load import REF_ROOM
from bench.scenarios.peers import run_py_peer
from bench.scenarios.report import TARGETS


class RawViewers:
    """A few protocol viewers in one thread that count wire bytes and messages.

    Used by wire-bytes (no load generator needed): every byte a viewer
    receives after its join Ack counts, Batch frames, Presence and Pongs
    alike, so bytes per delivered message is the true downstream cost.
    """

    def __init__(self, host: str, port: int, room: str, n: int, user: str = "viewer") -> None:
        from fanout.protocol import wire
        from fanout.protocol.auth import mint
        from fanout.protocol import fanout_pb2 as pb
        self.wire, self.pb = wire, pb
        self.sel = selectors.DefaultSelector()
        self.viewers = []
        for i in range(n):
            s = socket.create_connection((host, port))
            s.sendall(wire.encode_frame(wire.FrameType.HELLO, pb.Hello(
                token=mint(SECRET, f"{user}-{i}"), device_id=f"d{i}")))
            s.sendall(wire.encode_frame(wire.FrameType.JOIN, pb.Join(req_id=1, room=room)))
            dec = wire.FrameDecoder()
            got_ack = False
            while not got_ack:
                for ftype, _f, body in dec.feed(s.recv(65536)):
                    if ftype == wire.FrameType.ACK:
                        got_ack = True
                        last = pb.Ack.FromString(body).seq
                    elif ftype == wire.FrameType.ERROR:
                        raise RuntimeError(pb.Error.FromString(body))
            s.setblocking(False)
            v = {"sock": s, "dec": dec, "bytes": 0, "messages": 0, "gaps": 0, "last": last,
                 "frames": 0}
            self.viewers.append(v)
            self.sel.register(s, selectors.EVENT_READ, v)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        pb, wire = self.pb, self.wire
        while not self.stop.is_set():
            for key, _ in self.sel.select(0.1):
                v = key.data
                try:
                    data = v["sock"].recv(1 << 20)
                except BlockingIOError:
                    continue
                if not data:
                    self.sel.unregister(v["sock"])
                    continue
                v["bytes"] += len(data)
                for ftype, _f, body in v["dec"].feed(data):
                    if ftype != wire.FrameType.BATCH:
                        continue
                    v["frames"] += 1
                    for m in pb.Batch.FromString(body).messages:
                        if m.seq > v["last"] + 1:
                            v["gaps"] += m.seq - v["last"] - 1
                        v["last"] = max(v["last"], m.seq)
                        v["messages"] += 1

    def close(self) -> list[dict]:
        self.stop.set()
        self.thread.join(5)
        for v in self.viewers:
            v["sock"].close()
        return [{k: v[k] for k in ("bytes", "messages", "gaps", "frames")} for v in self.viewers]


def publish_stream(admin_port: int, room: str, rate: float, duration: float,
                   seed: int = 1, tick: float = 0.01) -> dict:
    """Publish the corpus to ``room`` through the admin API (protobuf batches
    every ``tick`` seconds) at ``rate`` messages/s for ``duration`` s."""
    from fanout.protocol import fanout_pb2 as pb
    src = stream.messages(seed)
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=30)
    headers = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {API_KEY}"}
    t0 = time.monotonic()
    sent = refused = 0
    while True:
        now = time.monotonic()
        if now - t0 >= duration:
            break
        due = int((now - t0) * rate) - sent - refused
        if due > 0:
            msgs = [next(src) for _ in range(min(due, 1000))]
            body = pb.PublishRequest(messages=[
                pb.Publish(room=room, kind=m.kind, priority=m.priority, sender=m.sender,
                           payload=m.payload) for m in msgs]).SerializeToString()
            conn.request("POST", "/v1/publish", body, headers)
            resp = pb.PublishResponse.FromString(conn.getresponse().read())
            for r in resp.results:
                if r.seq:
                    sent += 1
                else:
                    refused += 1
        time.sleep(tick)
    conn.close()
    return {"published": sent, "refused": refused, "seconds": round(time.monotonic() - t0, 3)}


#: The node's compression settings before the pre-shared dictionary (issue
#: 10), for the before/after comparison in the same run.
BEFORE = dict(compress_dict=0, compress_min=256, compress_level=4)
QUIET_ROOM = "quiet-wire-0"
QUIET_RATE = 5.0           # msg/s: the quiet-rooms scenario's rate per room


def run_node(settings: dict, room_viewers: int, quiet_viewers: int, rate: float,
             duration: float) -> dict:
    """One node: the reference room at ``rate`` and a quiet room at 5 msg/s
    side by side, each with raw viewers counting every byte they receive."""
    node = Node(**settings)
    try:
        viewers = RawViewers(node.host, node.port, REF_ROOM, room_viewers)
        # other users: one login per user and device class
        quiet = RawViewers(node.host, node.port, QUIET_ROOM, quiet_viewers, user="quiet")
        quiet_pub: dict = {}
        t = threading.Thread(target=lambda: quiet_pub.update(publish_stream(
            node.admin_port, QUIET_ROOM, QUIET_RATE, duration, tick=0.05)))
        t.start()
        pub = publish_stream(node.admin_port, REF_ROOM, rate, duration)
        t.join()
        time.sleep(1.0)
        counts = viewers.close()
        quiet_counts = quiet.close()
    finally:
        node.stop()

    def side(counts: list[dict], published: dict) -> dict:
        tot_bytes = sum(c["bytes"] for c in counts)
        tot_msgs = sum(c["messages"] for c in counts)
        frames = sum(c["frames"] for c in counts)
        return {"viewers": len(counts), "published": published["published"],
                "refused": published["refused"], "messages_delivered": tot_msgs,
                "expected_deliveries": published["published"] * len(counts),
                "gaps": sum(c["gaps"] for c in counts), "frames": frames,
                "messages_per_frame": round(tot_msgs / frames, 1) if frames else None,
                "bytes_per_message": round(tot_bytes / tot_msgs, 2) if tot_msgs else None}

    return {"settings": settings, "reference_room": side(counts, pub),
            "quiet_room": side(quiet_counts, quiet_pub), "node_command": node.command}


def wire_bytes(quick: bool) -> dict:
    """Bytes per delivered message: engine frames vs V1 JSON lines, same corpus."""
    from fanout import _core
    n = 4000 if quick else 20000
    room = REF_ROOM
    msgs = stream.take(n)
    ts = stream.now_ms()
    records = [_core.encode_room_message(room, i + 1, m.kind, m.priority, m.sender,
                                         m.payload, ts + i // 2) for i, m in enumerate(msgs)]
    v1 = [stream.v1_json(room, i + 1, m, ts + i // 2) for i, m in enumerate(msgs)]
    v1_per = sum(map(len, v1)) / n
    static = []
    for per in (1, 20, 50, 100, 200):
        total = sum(len(_core.pack_frame(0x43, b"".join(records[i:i + per]), 256))
                    for i in range(0, n, per))
        static.append({"messages_per_frame": per, "bytes_per_message": round(total / n, 2),
                       "ratio_to_v1": round(total / n / v1_per, 4)})
    payload_per = sum(len(m.payload) for m in msgs) / n
    breakdown = codec_breakdown(records, msgs, room, ts, per=200)
    levers = codec_levers(records, v1_per)

    # End to end through real nodes, the settings before and after the
    # dictionary in the same run: viewers count every byte they receive.
    duration = 3.0 if quick else 20.0
    rate = 2000.0
    common = dict(max_delay_ms=100, room_budget=100000)
    nviewers = 5 if quick else 20
    before = run_node({**common, **BEFORE}, nviewers, nviewers, rate, duration)
    after = run_node(common, nviewers, nviewers, rate, duration)
    e2e = after["reference_room"]

    # V1 end to end: the naive server's JSON lines through a socket, same corpus.
    naive = run_py_peer("naive", nviewers, rate, duration, rooms=1, room=room)
    v1_e2e = naive["wire_bytes_per_message"]

    def ratio(side: dict) -> float | None:
        return round(side["bytes_per_message"] / v1_e2e, 4) if side["bytes_per_message"] else None

    r = ratio(e2e)
    return {
        "corpus": stream.SOURCE, "messages": n,
        "mean_payload_bytes": round(payload_per, 2),
        "v1_json_bytes_per_message": round(v1_per, 2),
        "protobuf_record_bytes_per_message": round(sum(map(len, records)) / n, 2),
        "static_by_batch_size": static,
        "breakdown_200_per_frame": breakdown,
        "levers": levers,
        "engine_end_to_end": {**e2e, "node_command": after["node_command"]},
        "quiet_room_end_to_end": {**after["quiet_room"], "ratio_to_v1": ratio(after["quiet_room"])},
        "before": {"settings": before["settings"],
                   "reference_room": {**before["reference_room"],
                                      "ratio_to_v1": ratio(before["reference_room"])},
                   "quiet_room": {**before["quiet_room"],
                                  "ratio_to_v1": ratio(before["quiet_room"])},
                   "node_command": before["node_command"]},
        "v1_end_to_end": {"bytes_per_message": v1_e2e, "gaps": naive["gaps"],
                          "messages": naive["reader"]["messages"],
                          "server_command": naive["server_command"],
                          "reader_command": naive["reader_command"]},
        "ratio_engine_to_v1": r,
        "target": TARGETS["wire-bytes"],
        "verdict": "met" if r is not None and r <= 0.15 else "missed",
    }


def codec_levers(records: list[bytes], v1_per: float) -> dict:
    """What each cheap lever gives on the corpus, with the build time per
    frame (once per room flush, whatever the room's size): lz4 level and the
    pre-shared dictionary at 1 (a quiet room), 200 (the reference room at
    100 ms) and 400 (at 200 ms) messages per frame."""
    from fanout import _core
    out = []
    for per in (1, 200, 400):
        bodies = [b"".join(records[i:i + per]) for i in range(0, len(records) - per + 1, per)]
        bodies = bodies[:2000]
        for dict_id in (0, 1):
            for level in (0, 4, 9, 10, 12):
                t0 = time.perf_counter()
                frames = [_core.pack_frame(0x43, b, 1, level, dict_id) for b in bodies]
                spent = time.perf_counter() - t0
                per_msg = sum(map(len, frames)) / (len(bodies) * per)
                out.append({"messages_per_frame": per, "dictionary": dict_id, "level": level,
                            "bytes_per_message": round(per_msg, 2),
                            "ratio_to_v1": round(per_msg / v1_per, 4),
                            "build_us_per_frame": round(spent / len(bodies) * 1e6, 1)})
    return {"rows": out}


def codec_breakdown(records: list[bytes], msgs: list, room: str, ts: int, per: int) -> dict:
    """Where the bytes of a 200-message frame go: the same bodies under other
    codecs, and with one field left out of every record (bytes per message)."""
    import zlib

    import lz4.block
    from fanout import _core

    def per_msg(bodies: list[bytes], codec) -> float:
        return round(sum(8 + len(codec(b)) for b in bodies) / (len(bodies) * per), 2)

    def batches(recs: list[bytes]) -> list[bytes]:
        return [b"".join(recs[i:i + per]) for i in range(0, len(recs) - per + 1, per)]

    def lz4_default(b):
        return lz4.block.compress(b, store_size=True)

    bodies = batches(records)

    def without(**drop) -> list[bytes]:
        recs = []
        for i, m in enumerate(msgs):
            recs.append(_core.encode_room_message(
                "" if "room" in drop else room, 0 if "seq" in drop else i + 1, m.kind,
                m.priority, "" if "sender" in drop else m.sender,
                b"" if "payload" in drop else m.payload, 0 if "ts" in drop else ts + i // 2))
        return batches(recs)

    return {
        "uncompressed": per_msg(bodies, lambda b: b),
        "lz4 (the engine)": per_msg(bodies, lz4_default),
        "lz4 high compression": per_msg(bodies, lambda b: lz4.block.compress(
            b, mode="high_compression", store_size=True)),
        "zlib level 6": per_msg(bodies, lambda b: zlib.compress(b, 6)),
        "lz4 without sender": per_msg(without(sender=1), lz4_default),
        "lz4 without seq": per_msg(without(seq=1), lz4_default),
        "lz4 without server_ts_ms": per_msg(without(ts=1), lz4_default),
        "lz4 without payload": per_msg(without(payload=1), lz4_default),
    }
