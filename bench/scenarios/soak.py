"""soak: one node process for ``--minutes`` (default 30) under churn, then a
drain; does its memory, descriptors and kernel socket memory stay flat?

Load, beside the node:

* viewers (a few hundred, in one process) connect, join one or two rooms,
  read and ping, and leave after a random lifetime; half of them come back
  with a resume point (``Hello.resume`` with the last seq they saw);
* slow readers (one in twenty) join the busy room with a tiny receive buffer
  and stop reading, until the node cuts them;
* a publisher posts chat and gifts through the admin API, steadily;
* every few seconds: the node's RSS, open fds and sockets, its connections,
  and the kernel's TCP memory (/proc/net/sockstat, machine-wide).

At the end the churn stops (kernel memory should return to its baseline),
50 viewers reconnect and the node is drained (POST /v1/drain): how long it
took, its exit status, and how many viewers got ``Kick(SERVER_SHUTDOWN)``.
The verdict fits a line (numpy) to RSS and fds over the last 10 minutes (the
second half of a shorter run) and bounds the drift.
"""

from __future__ import annotations

import errno
import os
import random
import selectors
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from fanout._testbase import NodeProcess
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol.auth import mint

from bench.scenarios.harness import API_KEY, PY, ROOT, SECRET
from bench.scenarios.probes import (HDR, Background, Sampler, admin_publish, fb, frame, fv, hello, ping,
                                    sockstat)

ROOMS = [f"soak:{i}" for i in range(10)]
VIEWERS_PER_ADDRESS = 8        # source addresses 127.0.3.x (viewers), 127.0.4.x (drain watchers)
HOT = "soak:hot"
RSS_DRIFT = 0.05             # fitted RSS change over the window, as a share of its mean
FD_DRIFT = 50                # fitted change of open fds over the window
KERNEL_SLACK_PAGES = 2048    # 8 MiB: /proc/net/sockstat is machine-wide


def viewers(stop, host, port, secret, n, seed, slow_share, stall_s):
    """Keeps ``n`` viewers connected with churn, resumes and slow readers."""
    rnd = random.Random(seed)
    sel = selectors.DefaultSelector()
    stats = {"connects": 0, "resumes": 0, "slow": 0, "kicked": {}, "closed": 0, "bytes": 0,
             "errors": 0}
    cursors: dict[int, dict] = {}         # viewer id -> {room: last seq seen}
    stalled: list[dict] = []              # slow readers not reading now
    tokens = [mint(secret, f"v{i}") for i in range(n)]

    def start(vid: int) -> None:
        slow = rnd.random() < slow_share
        s = socket.socket()
        # A few viewers per client address, as a real audience is spread:
        # the node's per-address caps (16 without a Hello) would refuse one
        # address's 300 viewers, and the soak would measure refusals.
        s.bind((f"127.0.3.{1 + vid // VIEWERS_PER_ADDRESS}", 0))
        if slow:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        if s.connect_ex((host, port)) not in (0, errno.EINPROGRESS):
            stats["errors"] += 1
            s.close()
            return
        rooms = [HOT] if slow else rnd.sample(ROOMS, rnd.choice([1, 2]))
        resume = b""
        old = cursors.get(vid)
        if old and rnd.random() < 0.5:
            resume = b"".join(fb(4, fb(1, r.encode()) + fv(2, seq)) for r, seq in old.items())
            stats["resumes"] += 1
            rooms = [r for r in rooms if r not in old]
        data = hello(tokens[vid], "soak", resume) + b"".join(
            frame(0x02, fv(1, i + 1) + fb(2, r.encode())) for i, r in enumerate(rooms))
        v = {"id": vid, "sock": s, "out": data, "buf": bytearray(), "slow": slow,
             "until": time.monotonic() + rnd.uniform(2, 20), "ping": time.monotonic() + 5,
             "seen": dict(old or {}), "stall_at": time.monotonic() + 1.0}
        stats["connects"] += 1
        stats["slow"] += slow
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, v)

    def end(v: dict, why: str | None) -> None:
        sel.unregister(v["sock"])
        v["sock"].close()
        cursors[v["id"]] = v["seen"]
        if why:
            stats["kicked"][why] = stats["kicked"].get(why, 0) + 1
        else:
            stats["closed"] += 1
        if not stop.is_set():
            start(v["id"])

    def parse(v: dict) -> str | None:
        buf = v["buf"]
        pos = 0
        while len(buf) - pos >= 8:
            _ver, ft, fl, _r, ln = HDR.unpack_from(buf, pos)
            if len(buf) - pos - 8 < ln:
                break
            if ft == 0x44:                                # Kick
                return pb.Reason.Name(pb.Kick.FromString(bytes(buf[pos + 8:pos + 8 + ln])).reason)
            if ft == 0x47:                                # Ack: the join's cursor
                ack = pb.Ack.FromString(bytes(buf[pos + 8:pos + 8 + ln]))
                if ack.room:
                    v["seen"][ack.room] = ack.seq
            elif ft == 0x43 and not fl:                   # Batch: the last seq per room
                for m in pb.Batch.FromString(bytes(buf[pos + 8:pos + 8 + ln])).messages:
                    v["seen"][m.room] = m.seq
            pos += 8 + ln
        del buf[:pos]
        return None

    for vid in range(n):
        start(vid)
    while not stop.is_set():
        now = time.monotonic()
        for key, mask in sel.select(0.1):
            v = key.data
            s = v["sock"]
            try:
                if mask & selectors.EVENT_WRITE and v["out"]:
                    sent = s.send(v["out"])
                    v["out"] = v["out"][sent:]
                    if not v["out"]:
                        sel.modify(s, selectors.EVENT_READ, v)
                if mask & selectors.EVENT_READ:
                    d = s.recv(1 << 18)
                    if not d:
                        end(v, "eof")
                        continue
                    stats["bytes"] += len(d)
                    v["buf"] += d
                    why = parse(v)
                    if why:
                        end(v, why)
                        continue
            except BlockingIOError:
                pass
            except OSError:
                end(v, "reset")
                continue
        for v in [v for v in stalled if now > v["resume_at"]]:
            # Reading again: what is left, then the node's Kick (or a reset).
            stalled.remove(v)
            sel.register(v["sock"], selectors.EVENT_READ, v)
        for key in list(sel.get_map().values()):
            v = key.data
            if v["slow"]:
                if not v["out"] and v["stall_at"] and now > v["stall_at"]:
                    v["stall_at"] = 0.0           # stops reading after its first second
                    v["resume_at"] = now + stall_s
                    sel.unregister(v["sock"])
                    stalled.append(v)
                elif not v["stall_at"] and now > v["resume_at"] + 5:
                    end(v, None)                  # read what was left, and was not cut
                continue
            if now > v["until"]:
                end(v, None)
            elif now > v["ping"]:
                v["ping"] = now + 5
                v["out"] += ping(1)
                sel.modify(v["sock"], selectors.EVENT_READ | selectors.EVENT_WRITE, v)
    for key in list(sel.get_map().values()):
        key.data["sock"].close()
    for v in stalled:
        v["sock"].close()
    return stats


