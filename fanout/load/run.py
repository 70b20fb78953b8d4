"""The load generator: ``fanout load``.

Drives a node the way a live room does: thousands of viewers that
authenticate, join and read exactly like real clients, and a publisher that
pushes chat and gifts through the admin API at a fixed rate. It checks what
every viewer received and reports deliveries/s, frames/s, bytes on the wire
per delivered message, publish-to-receive latency, gaps, reorders,
divergences and slow-consumer cuts, as a live terminal view and a JSON result.

Processes:

* **viewer workers**: the viewers are spread over worker processes (spawned
  with :mod:`multiprocessing`), at most :data:`MAX_PER_PROCESS` each because a
  process can hold only about 19.9k sockets here. Each worker runs one
  :class:`fanout._loadgen.Viewers`: raw sockets and one epoll loop in C
  (``pyx/loadgen.pyx`` describes the checking method);
* **the driver** (this process): plans the run, shows progress, collects the
  results; the **publisher** is a thread of it that POSTs protobuf batches to
  ``/v1/publish``. Every payload starts with the 8-byte little-endian
  ``CLOCK_REALTIME`` ns timestamp taken just before its request is sent
  (:func:`fanout.corpus.stamp`), followed by corpus text (:mod:`fanout.corpus`).

Phases: connect and join every viewer (``time_to_all_joined_s``); publish for
``warmup + duration`` seconds, measuring only after the warm-up; then drain,
waiting until every accepted message has reached every live viewer (or
``drain_timeout``), and verify every viewer's stream.

Use it from Python with :func:`run`::

    from fanout.load import LoadConfig, run
    result = run(LoadConfig(port=7000, admin_port=7001, api_key="k",
                            viewers=1000, rate=2000, duration=10))
    print(result["deliveries_per_s"], result["latency_ms"]["p99"])
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import http.client
import ipaddress
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import resource
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from ..protocol.auth import DEV_SECRET
from .corpus import Corpus
from ..protocol import fanout_pb2 as pb
from ..protocol.wire import KIND_CODES, encode_varint

__all__ = ["LoadConfig", "LoadError", "run", "plan", "build_viewers", "Publisher", "MAX_PER_PROCESS", "SCHEMA", "CHECK_METHOD"]

#: Most viewers one worker process holds (the open-file limit is 20,000).
MAX_PER_PROCESS = 19_000
#: Version tag of the JSON result.
SCHEMA = "fanout.load/1"
#: How the result's ``gaps``, ``reorders`` and ``divergences`` were found.
CHECK_METHOD = (
    "Sampled viewers (every decode_every-th, and the first of each room in each "
    "process) inflate every Batch and check that each room's seq goes up by exactly "
    "1 from the join Ack (gaps: holes, reorders: seq <= last); they also build the "
    "room's reference, a rolling hash of its Batch frames. The node writes one frame "
    "object to every member of a room, so every other viewer must have received an "
    "exact run of the reference's frames: each keeps a rolling hash "
    "(chain = chain*P + h(frame)) and is aligned by the first seq of its first Batch "
    "(inflated once per viewer, which also checks its join point). A mismatch is a "
    "divergence; cut viewers must hold an exact prefix. Viewers the reference cannot "
    "cover are counted as unverified, not as passed."
)

_REPORT_EVERY = 0.25        # seconds between a worker's progress reports
_SLICE = 0.02               # seconds a worker runs its loop between pipe checks
_VIEWERS_PER_SOURCE = 1000  # viewers per source address with source_addrs="auto"
_GIFT_PRIORITY = 5


class LoadError(RuntimeError):
    """The run could not be carried out (a worker failed, nobody joined, ...)."""


@dataclass
class LoadConfig:
    """Parameters of a load run (``fanout load --help`` describes each).

    :ivar processes: viewer worker processes; 0 picks
        ``ceil(viewers / MAX_PER_PROCESS)``.
    :ivar rate: messages per second the publisher offers in total, spread
        round-robin over the rooms; 0 is the idle mode (no publisher: viewers
        only keep their connections alive with pings).
    :ivar source_addrs: ``"auto"`` binds each viewer to one of several
        loopback source addresses (1,000 viewers per address) when the node
        is on IPv4 loopback, so the node's per-address connection rate limit
        and the ephemeral port range apply per simulated client network, as
        with real viewers; ``"none"`` lets the kernel pick; or a
        comma-separated list of numeric addresses.
    """

    host: str = "127.0.0.1"
    port: int = 7000
    admin_host: str = ""                 # "": same as host
    admin_port: int = 7001
    api_key: str = ""
    secret: str = DEV_SECRET
    viewers: int = 1000
    rooms: int = 1
    rate: float = 2000.0
    gift_share: float = 0.5
    payload_bytes: int = 50
    duration: float = 10.0
    warmup: float = 2.0
    processes: int = 0
    decode_every: int = 50
    latency_every: int = 1
    seed: int = 0
    node_pid: int | None = None
    connect_window: int = 256
    read_interval: float = 0.0
    source_addrs: str = "auto"
    room_prefix: str = "load-room-"
    max_retries: int = 8
    connect_timeout: float = 10.0
    join_timeout: float = 120.0
    drain_timeout: float = 5.0
    tick: float = 0.01                   # publisher: seconds between requests
    progress: bool = True

    def validate(self) -> "LoadConfig":
        """Check the values; returns self. :raises ValueError: on a bad value."""
        if self.viewers < 1:
            raise ValueError("viewers must be >= 1")
        if self.rooms < 1 or self.rooms > self.viewers:
            raise ValueError("rooms must be between 1 and the number of viewers")
        if self.rate < 0:
            raise ValueError("rate must be >= 0")
        if not 0.0 <= self.gift_share <= 1.0:
            raise ValueError("gift_share must be between 0 and 1")
        if self.payload_bytes < 8:
            raise ValueError("payload_bytes must be >= 8 (the timestamp)")
        if self.duration <= 0 or self.warmup < 0:
            raise ValueError("duration must be > 0 and warmup >= 0")
        if self.processes < 0 or self.decode_every < 1 or self.latency_every < 1:
            raise ValueError("processes must be >= 0; decode_every and latency_every >= 1")
        if self.processes and math.ceil(self.viewers / self.processes) > MAX_PER_PROCESS:
            raise ValueError(f"at most {MAX_PER_PROCESS} viewers per process: "
                             f"use at least {math.ceil(self.viewers / MAX_PER_PROCESS)} processes")
        if self.processes > self.viewers:
            raise ValueError("more processes than viewers")
        if self.rate > 0 and not self.api_key:
            raise ValueError("publishing needs the node's admin API key (--api-key)")
        return self

    @property
    def process_count(self) -> int:
        """Worker processes this run uses."""
        return self.processes or math.ceil(self.viewers / MAX_PER_PROCESS)

    def room_name(self, index: int) -> str:
        return f"{self.room_prefix}{index}"


# ---------------------------------------------------------------- planning

def _numeric(host: str, port: int) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]


def _source_addrs(cfg: LoadConfig, host: str, proc: int, count: int) -> list[str]:
    mode = cfg.source_addrs.strip()
    if mode == "none" or not mode:
        return []
    if mode != "auto":
        return [a.strip() for a in mode.split(",") if a.strip()]
    addr = ipaddress.ip_address(host)
    if addr.version != 4 or not addr.is_loopback:
        return []
    k = max(1, math.ceil(count / _VIEWERS_PER_SOURCE))
    return [f"127.{1 + proc // 250}.{proc % 250}.{j + 1}" for j in range(min(k, 254))]


def plan(cfg: LoadConfig, host: str | None = None) -> list[dict]:
    """One spec per viewer worker: its slice of viewers and everything it
    needs (see :func:`build_viewers`).

    :param host: the node's numeric address (default: ``cfg.host`` resolved).
    """
    host = host or _numeric(cfg.host, cfg.port)
    procs = cfg.process_count
    base, extra = divmod(cfg.viewers, procs)
    specs, start = [], 0
    for p in range(procs):
        count = base + (1 if p < extra else 0)
        specs.append({
            "proc": p, "host": host, "port": cfg.port, "secret": cfg.secret,
            "start": start, "count": count, "rooms": cfg.rooms,
            "room_names": [cfg.room_name(r) for r in range(cfg.rooms)],
            "decode_every": cfg.decode_every, "latency_every": cfg.latency_every,
            "connect_window": cfg.connect_window, "read_interval": cfg.read_interval,
            "source_addrs": _source_addrs(cfg, host, p, count),
            "max_retries": cfg.max_retries, "connect_timeout": cfg.connect_timeout,
            "ttl": cfg.join_timeout + cfg.warmup + cfg.duration + 3600,
        })
        start += count
    return specs


# ---------------------------------------------------------------- worker process

def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def build_viewers(spec: dict):
    """The :class:`fanout._loadgen.Viewers` of one worker spec from :func:`plan`:
    a minted token and Hello frame per viewer (user ``load-<proc>-<i>``, device
    class ``mobile``) and a Join frame per room.
    """
    from .. import _loadgen
    from ..protocol.auth import mint
    from ..protocol.wire import FrameType, encode_frame

    rooms = spec["rooms"]
    p = spec["proc"]
    hellos, room_of = [], []
    for i in range(spec["count"]):
        user = f"load-{p}-{i}"
        token = mint(spec["secret"], user, ttl=spec["ttl"])
        hellos.append(encode_frame(FrameType.HELLO, pb.Hello(
            token=token, device_id=user, device_class="mobile", client="fanout-load/1"),
            compress_min=0))
        room_of.append((spec["start"] + i) % rooms)
    joins = [encode_frame(FrameType.JOIN, pb.Join(req_id=1, room=name), compress_min=0)
             for name in spec["room_names"]]
    return _loadgen.Viewers(
        spec["host"], spec["port"], hellos, room_of, joins, spec["room_names"],
        decode_every=spec["decode_every"], connect_window=spec["connect_window"],
        source_addrs=spec["source_addrs"], latency_every=spec["latency_every"],
        max_retries=spec["max_retries"], connect_timeout=spec["connect_timeout"],
        read_interval=spec.get("read_interval", 0.0))


def _snapshot(viewers) -> dict:
    stats = viewers.stats()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    stats["cpu_s"] = ru.ru_utime + ru.ru_stime
    stats["cpu_user_s"] = ru.ru_utime
    stats["cpu_sys_s"] = ru.ru_stime
    stats["t"] = time.monotonic()
    p50, p99 = viewers.latency_percentiles((50.0, 99.0))
    stats["lat_p50_ns"], stats["lat_p99_ns"] = p50, p99
    return stats


def _worker_main(pipe, spec: dict) -> None:
    """Entry point of a viewer worker process (see :func:`run`)."""
    viewers = None
    try:
        viewers = build_viewers(spec)
        pipe.send(("ready", spec["proc"], os.getpid()))
        started = False
        last_report = 0.0
        while True:
            if started:
                viewers.run_for(_SLICE)
            elif not pipe.poll(_SLICE):
                continue
            while pipe.poll():
                cmd = pipe.recv()
                op = cmd[0]
                if op == "start":
                    viewers.start()
                    started = True
                elif op == "snap":
                    pipe.send(("snap", cmd[1], spec["proc"], _snapshot(viewers)))
                elif op == "reset_latency":
                    viewers.reset_latency()
                elif op == "final":
                    viewers.recording = False
                    pipe.send(("final", spec["proc"], {
                        "stats": _snapshot(viewers), "verify": viewers.verify(),
                        "latency": viewers.latency_buckets(), "ends": viewers.ends(),
                        "members": viewers.room_members(), "pid": os.getpid()}))
                elif op == "quit":
                    viewers.close()
                    return
            now = time.monotonic()
            if started and now - last_report >= _REPORT_EVERY:
                last_report = now
                pipe.send(("stats", spec["proc"], _snapshot(viewers)))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return
    except BaseException:
        try:
            pipe.send(("error", spec["proc"], traceback.format_exc()))
        except Exception:
            pass
    finally:
        if viewers is not None:
            viewers.close()


class _Fleet:
    """The driver's handle on its worker processes."""

    def __init__(self, specs: list[dict]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.specs = specs
        self.pipes, self.procs = [], []
        for spec in specs:
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(theirs, spec),
                               name=f"fanout-load-{spec['proc']}", daemon=True)
            self.pipes.append(ours)
            self.procs.append(proc)
        self.latest: list[dict | None] = [None] * len(specs)
        self.pids: list[int | None] = [None] * len(specs)
        self._replies: dict = {}

    def start(self, timeout: float = 120.0) -> None:
        for proc in self.procs:
            proc.start()
        ready = 0
        deadline = time.monotonic() + timeout
        while ready < len(self.procs):
            if time.monotonic() > deadline:
                raise LoadError("viewer workers did not start in time")
            for msg in self.pump(0.05):
                if msg[0] == "ready":
                    self.pids[msg[1]] = msg[2]
                    ready += 1

    def send_all(self, *cmd) -> None:
        for pipe in self.pipes:
            pipe.send(cmd)

    def pump(self, timeout: float = 0.0) -> list:
        """Receive what the workers sent; keeps their latest stats."""
        out = []
        ready = multiprocessing.connection.wait(self.pipes, timeout)
        for pipe in ready:
            while pipe.poll():
                try:
                    msg = pipe.recv()
                except EOFError:
                    p = self.pipes.index(pipe)
                    raise LoadError(f"viewer worker {p} exited unexpectedly "
                                    f"(exit code {self.procs[p].exitcode})") from None
                if msg[0] == "error":
                    raise LoadError(f"viewer worker {msg[1]} failed:\n{msg[2]}")
                if msg[0] in ("stats", "snap"):
                    stats = msg[-1]
                    self.latest[msg[-2]] = stats
                out.append(msg)
        return out

    def request(self, op: str, timeout: float = 30.0) -> list:
        """Send ``op`` to every worker and return their replies in order."""
        tag = time.monotonic_ns()
        if op == "snap":
            self.send_all(op, tag)
        else:
            self.send_all(op)
        replies: list = [None] * len(self.pipes)
        deadline = time.monotonic() + timeout
        while any(r is None for r in replies):
            if time.monotonic() > deadline:
                raise LoadError(f"viewer workers did not answer {op!r} in time")
            for msg in self.pump(0.05):
                if op == "snap" and msg[0] == "snap" and msg[1] == tag:
                    replies[msg[2]] = msg[3]
                elif op == "final" and msg[0] == "final":
                    replies[msg[1]] = msg[2]
        return replies

    def stop(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("quit",))
            except (OSError, BrokenPipeError):
                pass
        for proc in self.procs:
            if proc.pid is None:
                continue
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(2)


