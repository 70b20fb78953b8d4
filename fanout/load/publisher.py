"""The publisher: a thread of the driver that POSTs protobuf
``PublishRequest`` batches to the node's admin API (``/v1/publish``) at a
fixed rate, round-robin over the rooms, and counts what the node accepted.

Requests are assembled from bytes encoded up front (each room's field and
a pool of corpus messages with their other fields in protobuf form), so a
message costs a few concatenations instead of a protobuf object: the
publisher must keep up with the rate on one core, next to the driver.
"""

from __future__ import annotations

import http.client
import resource
import threading
import time

from ..protocol import fanout_pb2 as pb
from ..protocol.wire import KIND_CODES, encode_varint
from .config import LoadConfig, LoadError
from .corpus import Corpus

__all__ = ["Publisher"]

_GIFT_PRIORITY = 5


def _field(tag: int, data: bytes) -> bytes:
    return bytes((tag,)) + encode_varint(len(data)) + data


class Publisher(threading.Thread):
    """Publishes ``rate`` messages/s for ``length`` seconds through the admin
    API (protobuf ``PublishRequest``), one request every ``tick`` seconds.

    :ivar accepted: messages the node accepted, in total.
    :ivar accepted_by_room: per room index.
    :ivar accepted_by_kind: per kind name.
    :ivar rejected: refusals by reason name (``"http_error"`` for failed requests).
    """

    POOL = 4096   # distinct message texts, cycled

    def __init__(self, cfg: LoadConfig, host: str, length: float) -> None:
        super().__init__(name="fanout-load-publisher", daemon=True)
        self.cfg = cfg
        self.host = host
        self.length = length
        self.rate = cfg.rate
        self.tick = cfg.tick
        self.sent = self.accepted = 0
        self.accepted_by_room = [0] * cfg.rooms
        self.accepted_by_kind: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.requests = 0
        self.request_s = 0.0
        self.cpu_s = 0.0
        self.started_at = self.ended_at = 0.0
        self.behind = 0.0          # longest the publisher ran late (s)
        self.error: str | None = None
        self._halt = threading.Event()
        corpus = Corpus(cfg.seed)
        size = cfg.payload_bytes
        # Publish fields by tag byte: room 0x0A, kind 0x10, priority 0x18,
        # sender 0x22, payload 0x2A (the 8-byte timestamp, then the text).
        self._rooms = [_field(0x0A, cfg.room_name(r).encode()) for r in range(cfg.rooms)]
        self._pool = []
        for _ in range(self.POOL):
            kind, sender, text = corpus.message(cfg.gift_share)
            body = corpus.pad(text, size - 8)
            mid = bytes((0x10,)) + encode_varint(KIND_CODES[kind])
            if kind == "gift":
                mid += bytes((0x18,)) + encode_varint(_GIFT_PRIORITY)
            mid += _field(0x22, sender.encode()) + bytes((0x2A,)) + encode_varint(size)
            self._pool.append((kind, mid, body))

    def stop(self) -> None:
        self._halt.set()

    def _request(self, conn: http.client.HTTPConnection, n: int) -> None:
        items, meta = [], []
        stamp = time.time_ns().to_bytes(8, "little")
        for _ in range(n):
            i = self.sent
            kind, mid, body = self._pool[i % self.POOL]
            room = i % self.cfg.rooms
            msg = self._rooms[room] + mid + stamp + body
            items.append(b"\x0a" + encode_varint(len(msg)) + msg)
            meta.append((room, kind))
            self.sent += 1
        t0 = time.monotonic()
        try:
            conn.request("POST", "/v1/publish", b"".join(items), {
                "Content-Type": "application/x-protobuf",
                "Authorization": f"Bearer {self.cfg.api_key}"})
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            self.rejected["http_error"] = self.rejected.get("http_error", 0) + n
            return
        finally:
            self.requests += 1
            self.request_s += time.monotonic() - t0
        if response.status != 200 and response.headers.get_content_type() != "application/x-protobuf":
            key = f"http_{response.status}"
            self.rejected[key] = self.rejected.get(key, 0) + n
            if response.status in (401, 403):
                raise LoadError(f"admin API refused the key: {data[:200]!r}")
            return
        results = pb.PublishResponse.FromString(data).results
        for (room, kind), res in zip(meta, results):
            if res.seq:
                self.accepted += 1
                self.accepted_by_room[room] += 1
                self.accepted_by_kind[kind] = self.accepted_by_kind.get(kind, 0) + 1
            else:
                name = pb.Reason.Name(res.reason) if res.reason in pb.Reason.values() \
                    else str(res.reason)
                self.rejected[name] = self.rejected.get(name, 0) + 1

    def run(self) -> None:
        cfg = self.cfg
        conn = http.client.HTTPConnection(self.host, cfg.admin_port, timeout=10)
        try:
            self.started_at = t0 = time.monotonic()
            end = t0 + self.length
            next_tick = t0
            while not self._halt.is_set():
                now = time.monotonic()
                if now >= end:
                    break
                self.behind = max(self.behind, now - next_tick)
                due = int(self.rate * (now - t0)) - self.sent
                while due > 0:
                    n = min(due, 1000)
                    self._request(conn, n)
                    due -= n
                next_tick += self.tick
                delay = next_tick - time.monotonic()
                if delay > 0:
                    self._halt.wait(delay)
                else:
                    next_tick = time.monotonic()
        except Exception as exc:  # reported by the driver
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ended_at = time.monotonic()
            ru = resource.getrusage(resource.RUSAGE_THREAD)
            self.cpu_s = ru.ru_utime + ru.ru_stime
            conn.close()
