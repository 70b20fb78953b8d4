"""What the hardening scenarios (``adversarial``, ``soak``) and
bench/fuzz.py measure a node with: a healthy client that pings (its round
trips), a valid client that connects again and again (its time to AuthOk),
the admin probes, and the node's process and kernel figures from /proc.

Clients and attackers run in their own processes (``Background``), so that
what one of them does never delays another's measurement; the observer
(``Sampler``) is a thread of the scenario's process.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing as mp
import math
import os
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from fanout.protocol import fanout_pb2 as pb
from fanout.protocol.wire import encode_varint

HDR = struct.Struct(">BBBBI")
T_AUTH_OK, T_ERROR, T_KICK, T_PONG = 0x41, 0x42, 0x44, 0x45
REQUEST_REASONS = frozenset(range(20, 30))     # Error reasons that leave the connection open
REASONS = {v.number: v.name for v in pb.Reason.DESCRIPTOR.values}


def varint(n: int) -> bytes:
    """``n`` as a varint, wrapped to 64 bits (fuzzing may pass anything)."""
    return encode_varint(n & ((1 << 64) - 1))


def fv(num: int, n: int) -> bytes:
    """A varint field of a protobuf body (omitted when 0, as proto3 does)."""
    return varint(num << 3) + varint(n) if n else b""


def fb(num: int, b: bytes) -> bytes:
    """A length-delimited field of a protobuf body."""
    return varint(num << 3 | 2) + varint(len(b)) + b if b else b""


def frame(ftype: int, body: bytes, *, flags: int = 0, version: int = 1, reserved: int = 0,
          length: int | None = None) -> bytes:
    return HDR.pack(version, ftype, flags, reserved,
                    len(body) if length is None else length) + body


def hello(token: str, device_class: str = "", resume: bytes = b"") -> bytes:
    return frame(0x01, fb(1, token.encode()) + fb(3, device_class.encode()) + resume)


def ping(nonce: int) -> bytes:
    return frame(0x05, fv(1, nonce))


# ------------------------------------------------------------------ background processes

def _run(fn, stop, tx, args) -> None:
    try:
        result = fn(stop, *args)
    except BaseException as exc:          # reported, not raised: the scenario goes on
        result = {"error": repr(exc)}
    tx.send(result)


class Background:
    """``fn(stop_event, *args) -> dict`` in a spawned process; ``result()``
    sets the stop event and returns the dict."""

    def __init__(self, fn, *args) -> None:
        ctx = mp.get_context("spawn")
        self.stop = ctx.Event()
        self._rx, tx = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_run, args=(fn, self.stop, tx, args), daemon=True)
        self.proc.start()

    def result(self, timeout: float = 60.0) -> dict:
        self.stop.set()
        try:
            out = self._rx.recv() if self._rx.poll(timeout) else {"error": "no result in time"}
        except EOFError:
            out = {"error": f"process ended without a result (exit {self.proc.exitcode})"}
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        return out


class FrameReader:
    """Blocking reads of whole frames from a socket, with a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def next(self, deadline: float):
        """(type, flags, body), or a string: "timeout", "eof" or "reset"."""
        while True:
            if len(self.buf) >= 8:
                _v, ft, fl, _r, ln = HDR.unpack_from(self.buf)
                if len(self.buf) >= 8 + ln:
                    body = bytes(self.buf[8:8 + ln])
                    del self.buf[:8 + ln]
                    return ft, fl, body
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                return "timeout"
            except ConnectionResetError:
                return "reset"
            except OSError:
                return "reset"
            if not data:
                return "eof"
            self.buf += data


def closing_reason(ft: int, body: bytes) -> int | None:
    """The reason of a Kick or of a closing Error; None for anything else."""
    if ft == T_KICK:
        return pb.Kick.FromString(body).reason
    if ft == T_ERROR:
        reason = pb.Error.FromString(body).reason
        return None if reason in REQUEST_REASONS else reason
    return None


#: Pings per second one canary connection sends at most: under the node's
#: default per-connection request budget (request_rate 20/s), so measuring
#: never trips it. A faster canary spreads its pings over more connections.
CANARY_RATE_PER_CONN = 15.0