# ---------------------------------------------------------------- publisher

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


# ---------------------------------------------------------------- aggregation

_MAX_FIELDS = ("last_connected_ns", "last_join_ns", "latency_max_ns", "t")
_SKIP_FIELDS = ("lat_p50_ns", "lat_p99_ns", "first_connect_ns")


def _merge(stats: list[dict]) -> dict:
    """Sum the workers' counters (maxima for times, merged dicts for breakdowns)."""
    out: dict[str, Any] = {}
    for s in stats:
        if s is None:
            continue
        for key, value in s.items():
            if key in _SKIP_FIELDS:
                continue
            if isinstance(value, dict):
                d = out.setdefault(key, {})
                for k, v in value.items():
                    d[k] = d.get(k, 0) + v
            elif key in _MAX_FIELDS:
                out[key] = max(out.get(key, 0), value)
            else:
                out[key] = out.get(key, 0) + value
    firsts = [s["first_connect_ns"] for s in stats if s and s.get("first_connect_ns")]
    out["first_connect_ns"] = min(firsts) if firsts else 0
    p50s = [s["lat_p50_ns"] for s in stats if s and s.get("lat_p50_ns") is not None]
    p99s = [s["lat_p99_ns"] for s in stats if s and s.get("lat_p99_ns") is not None]
    out["lat_p50_ns"] = max(p50s) if p50s else None
    out["lat_p99_ns"] = max(p99s) if p99s else None
    return out