def drain_watchers(host, port, secret, n) -> list:
    """``n`` viewers that read until the node closes; what each got last."""
    socks = []
    for i in range(n):
        s = socket.create_connection((host, port), timeout=5,
                                     source_address=(f"127.0.4.{1 + i // VIEWERS_PER_ADDRESS}", 0))
        s.sendall(hello(mint(secret, f"d{i}"), "drain") + frame(0x02, fv(1, 1) + fb(2, ROOMS[i % 10].encode())))
        socks.append(s)
    return socks


def _last_reason(s: socket.socket, timeout: float) -> str:
    buf = bytearray()
    s.settimeout(timeout)
    try:
        while True:
            d = s.recv(1 << 16)
            if not d:
                break
            buf += d
    except OSError:
        pass
    pos, last = 0, None
    while len(buf) - pos >= 8:
        _v, ft, _f, _r, ln = HDR.unpack_from(buf, pos)
        if len(buf) - pos - 8 < ln:
            break
        if ft == 0x44:
            last = pb.Reason.Name(pb.Kick.FromString(bytes(buf[pos + 8:pos + 8 + ln])).reason)
        pos += 8 + ln
    return last or "no Kick"


def _publisher(admin_port: int, stop: threading.Event, counts: dict) -> None:
    i = 0
    while not stop.is_set():
        msgs = [{"room": ROOMS[k % 10], "kind": "chat" if k % 4 else "gift",
                 "sender": f"s{k}", "payload": f"msg {i}-{k} " + "c" * 80} for k in range(20)]
        # The busy room: ~400 KB/s of payloads that lz4 halves, not erases,
        # so that a reader that stops falls behind by its backlog bound.
        msgs += [{"room": HOT, "kind": "gift", "payload": os.urandom(200).hex()}
                 for k in range(200)]
        try:
            admin_publish(admin_port, API_KEY, msgs)
            counts["published"] = counts.get("published", 0) + len(msgs)
        except OSError:
            counts["errors"] = counts.get("errors", 0) + 1
        i += 1
        stop.wait(0.1)


def _series(samples: list[dict], key: str) -> dict:
    vals = [s[key] for s in samples if s.get(key) is not None]
    if not vals:
        return {}
    return {"first": vals[0], "last": vals[-1], "max": max(vals), "min": min(vals)}


def _drift(samples: list[dict], key: str) -> float | None:
    """Fitted change of ``key`` over the samples' span (least squares)."""
    pts = [(s["t"], s[key]) for s in samples if s.get(key) is not None]
    if len(pts) < 3:
        return None
    t, y = np.asarray(pts, dtype=float).T
    slope = np.polyfit(t - t[0], y, 1)[0]
    return float(slope * (t[-1] - t[0]))