def canary(stop, host: str, port: int, token: str, interval: float, deadline: float,
           room: str = "") -> dict:
    """A healthy client: Hello (and a Join of ``room``), then one Ping every
    ``interval`` s, each waited for up to ``deadline`` s. The pings go round
    robin over as many connections (device classes ``canary0``, ...) as keep
    each within :data:`CANARY_RATE_PER_CONN`. Returns ``samples`` ([wall
    time, round trip ms]), ``unanswered`` and ``closed`` (why the node ended
    one, or None)."""
    samples, unanswered, closed = [], 0, None
    conns: list[tuple[socket.socket, FrameReader]] = []

    def until(rd, pred):
        end = time.monotonic() + deadline
        while True:
            got = rd.next(end)
            if isinstance(got, str):
                return got
            ft, _fl, body = got
            reason = closing_reason(ft, body)
            if reason is not None:
                return "closed " + REASONS.get(reason, str(reason))
            if pred(ft, body):
                return "ok"

    try:
        for i in range(max(1, math.ceil(1 / (interval * CANARY_RATE_PER_CONN)))):
            s = socket.create_connection((host, port), timeout=deadline)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(hello(token, f"canary{i}")
                      + (frame(0x02, fv(1, 1) + fb(2, room.encode())) if room else b""))
            rd = FrameReader(s)
            conns.append((s, rd))
            st = until(rd, lambda ft, b: ft == T_AUTH_OK)
            if st != "ok":
                closed = "hello: " + st
                break
        nonce = 0
        while closed is None and not stop.is_set():
            nonce += 1
            s, rd = conns[nonce % len(conns)]
            want = b"\x08" + varint(nonce)
            t = time.perf_counter()
            s.sendall(ping(nonce))
            st = until(rd, lambda ft, b: ft == T_PONG and b.startswith(want))
            if st == "ok":
                samples.append((time.time(), (time.perf_counter() - t) * 1000))
            elif st == "timeout":
                unanswered += 1
            else:
                closed = st
            time.sleep(interval)
    except OSError as exc:
        closed = f"error {exc}"
    for s, _rd in conns:
        s.close()
    return {"samples": samples, "unanswered": unanswered, "closed": closed}


def connect_probe(stop, host: str, port: int, token: str, n: int, interval: float,
                  timeout: float = 5.0) -> dict:
    """A valid client connecting ``n`` times, ``interval`` s apart: seconds
    from connect() to AuthOk, or why it failed."""
    tries = []
    for i in range(n):                  # all n, even past the stop event
        t = time.perf_counter()
        outcome = None
        try:
            s = socket.create_connection((host, port), timeout=timeout)
            s.sendall(hello(token, f"probe{i % 2}"))
            got = FrameReader(s).next(time.monotonic() + timeout)
            if isinstance(got, str):
                outcome = got
            elif got[0] == T_AUTH_OK:
                outcome = time.perf_counter() - t
            else:
                outcome = REASONS.get(closing_reason(got[0], got[2]), "frame 0x%02x" % got[0])
            s.close()
        except OSError as exc:
            outcome = type(exc).__name__
        tries.append([time.time(), outcome])
        time.sleep(interval)
    return {"tries": tries}


def connect_summary(tries: list, within: float = 1.0) -> dict:
    times = [o for _, o in tries if isinstance(o, float)]
    failures: dict[str, int] = {}
    for _, o in tries:
        if not isinstance(o, float):
            failures[str(o)] = failures.get(str(o), 0) + 1
    return {"tries": len(tries), f"within_{within:g}s": sum(1 for t in times if t <= within),
            **{k + "_s": v for k, v in seconds_summary(times).items()}, "failures": failures}


def seconds_summary(v: list[float]) -> dict:
    if not v:
        return {}
    a = np.asarray(v)
    p50, p99 = np.percentile(a, [50, 99])
    return {"p50": round(float(p50), 4), "p99": round(float(p99), 4), "max": round(float(a.max()), 4)}


def percentiles_ms(v: list[float]) -> dict:
    """Count, p50, p99, p99.9 and max of round trips in ms (numpy)."""
    if not len(v):
        return {"count": 0}
    a = np.asarray(v, dtype=float)
    p50, p99, p999 = np.percentile(a, [50, 99, 99.9])
    return {"count": int(a.size), "p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3),
            "p999_ms": round(float(p999), 3), "max_ms": round(float(a.max()), 3)}


def corrected(rtts: list[float], interval_ms: float) -> list[float]:
    """Round trips corrected for coordinated omission: a pinger that waits
    for each answer sends nothing while the node stalls, so a stall of R ms
    adds the samples its missed pings would have seen (R - interval,
    R - 2 * interval, ...), as HdrHistogram's recordValueWithExpectedInterval."""
    out = list(rtts)
    for r in rtts:
        k = 1
        while r - k * interval_ms > interval_ms:
            out.append(r - k * interval_ms)
            k += 1
    return out


def histogram_ms(v: list[float]) -> dict:
    """Round trips in log-spaced buckets (upper bounds in ms), for the report."""
    edges = [0, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 1e9]
    counts, _ = np.histogram(np.asarray(v, dtype=float), bins=edges)
    return {("le_inf" if e >= 1e9 else f"le_{e:g}"): int(c) for e, c in zip(edges[1:], counts)}