def _proc_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) used so far by process ``pid``."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _reason_name(code: int) -> str:
    try:
        return pb.Reason.Name(code)
    except ValueError:
        return str(code)


def _errors(final: dict) -> dict[str, int]:
    out: dict[str, int] = {}

    def add(key: str, n: int) -> None:
        if n:
            out[key] = out.get(key, 0) + n

    for code, n in final.get("kicks", {}).items():
        add(f"kick:{_reason_name(code)}", n)
    for code, n in final.get("errors", {}).items():
        add(f"error:{_reason_name(code)}", n)
    for key, n in final.get("errnos", {}).items():
        where, _, num = key.partition(":")
        name = errno_mod.errorcode.get(int(num), num) if num != "0" else "timeout"
        add(f"{where}:{name}", n)
    add("eof", final.get("eofs", 0))
    add("protocol", final.get("protocol_errors", 0))
    add("bad_body", final.get("bad_bodies", 0))
    add("join_refused", final.get("join_failed", 0))
    return out


def _ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


def _rate(a: dict, b: dict, key: str, seconds: float) -> float:
    return (b.get(key, 0) - a.get(key, 0)) / seconds if seconds > 0 else 0.0


# ---------------------------------------------------------------- progress

class _Progress:
    """The live terminal view (rich), or nothing."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        self.live = None
        self.phase = "starting"
        self.t0 = time.monotonic()
        self.prev: tuple[float, dict] | None = None
        self.rates: dict[str, float] = {}
        self.publisher: Publisher | None = None
        if cfg.progress:
            from rich.console import Console
            from rich.live import Live

            console = Console(stderr=True)
            self.live = Live(self._render({}), console=console, refresh_per_second=4,
                             transient=False)
            self.live.start()

    def update(self, phase: str | None, merged: dict) -> None:
        if phase:
            self.phase = phase
        if self.live is None:
            return
        now = time.monotonic()
        if self.prev is None or now - self.prev[0] >= 0.5:
            if self.prev is not None:
                dt = now - self.prev[0]
                for key in ("deliveries", "frames", "wire_bytes", "batch_frames"):
                    self.rates[key] = _rate(self.prev[1], merged, key, dt)
                if self.publisher is not None:
                    self.rates["published"] = (self.publisher.accepted
                                               - self.prev[1].get("_published", 0)) / dt
            merged = dict(merged)
            merged["_published"] = self.publisher.accepted if self.publisher else 0
            self.prev = (now, merged)
            self.live.update(self._render(merged))

    def _render(self, m: dict):
        from rich.table import Table

        r = self.rates
        table = Table(title=f"fanout load · {self.phase} · {time.monotonic() - self.t0:5.1f} s",
                      show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold cyan", justify="right")
        table.add_column()
        dl = r.get("deliveries", 0.0)
        table.add_row("viewers", f"{m.get('joined', 0):,} joined · {m.get('live', 0):,} live · "
                                 f"{m.get('connect_failed', 0):,} failed · "
                                 f"{m.get('retries', 0):,} retries")
        table.add_row("published", f"{r.get('published', 0.0):,.0f} msg/s accepted")
        table.add_row("deliveries", f"{dl:,.0f} /s")
        table.add_row("frames", f"{r.get('frames', 0.0):,.0f} /s "
                                f"({r.get('batch_frames', 0.0):,.0f} batches/s)")
        wire = r.get("wire_bytes", 0.0)
        per = f" · {wire / dl:.1f} B/msg" if dl else ""
        table.add_row("wire", f"{wire * 8 / 1e6:,.1f} Mbit/s{per}")
        table.add_row("latency", f"p50 {_fmt_ms(m.get('lat_p50_ns'))} · "
                                 f"p99 {_fmt_ms(m.get('lat_p99_ns'))} (worst process)")
        table.add_row("checks", f"gaps {m.get('gaps', 0)} · reorders {m.get('reorders', 0)} · "
                                f"slow-consumer cuts {m.get('slow_cuts', 0)}")
        return table

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def _fmt_ms(ns) -> str:
    return "-" if ns is None else f"{ns / 1e6:.1f} ms"


# ---------------------------------------------------------------- the run

def run(cfg: LoadConfig) -> dict:
    """Carry out one load run and return its result (the JSON document).

    Rates are over the measured window (``duration_s``, after the warm-up);
    totals cover the whole run including the drain. Main keys:

    * ``ok``: no gap, reorder or divergence, every viewer joined, and (when
      publishing) ``deliveries >= expected_deliveries``;
    * ``published``: ``offered``, ``accepted``, ``accepted_per_s``,
      ``by_kind``, ``rejected`` (by reason), ``request_ms_mean``;
    * ``deliveries`` (messages received by all viewers), ``expected_deliveries``
      (accepted messages x live members, per room), ``deliveries_per_s``,
      ``frames_per_s`` (all frames), ``batch_frames_per_s``,
      ``messages_per_batch``, ``wire_bytes_per_s``, ``wire_bytes_per_msg``
      (frame bytes read, control frames included, TCP/IP headers not);
    * ``latency_ms``: ``p50``, ``p99``, ``p999``, ``max``, ``mean``,
      ``samples`` and ``histogram`` (``[value_ns, count]`` pairs), publish
      (publisher's clock, just before the HTTP request) to receive;
    * ``gaps``, ``missing_messages``, ``reorders``, ``divergences``,
      ``node_gaps`` (Gap frames), ``slow_consumer_cuts``, ``errors``
      (``"kick:REASON"``, ``"error:REASON"``, ``"connect:ERRNO"``, ``"eof"``
      ... with counts, retried refusals included), ``ended`` (how viewers that
      ended did);
    * ``connect``: ``connects_per_s``, ``time_to_all_joined_s``, ``joined``,
      ``failed``, ``retries``;
    * ``cpu``: ``loadgen_s`` (workers + driver), ``workers_window_cores`` (and
      user/sys split), ``publisher_s``, ``node_s`` and ``node_window_cores``
      (with ``node_pid``);
    * ``check``: the method (:data:`CHECK_METHOD`) and its counts
      (``verified_viewers``, ``unverified_viewers``, ``cut_viewers``, ...);
    * ``config``, ``viewers``, ``viewers_joined``, ``processes``,
      ``decoded_viewers``, ``drain``, ``workers``, ``node_at_window_end``
      (the node's ``/readyz``: its degradation level).

    :raises LoadError: a worker failed, or no viewer could join.
    :raises ValueError: a bad configuration.
    """
    cfg.validate()
    host = _numeric(cfg.host, cfg.port)
    admin_host = cfg.admin_host or cfg.host
    specs = plan(cfg, host)
    fleet = _Fleet(specs)
    progress = _Progress(cfg)
    publisher: Publisher | None = None
    driver_cpu0 = _cpu_self()
    try:
        progress.update("starting workers", {})
        fleet.start()
        node_cpu_start = _proc_cpu(cfg.node_pid)

        # ---- connect and join
        progress.update("connecting", {})
        t_connect = time.monotonic()
        fleet.send_all("start")
        deadline = t_connect + cfg.join_timeout
        while True:
            fleet.pump(0.1)
            merged = _merge(fleet.latest)
            progress.update(None, merged)
            settled = all(s is not None and s["joined"] + s["connect_failed"] >= s["viewers"]
                          for s in fleet.latest)
            if settled or time.monotonic() > deadline:
                break
        joined_snap = _merge(fleet.request("snap"))
        if joined_snap["joined"] == 0:
            raise LoadError(f"no viewer joined: {_errors(joined_snap) or 'no errors seen'}")

        # ---- publish: warm-up, then the measured window
        length = cfg.warmup + cfg.duration
        if cfg.rate > 0:
            publisher = Publisher(cfg, admin_host, length)
            progress.publisher = publisher
            publisher.start()
        t_pub = time.monotonic()
        progress.update("warm-up" if cfg.warmup else "measuring", joined_snap)
        _wait(fleet, progress, t_pub + cfg.warmup, publisher)
        fleet.send_all("reset_latency")
        win_a = _merge(fleet.request("snap"))
        node_a = _proc_cpu(cfg.node_pid)
        pub_a = publisher.accepted if publisher else 0
        progress.update("measuring", win_a)
        _wait(fleet, progress, t_pub + length, publisher)
        if publisher is not None:
            publisher.stop()
            publisher.join(15)
        win_b = _merge(fleet.request("snap"))
        node_b = _proc_cpu(cfg.node_pid)
        node_state = _node_state(admin_host, cfg.admin_port) if cfg.rate > 0 else None
        pub_b = publisher.accepted if publisher else 0
        if publisher is not None and publisher.error:
            raise LoadError(f"publisher failed: {publisher.error}")

        # ---- drain: every accepted message to every live viewer
        progress.update("draining", win_b)
        drained = _drain(fleet, progress, cfg, publisher)
        finals = fleet.request("final")
        node_cpu_end = _proc_cpu(cfg.node_pid)
    finally:
        progress.close()
        if publisher is not None and publisher.is_alive():
            publisher.stop()
            publisher.join(5)
        fleet.stop()
    result = _result(cfg, specs, fleet, finals, joined_snap, win_a, win_b, pub_a, pub_b,
                     publisher, drained, driver_cpu0,
                     (node_cpu_start, node_a, node_b, node_cpu_end))
    result["node_at_window_end"] = node_state
    return result


def _node_state(host: str, port: int) -> dict | None:
    """The node's ``/readyz`` answer (degradation level), or None."""
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", "/readyz")
        return json.loads(conn.getresponse().read())
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _wait(fleet: _Fleet, progress: _Progress, until: float, publisher) -> None:
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return
        fleet.pump(min(left, 0.1))
        progress.update(None, _merge(fleet.latest))
        if publisher is not None and publisher.error:
            return


def _expected(publisher: Publisher | None, members: list[int]) -> int:
    if publisher is None:
        return 0
    return sum(a * m for a, m in zip(publisher.accepted_by_room, members))


def _drain(fleet: _Fleet, progress: _Progress, cfg: LoadConfig, publisher) -> dict:
    """Wait until the viewers have everything (or nothing moves for a second)."""
    t0 = time.monotonic()
    last_change, last_value = t0, None
    while True:
        fleet.pump(0.1)
        merged = _merge(fleet.latest)
        progress.update(None, merged)
        now = time.monotonic()
        # Batch frames only: Pongs and Presence keep coming while idle.
        value = (merged.get("deliveries", 0), merged.get("batch_frames", 0))
        if value != last_value:
            last_value, last_change = value, now
        caught_up = publisher is None or (
            merged.get("unresolved_frames", 1) == 0 and now - last_change >= 0.3
            and merged.get("batch_frames", 0) > 0)
        if caught_up or now - last_change >= 1.0 or now - t0 >= cfg.drain_timeout:
            return {"seconds": round(now - t0, 3), "complete": bool(caught_up)}


def _result(cfg, specs, fleet, finals, joined, a, b, pub_a, pub_b, publisher, drained,
            driver_cpu0, node_cpu) -> dict:
    from .._loadgen import bucket_value, percentiles_of

    final = _merge([f["stats"] for f in finals])
    window = b["t"] - a["t"]
    members = [sum(col) for col in zip(*(f["members"] for f in finals))]
    buckets: dict[int, int] = {}
    for f in finals:
        for index, count in f["latency"]:
            buckets[index] = buckets.get(index, 0) + count
    items = sorted(buckets.items())
    p50, p99, p999 = percentiles_of(items, (50.0, 99.0, 99.9))
    samples = final.get("latency_samples", 0)
    verify = {"divergences": 0, "verified": 0, "unverified": 0, "silent": 0, "cut": 0}
    for f in finals:
        for key in verify:
            verify[key] += f["verify"][key]
    # The processes' references of a room must agree with each other too.
    ref_mismatch = 0
    by_room: dict[str, set] = {}
    for f in finals:
        for room in f["verify"]["rooms"]:
            ref_mismatch += room["mismatches"]
            if room["frames"]:
                by_room.setdefault(room["room"], set()).add(
                    (room["frames"], room["chain"], room["first_seq"]))
    cross = sum(len(v) - 1 for v in by_room.values())
    deliveries_win = b["deliveries"] - a["deliveries"]
    wire_win = b["wire_bytes"] - a["wire_bytes"]
    ends: dict[str, int] = {}
    for f in finals:
        for k, n in f["ends"].items():
            how, _, code = k.partition(":")
            if how in ("kick", "error", "join"):
                k = f"{how}:{_reason_name(int(code))}"
            elif how in ("connect", "socket") and code != "0":
                k = f"{how}:{errno_mod.errorcode.get(int(code), code)}"
            ends[k] = ends.get(k, 0) + n
    connect_span = (joined.get("last_connected_ns", 0) - joined.get("first_connect_ns", 0)) / 1e9
    join_span = (joined.get("last_join_ns", 0) - joined.get("first_connect_ns", 0)) / 1e9
    workers_cpu = sum(f["stats"]["cpu_s"] for f in finals)
    workers_cpu_win = b["cpu_s"] - a["cpu_s"]
    driver_cpu = _cpu_self() - driver_cpu0
    pub_cpu = publisher.cpu_s if publisher else 0.0
    node_start, node_a, node_b, node_end = node_cpu
    expected = _expected(publisher, members)
    gaps = final.get("gaps", 0)
    result = {
        "schema": SCHEMA,
        "ok": None,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                   if k not in ("secret", "api_key", "progress")},
        "viewers": cfg.viewers,
        "viewers_joined": joined.get("joined", 0),
        "viewers_live_at_end": final.get("live", 0),
        "rooms": cfg.rooms,
        "processes": len(specs),
        "decoded_viewers": None,
        "duration_s": round(window, 3),
        "warmup_s": cfg.warmup,
        "published": {
            "rate_target": cfg.rate,
            "offered": publisher.sent if publisher else 0,
            "accepted": publisher.accepted if publisher else 0,
            "accepted_per_s": round((pub_b - pub_a) / window, 1) if window > 0 else 0.0,
            "by_kind": dict(publisher.accepted_by_kind) if publisher else {},
            "rejected": dict(publisher.rejected) if publisher else {},
            "requests": publisher.requests if publisher else 0,
            "request_ms_mean": round(publisher.request_s / publisher.requests * 1000, 3)
            if publisher and publisher.requests else None,
            "max_behind_ms": round(publisher.behind * 1000, 1) if publisher else None,
        },
        "deliveries": final.get("deliveries", 0),
        "expected_deliveries": expected,
        "deliveries_per_s": round(deliveries_win / window, 1) if window > 0 else 0.0,
        "frames": final.get("frames", 0),
        "frames_per_s": round(_rate(a, b, "frames", window), 1),
        "batch_frames_per_s": round(_rate(a, b, "batch_frames", window), 1),
        "messages_per_batch": round(deliveries_win / (b["batch_frames"] - a["batch_frames"]), 2)
        if b["batch_frames"] > a["batch_frames"] else None,
        "wire_bytes": final.get("wire_bytes", 0),
        "wire_bytes_per_s": round(wire_win / window, 1) if window > 0 else 0.0,
        "wire_bytes_per_msg": round(wire_win / deliveries_win, 2) if deliveries_win else None,
        "latency_ms": {
            "p50": _ms(p50), "p99": _ms(p99), "p999": _ms(p999),
            "max": _ms(final.get("latency_max_ns")) if samples else None,
            "mean": _ms(final.get("latency_sum_ns", 0) / samples) if samples else None,
            "samples": samples,
            "negative": final.get("latency_negative", 0),
            "histogram": [[bucket_value(i), c] for i, c in items],
        },
        "gaps": gaps,
        "missing_messages": final.get("missing", 0),
        "reorders": final.get("reorders", 0),
        "divergences": verify["divergences"] + ref_mismatch + cross,
        "node_gaps": final.get("node_gaps", 0),
        "slow_consumer_cuts": final.get("slow_cuts", 0),
        "errors": _errors(final),
        "ended": ends,
        "connect": {
            "connects_per_s": round(joined.get("connected", 0) / connect_span, 1)
            if connect_span > 0 else None,
            "time_to_all_joined_s": round(join_span, 3) if joined.get("joined") else None,
            "joined": joined.get("joined", 0),
            "failed": joined.get("connect_failed", 0),
            "retries": joined.get("retries", 0),
        },
        "cpu": {
            "loadgen_s": round(workers_cpu + driver_cpu, 3),
            "workers_s": round(workers_cpu, 3),
            "workers_window_s": round(workers_cpu_win, 3),
            "workers_window_cores": round(workers_cpu_win / window, 3) if window > 0 else None,
            "workers_window_user_s": round(b["cpu_user_s"] - a["cpu_user_s"], 3),
            "workers_window_sys_s": round(b["cpu_sys_s"] - a["cpu_sys_s"], 3),
            "driver_s": round(driver_cpu - pub_cpu, 3),
            "publisher_s": round(pub_cpu, 3),
            "node_s": round(node_end - node_start, 3) if node_start is not None
            and node_end is not None else None,
            "node_window_s": round(node_b - node_a, 3) if node_a is not None
            and node_b is not None else None,
            "node_window_cores": round((node_b - node_a) / window, 3)
            if node_a is not None and node_b is not None and window > 0 else None,
        },
        "check": {
            "method": CHECK_METHOD,
            "verified_viewers": verify["verified"],
            "unverified_viewers": verify["unverified"],
            "silent_viewers": verify["silent"],
            "cut_viewers": verify["cut"],
            "reference_mismatches": ref_mismatch,
            "cross_process_mismatches": cross,
            "join_point_gaps": final.get("join_point_gaps", 0),
            "foreign_messages": final.get("foreign", 0),
            "sampled_batches": final.get("sampled_batches", 0),
            "decoded_frames": final.get("decoded_frames", 0),
            "decoded_messages": final.get("decoded_msgs", 0),
            "unresolved_frames": final.get("unresolved_frames", 0),
        },
        "drain": drained,
        "workers": [{"pid": f["pid"], "viewers": f["stats"]["viewers"],
                     "cpu_s": round(f["stats"]["cpu_s"], 3),
                     "deliveries": f["stats"]["deliveries"]} for f in finals],
    }
    decoded = 0
    for spec in specs:
        seen: set[int] = set()
        for i in range(spec["count"]):
            room = (spec["start"] + i) % spec["rooms"]
            if i % spec["decode_every"] == 0 or room not in seen:
                decoded += 1
            seen.add(room)
    result["decoded_viewers"] = decoded
    result["ok"] = (result["gaps"] == 0 and result["reorders"] == 0
                    and result["divergences"] == 0 and result["viewers_joined"] == cfg.viewers
                    and (publisher is None or result["deliveries"] >= expected))
    return result


# ---------------------------------------------------------------- command line

def config_from_args(args) -> LoadConfig:
    """The :class:`LoadConfig` of parsed ``fanout load`` arguments."""
    return LoadConfig(
        host=args.host, port=args.port, admin_host=args.admin_host or "",
        admin_port=args.admin_port, api_key=args.api_key, secret=args.secret,
        viewers=args.viewers, rooms=args.rooms, rate=args.rate, gift_share=args.gift_share,
        payload_bytes=args.payload_bytes, duration=args.duration, warmup=args.warmup,
        processes=args.processes, decode_every=args.decode_every,
        latency_every=args.latency_every, seed=args.seed, node_pid=args.node_pid,
        connect_window=args.connect_window, read_interval=args.read_interval_ms / 1000,
        max_retries=args.max_retries,
        source_addrs=args.source_addrs,
        room_prefix=args.room_prefix, progress=not args.no_progress)


def summary(result: dict) -> str:
    """A few human-readable lines about a result."""
    lat = result["latency_ms"]
    conn = result["connect"]
    cpu = result["cpu"]
    lines = [
        f"viewers {result['viewers_joined']:,}/{result['viewers']:,} joined in "
        f"{conn['time_to_all_joined_s']} s ({conn['connects_per_s']} connects/s), "
        f"{result['processes']} process(es), {result['rooms']} room(s)",
        f"published {result['published']['accepted_per_s']:,} msg/s accepted; "
        f"deliveries {result['deliveries_per_s']:,.0f}/s; frames {result['frames_per_s']:,.0f}/s; "
        f"{result['wire_bytes_per_msg']} wire B/msg",
        f"latency p50 {lat['p50']} ms, p99 {lat['p99']} ms, p99.9 {lat['p999']} ms "
        f"({lat['samples']:,} samples)",
        f"gaps {result['gaps']}, reorders {result['reorders']}, divergences "
        f"{result['divergences']}, slow-consumer cuts {result['slow_consumer_cuts']}, "
        f"deliveries {result['deliveries']:,} of {result['expected_deliveries']:,} expected",
        f"cpu: load generator {cpu['workers_window_cores']} cores in the window "
        f"({cpu['loadgen_s']} s total); node {cpu['node_window_cores']} cores",
    ]
    if result["errors"]:
        lines.append("errors: " + ", ".join(f"{k} {v}" for k, v in sorted(result["errors"].items())))
    lines.append("OK" if result["ok"] else "NOT OK")
    return "\n".join(lines)


def main(args) -> int:
    """``fanout load``: run, print a summary, write the JSON result."""
    try:
        cfg = config_from_args(args).validate()
    except ValueError as exc:
        print(f"fanout load: {exc}", file=sys.stderr)
        return 2
    try:
        result = run(cfg)
    except LoadError as exc:
        print(f"fanout load: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if args.json == "-":
        print(text)
    else:
        print(summary(result))
        if args.json:
            with open(args.json, "w") as fh:
                fh.write(text + "\n")
    return 0 if result["ok"] else 3