def soak(quick: bool, minutes: float | None = None) -> dict:
    minutes = minutes if minutes is not None else (0.3 if quick else 30.0)
    n_viewers = 60 if quick else 300
    period = 1.0 if quick else 5.0
    log_path = Path(tempfile.mkdtemp(prefix="fanout-soak-")) / "node.log"
    kernel0 = sockstat()
    node = NodeProcess(["--secret", SECRET, "--log-level", "WARNING"], api_key=API_KEY,
                       cwd=ROOT, command=[PY, "-m", "fanout"], log_path=log_path)
    sampler = Sampler(node.admin_port, node.proc.pid, period=period, kernel=True)
    sampler.start()
    stop_pub = threading.Event()
    pub_counts: dict = {}
    pub = threading.Thread(target=_publisher, args=(node.admin_port, stop_pub, pub_counts),
                           daemon=True)
    pub.start()
    t0 = time.time()
    load = Background(viewers, "127.0.0.1", node.port, SECRET, n_viewers, 1, 0.05,
                      5.0 if quick else 60.0)
    time.sleep(minutes * 60)
    t_steady_end = time.time()
    view_stats = load.result(timeout=60)
    stop_pub.set()
    pub.join(15)
    # Churn over: the kernel's socket memory should come back.
    time.sleep(5.0 if quick else 15.0)
    kernel_after = sockstat()
    after_churn = sampler.sample()
    watchers = drain_watchers("127.0.0.1", node.port, SECRET, 50)
    time.sleep(1.0)
    t_drain = time.monotonic()
    req = urllib.request.Request(f"http://127.0.0.1:{node.admin_port}/v1/drain", data=b"",
                                 method="POST", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        drain_status = resp.status
    reasons: dict[str, int] = {}
    results: list[str] = []
    threads = [threading.Thread(target=lambda s=s: results.append(_last_reason(s, 60)))
               for s in watchers]
    for th in threads:
        th.start()
    try:
        exit_status = node.proc.wait(120)
    except Exception:
        exit_status = None
    drain_s = time.monotonic() - t_drain
    for th in threads:
        th.join(5)
    for r in results:
        reasons[r] = reasons.get(r, 0) + 1
    samples = sampler.stop()
    node.stop()
    steady = [s for s in samples if t0 <= s["t"] <= t_steady_end]
    window_s = min(600.0, (t_steady_end - t0) / 2)
    window = [s for s in steady if s["t"] >= t_steady_end - window_s]
    rss_drift = _drift(window, "rss_kib")
    fd_drift = _drift(window, "fds")
    rss_mean = float(np.mean([s["rss_kib"] for s in window if s.get("rss_kib")])) if window else None
    flat = {
        "rss": rss_drift is not None and abs(rss_drift) <= RSS_DRIFT * rss_mean,
        "fds": fd_drift is not None and abs(fd_drift) <= FD_DRIFT,
        "kernel_mem_back": kernel_after.get("tcp_mem_pages", 0)
        <= kernel0.get("tcp_mem_pages", 0) + KERNEL_SLACK_PAGES,
    }
    log = log_path.read_text(errors="replace")
    return {
        "minutes": minutes, "viewers": n_viewers, "sample_period_s": period,
        "node_command": node.command, "node_log": str(log_path),
        "viewers_figures": view_stats, "published": pub_counts,
        "rss_kib": _series(steady, "rss_kib"), "fds": _series(steady, "fds"),
        "node_sockets": _series(steady, "sockets"), "connections": _series(steady, "connections"),
        "kernel_tcp_mem_pages": {**_series(steady, "tcp_mem_pages"),
                                 "before_start": kernel0.get("tcp_mem_pages"),
                                 "after_churn": kernel_after.get("tcp_mem_pages")},
        "after_churn": {k: after_churn.get(k) for k in ("rss_kib", "fds", "sockets", "connections")},
        "window_s": round(window_s, 1),
        "drift_over_window": {"rss_kib": round(rss_drift, 1) if rss_drift is not None else None,
                              "fds": round(fd_drift, 2) if fd_drift is not None else None},
        "bounds": {"rss": f"|fitted change| <= {RSS_DRIFT:.0%} of mean RSS over the window",
                   "fds": f"|fitted change| <= {FD_DRIFT} fds over the window",
                   "kernel_mem_back": f"machine-wide TCP mem after churn <= before + "
                                      f"{KERNEL_SLACK_PAGES} pages"},
        "flat": flat,
        "drain": {"status": drain_status, "seconds_to_exit": round(drain_s, 2),
                  "exit_status": exit_status, "watchers": len(watchers),
                  "watchers_last_kick": reasons},
        "tracebacks_in_log": log.count("Traceback"),
        "samples": [{k: s.get(k) for k in ("t", "rss_kib", "fds", "sockets", "connections",
                                           "tcp_mem_pages", "degradation_level")} for s in samples],
        "verdict": "flat" if all(flat.values()) else "not flat",
        "summary": (f"soak: {minutes} min, RSS {_series(steady, 'rss_kib')}, fds "
                    f"{_series(steady, 'fds')}, drift {rss_drift and round(rss_drift)} KiB / "
                    f"{fd_drift and round(fd_drift, 1)} fds over {window_s:.0f} s, drain "
                    f"{drain_s:.1f} s exit {exit_status}, {'flat' if all(flat.values()) else 'NOT flat'}"),
    }