# ------------------------------------------------------------------ the observer

def http_get(port: int, path: str, timeout: float = 2.0, host: str = "127.0.0.1"):
    """(status or an error name, body, seconds) of one GET on a fresh connection."""
    t = time.perf_counter()
    try:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        return resp.status, body, time.perf_counter() - t
    except socket.timeout:
        return "timeout", b"", time.perf_counter() - t
    except OSError as exc:
        return type(exc).__name__, b"", time.perf_counter() - t
    except http.client.HTTPException as exc:
        return type(exc).__name__, b"", time.perf_counter() - t


def admin_publish(port: int, api_key: str, messages: list[dict], timeout: float = 10.0) -> dict:
    """POST /v1/publish with a JSON batch; the decoded reply. Raises OSError
    (urllib's errors are OSErrors) when the node does not take it."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/publish", data=json.dumps({"messages": messages}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def metric_value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            try:
                return float(line.rsplit(" ", 1)[1])
            except ValueError:
                return None
    return None


def proc_figures(pid: int) -> dict:
    """The node's RSS (KiB), open fds and how many of them are sockets."""
    out = {"rss_kib": None, "fds": None, "sockets": None}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_kib"] = int(line.split()[1])
        fds = os.listdir(f"/proc/{pid}/fd")
        out["fds"] = len(fds)
        socks = 0
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    socks += 1
            except OSError:
                pass
        out["sockets"] = socks
    except OSError:
        pass
    return out


def sockstat() -> dict:
    """The machine's TCP sockets and kernel TCP memory (/proc/net/sockstat;
    ``mem`` is in pages)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            f = line.split()[1:]
            d = dict(zip(f[::2], map(int, f[1::2])))
            return {"tcp_inuse": d.get("inuse"), "tcp_orphan": d.get("orphan"),
                    "tcp_tw": d.get("tw"), "tcp_alloc": d.get("alloc"),
                    "tcp_mem_pages": d.get("mem"),
                    "tcp_mem_kib": d.get("mem", 0) * os.sysconf("SC_PAGE_SIZE") // 1024}
    return {}


class Sampler(threading.Thread):
    """Every ``period`` s: /healthz, /readyz, the degradation level and
    connections from /metrics, and the node's /proc figures."""

    def __init__(self, admin_port: int, pid: int, period: float = 0.5, kernel: bool = False):
        super().__init__(daemon=True)
        self.admin_port, self.pid, self.period, self.kernel = admin_port, pid, period, kernel
        self.samples: list[dict] = []
        self._stop_ev = threading.Event()

    def sample(self) -> dict:
        s: dict = {"t": time.time()}
        st, _, sec = http_get(self.admin_port, "/healthz")
        s["healthz"], s["healthz_s"] = st, round(sec, 4)
        st, _, sec = http_get(self.admin_port, "/readyz")
        s["readyz"] = st
        st, body, sec = http_get(self.admin_port, "/metrics", timeout=3.0)
        if st == 200:
            text = body.decode(errors="replace")
            s["degradation_level"] = metric_value(text, "fanout_degradation_level")
            s["connections"] = metric_value(text, "fanout_connections")
            s["lag_s"] = metric_value(text, "fanout_event_loop_lag_last_seconds")
        s.update(proc_figures(self.pid))
        if self.kernel:
            s.update(sockstat())
        return s

    def run(self) -> None:
        while not self._stop_ev.is_set():
            t = time.monotonic()
            self.samples.append(self.sample())
            self._stop_ev.wait(max(0.0, self.period - (time.monotonic() - t)))

    def stop(self) -> list[dict]:
        self._stop_ev.set()
        self.join(10)
        return self.samples

    def between(self, t0: float, t1: float) -> list[dict]:
        return [s for s in self.samples if t0 <= s["t"] <= t1]


def admin_summary(samples: list[dict]) -> dict:
    """What the node's probes and figures did over ``samples``."""
    def count(key):
        out: dict[str, int] = {}
        for s in samples:
            out[str(s.get(key))] = out.get(str(s.get(key)), 0) + 1
        return out

    levels = [s["degradation_level"] for s in samples if s.get("degradation_level") is not None]
    rss = [s["rss_kib"] for s in samples if s.get("rss_kib")]
    fds = [s["fds"] for s in samples if s.get("fds") is not None]
    return {"samples": len(samples), "healthz": count("healthz"),
            "healthz_max_s": max((s["healthz_s"] for s in samples), default=None),
            "readyz": count("readyz"),
            "degradation_level_max": max(levels, default=None),
            "degradation_levels": count("degradation_level"),
            "rss_kib_max": max(rss, default=None), "fds_max": max(fds, default=None),
            "connections_max": max((s.get("connections") or 0 for s in samples), default=None)}
