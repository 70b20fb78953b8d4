"""adversarial: the attacks of issue 8 at full size, each against a fresh
node with default settings, each with a healthy client measured beside it.

* ``replay_hello`` (1a): a room with a full history ring (1,024 messages of
  ~1 KB via POST /v1/publish), then one Hello with 6,000 resume points for
  it (``last_seq=1``), from a client that reads everything;
* ``replay_joins`` (1a): 6,000 Join frames for that room in one write from an
  authenticated connection that never reads;
* ``ping_flood`` (8): one connection writing pings as fast as it can for 6 s
  (and reading the pongs);
* ``connection_flood`` (3): sockets from 50 source addresses (127.0.0.2 ..
  127.0.0.51), opened and held as fast as possible, never authenticated, each
  with a partial Hello, while a valid client connects 100 times;
* ``closing_flood`` (8): peers that send a bad frame and keep writing at full
  speed (reconnecting when cut);
* ``admin_slowloris`` (11): many connections to the admin port sending
  request headers a byte at a time.

Beside each: a healthy client pinging every 10 ms (RTT p50/p99/max, before and
during the attack), a valid client connecting (time to AuthOk), and every
0.5 s /healthz, /readyz, the degradation level, the node's RSS and open fds.
Each attack has pass/fail figures (``thresholds``) from the issue; the
scenario reports them and never fails the process, so that the "before" run
of an unhardened node is recorded like the "after" run.
"""

from __future__ import annotations

import errno
import random
import resource
import selectors
import socket
import tempfile
import threading
import time
from pathlib import Path

from fanout._testbase import NodeProcess
from fanout.protocol.auth import mint

from bench.scenarios.harness import API_KEY, PY, ROOT, SECRET
from bench.scenarios.probes import (REASONS, Background, FrameReader, Sampler, admin_publish,
                                    admin_summary,
                                    canary, closing_reason, connect_probe, connect_summary,
                                    corrected,
                                    fb, frame, fv, hello, histogram_ms, percentiles_ms, ping)

REPLAY_ROOM = "adv"          # short, as the 54 KB Hello of 6,000 points
P99_LIMIT_MS = 50.0
PING_INTERVAL_MS = 10.0
RSS_BOUND_KIB = 256 * 1024   # growth over the node's baseline allowed under an attack


# ------------------------------------------------------------------ the node

class AdvNode(NodeProcess):
    """A node with default settings (what a deployment runs), on free ports."""

    def __init__(self, log_path: Path, **settings) -> None:
        flags = ["--secret", SECRET, "--log-level", "WARNING"]
        for k, v in settings.items():
            flags += ["--" + k.replace("_", "-"), str(v)]
        super().__init__(flags, api_key=API_KEY, cwd=ROOT, command=[PY, "-m", "fanout"],
                         log_path=log_path)

    def publish(self, messages: list[dict]) -> dict:
        return admin_publish(self.admin_port, API_KEY, messages, timeout=30)


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):
        return soft


# ------------------------------------------------------------------ attackers
# Each runs in its own process (probes.Background): fn(stop, ...) -> dict.

def replay_hello(stop, host, port, token, room, points, window):
    """One Hello with ``points`` resume points for ``room``; reads everything."""
    point = fb(1, room.encode()) + fv(2, 1)
    resume = (fb(4, point)) * points
    data = hello(token, "attacker", resume)
    s = socket.create_connection((host, port), timeout=10)
    t0 = time.monotonic()
    s.sendall(data)
    rd = FrameReader(s)
    counts: dict[str, int] = {}
    first = close = None
    nbytes = 0
    last_data = time.monotonic()
    while not stop.is_set() and time.monotonic() - t0 < window:
        got = rd.next(time.monotonic() + 0.5)
        if got == "timeout":
            if nbytes and time.monotonic() - last_data > 3.0:
                break                                    # answered and quiet
            continue
        if isinstance(got, str):
            close = got
            break
        ft, _fl, body = got
        last_data = time.monotonic()
        nbytes += 8 + len(body)
        name = {0x41: "AuthOk", 0x42: "Error", 0x43: "Batch", 0x44: "Kick", 0x46: "Gap",
                0x47: "Ack"}.get(ft, hex(ft))
        counts[name] = counts.get(name, 0) + 1
        reason = closing_reason(ft, body)
        if first is None:
            first = name + (f"({REASONS.get(reason, reason)})" if reason is not None else "")
        if reason is not None:
            close = f"{name}({REASONS.get(reason, reason)})"
    s.close()
    return {"hello_bytes": len(data), "resume_points": points, "first_frame": first,
            "frames": counts, "bytes_received": nbytes, "ended_by": close,
            "seconds_to_last_frame": round(last_data - t0, 3)}


def replay_joins(stop, host, port, token, room, joins):
    """Hello, then ``joins`` Join frames (last_seq=1) in one write; never reads again."""
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(hello(token, "attacker2"))
    got = FrameReader(s).next(time.monotonic() + 10)
    authed = not isinstance(got, str) and got[0] == 0x41
    data = b"".join(frame(0x02, fv(1, i + 1) + fb(2, room.encode()) + fv(3, 1))
                    for i in range(joins))
    s.setblocking(False)
    sent, t0, error = 0, time.monotonic(), None
    while sent < len(data) and not stop.is_set():
        try:
            sent += s.send(memoryview(data)[sent:])
        except BlockingIOError:
            time.sleep(0.005)
        except OSError as exc:
            error = type(exc).__name__
            break
    written_s = time.monotonic() - t0
    stop.wait()
    s.close()
    return {"authenticated": authed, "joins": joins, "bytes": len(data), "bytes_written": sent,
            "seconds_to_write": round(written_s, 3), "write_error": error}


def ping_flood(stop, host, port, token, duration):
    """One connection writing pings as fast as it can, reading the answers."""
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(hello(token, "flood"))
    FrameReader(s).next(time.monotonic() + 10)
    one = ping(7)
    block = one * (65536 // len(one))
    s.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    written = read = 0
    close = None
    t0 = time.monotonic()
    off = 0
    while time.monotonic() - t0 < duration and not stop.is_set() and close is None:
        for _key, mask in sel.select(0.1):
            if mask & selectors.EVENT_WRITE:
                try:
                    n = s.send(memoryview(block)[off:])
                    written += n
                    off = (off + n) % len(block)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    close = type(exc).__name__
            if mask & selectors.EVENT_READ:
                try:
                    d = s.recv(1 << 20)
                    if not d:
                        close = "eof"
                    read += len(d)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    close = type(exc).__name__
    elapsed = time.monotonic() - t0
    s.close()
    pong = 8 + 2 + 7              # Pong{nonce 7, server_time_ms}: about 17 bytes
    return {"seconds": round(elapsed, 2), "pings_written": written // len(one),
            "pings_per_s": round(written / len(one) / elapsed), "bytes_read": read,
            "pongs_approx": read // pong, "ended_by": close}


def conn_flood(stop, host, port, sources, max_socks, partial_body):
    """Opens and holds as many sockets as it can from ``sources``, each with a
    partial Hello (a header declaring 64 KiB and ``partial_body`` bytes of
    it); reopens those the node closes."""
    limit = _raise_nofile()
    max_socks = min(max_socks, limit - 50)
    partial = frame(0x01, b"", length=65536) + b"\x0a" + b"t" * max(0, partial_body - 1)
    sel = selectors.DefaultSelector()
    open_now = peak = opened = 0
    closed: dict[str, int] = {}
    local_errors: dict[str, int] = {}
    socks: dict[int, list] = {}
    i = 0

    def note(d, k):
        d[k] = d.get(k, 0) + 1

    def drop(fd, why):
        nonlocal open_now
        ent = socks.pop(fd)
        try:
            sel.unregister(ent[0])
        except (KeyError, ValueError):
            pass
        ent[0].close()
        open_now -= 1
        note(closed, why)

    t0 = time.monotonic()
    while not stop.is_set():
        # Open until the limit or the first failure of this round.
        burst = 0
        while open_now < max_socks and burst < 500:
            burst += 1
            src = sources[i % len(sources)]
            i += 1
            try:
                s = socket.socket()
                s.setblocking(False)
                s.bind((src, 0))
            except OSError as exc:
                note(local_errors, errno.errorcode.get(exc.errno, str(exc.errno)))
                try:
                    s.close()
                except (OSError, UnboundLocalError):
                    pass
                break
            err = s.connect_ex((host, port))
            if err not in (0, errno.EINPROGRESS):
                note(local_errors, errno.errorcode.get(err, str(err)))
                s.close()
                break
            socks[s.fileno()] = [s, 0]      # [socket, bytes of the partial Hello sent]
            sel.register(s, selectors.EVENT_WRITE | selectors.EVENT_READ)
            open_now += 1
            opened += 1
        peak = max(peak, open_now)
        for key, mask in sel.select(0.05):
            fd = key.fd
            if fd not in socks:
                continue
            s, off = socks[fd]
            if mask & selectors.EVENT_READ:
                try:
                    d = s.recv(4096)
                except OSError as exc:
                    drop(fd, "reset" if exc.errno == errno.ECONNRESET else
                         errno.errorcode.get(exc.errno, "error"))
                    continue
                if not d:
                    drop(fd, "eof")
                    continue
                if len(d) >= 8 and d[1] in (0x42, 0x44):
                    try:
                        reason = closing_reason(d[1], d[8:8 + int.from_bytes(d[4:8], "big")])
                    except Exception:
                        reason = None
                    drop(fd, REASONS.get(reason, "frame"))
                    continue
            if mask & selectors.EVENT_WRITE:
                try:
                    n = s.send(memoryview(partial)[off:])
                except BlockingIOError:
                    continue
                except OSError as exc:
                    drop(fd, "reset" if exc.errno == errno.ECONNRESET else
                         errno.errorcode.get(exc.errno, "error"))
                    continue
                socks[fd][1] = off + n
                if off + n >= len(partial):
                    sel.modify(s, selectors.EVENT_READ)
    for fd in list(socks):
        socks[fd][0].close()
    return {"seconds": round(time.monotonic() - t0, 2), "fd_limit": limit, "max_socks": max_socks,
            "opened": opened, "peak_open": peak, "closed_by_node": closed,
            "local_errors": local_errors}


def closing_flood(stop, host, port, source):
    """Sends a bad frame, then writes junk at full speed; reconnects when cut.
    From its own ``source`` address: the healthy client's address is not
    the attacker's (whose reconnects its per-address rate cap refuses)."""
    junk = b"\x00" * (1 << 18)
    bad = frame(0x05, b"", version=9)
    written = cycles = 0
    close_after: list[float] = []
    while not stop.is_set():
        try:
            s = socket.create_connection((host, port), timeout=5, source_address=(source, 0))
        except OSError:
            time.sleep(0.01)
            continue
        cycles += 1
        t = time.monotonic()
        s.settimeout(1.0)
        try:
            s.sendall(bad)
            while not stop.is_set():
                written += s.send(junk)
        except socket.timeout:
            pass
        except OSError:
            close_after.append(time.monotonic() - t)
        s.close()
    return {"connections": cycles, "bytes_written": written,
            "seconds_until_cut": [round(x, 3) for x in close_after[:20]],
            "cut": len(close_after)}


def slowloris(stop, admin_port, n, byte_interval):
    """``n`` connections to the admin port sending headers a byte at a time."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 100000
    conns, refused = [], 0
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", admin_port), timeout=2)
            s.setblocking(False)
            conns.append([s, 0])
        except OSError:
            refused += 1
    t0 = time.monotonic()
    closed_at: list[float] = []
    while not stop.is_set() and conns:
        for ent in list(conns):
            s, off = ent
            try:
                s.send(head[off:off + 1])
                ent[1] += 1
                if s.recv(1) == b"":
                    raise ConnectionResetError
            except BlockingIOError:
                pass
            except OSError:
                closed_at.append(time.monotonic() - t0)
                conns.remove(ent)
                s.close()
        stop.wait(byte_interval)
    held = len(conns)
    for s, _ in conns:
        s.close()
    return {"connections": n, "refused_at_connect": refused, "closed_by_node": len(closed_at),
            "still_open_at_end": held,
            "first_closed_after_s": round(min(closed_at), 2) if closed_at else None,
            "seconds": round(time.monotonic() - t0, 2)}


# ------------------------------------------------------------------ one attack, measured

def _measured(name: str, out_dir: Path, attack, *, settings: dict | None = None,
              prepare=None, baseline_s: float = 2.0, attack_s: float = 6.0,
              connects: int = 20, connect_interval: float = 0.1, probe_delay: float = 0.0,
              kernel: bool = False) -> dict:
    """Fresh node; healthy pinger and sampler; ``baseline_s`` of quiet, then
    ``attack(node)`` -> [Background] for ``attack_s``, with ``connects``
    valid connects spread over it (from ``probe_delay`` s into the attack,
    all of them before the attackers stop); then everything's figures."""
    log_path = out_dir / f"{name}.node.log"
    node = AdvNode(log_path, **(settings or {}))
    result: dict = {"attack": name, "node_settings": settings or "defaults",
                    "node_command": node.command}
    try:
        prep = prepare(node) if prepare else {}
        if prep:
            result["prepared"] = prep
        sampler = Sampler(node.admin_port, node.proc.pid, kernel=kernel)
        sampler.start()
        healthy = Background(canary, "127.0.0.1", node.port, mint(SECRET, "healthy"),
                             PING_INTERVAL_MS / 1000,
                             30.0, REPLAY_ROOM)
        time.sleep(baseline_s + 1.0)                    # + the pinger's start-up
        rss0 = node.rss_kib()
        cpu0 = node.proc.cpu()
        t_attack = time.time()
        attackers = attack(node)
        time.sleep(probe_delay)
        prober = Background(connect_probe, "127.0.0.1", node.port, mint(SECRET, "prober"),
                            connects, connect_interval)
        time.sleep(max(0.0, attack_s - probe_delay))
        probe = prober.result(timeout=connects * (connect_interval + 5) + 30)
        t_end = time.time()
        attack_results = [a.result(timeout=60) for a in attackers]
        cpu1 = node.proc.cpu()
        time.sleep(1.0)
        ping = healthy.result(timeout=40)
        samples = sampler.stop()
        alive = node.alive()
    finally:
        status = node.stop()
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    rtt = ping.get("samples", [])
    before = [r for t, r in rtt if t < t_attack]
    during = [r for t, r in rtt if t_attack <= t <= t_end + 1.0]
    gaps = [b[0] - a[0] for a, b in zip(rtt, rtt[1:]) if a[0] >= t_attack - 0.02 and b[0] <= t_end + 1.0]
    during_c = corrected(during, PING_INTERVAL_MS)
    adm = admin_summary([s for s in samples if t_attack <= s["t"] <= t_end + 1.0])
    conn = connect_summary(probe.get("tries", []))
    tries = conn["tries"] or 1
    thresholds = {
        "ping_p99_under_50ms": bool(during) and percentiles_ms(during_c)["p99_ms"] < P99_LIMIT_MS
        and ping.get("unanswered", 0) == 0 and ping.get("closed") is None,
        "connects_99_of_100_within_1s": conn.get("within_1s", 0) >= 0.99 * tries,
        "healthz_200": adm["healthz"] == {"200": adm["samples"]} and adm["samples"] > 0,
        "rss_bounded": adm["rss_kib_max"] is not None and adm["rss_kib_max"] - rss0 <= RSS_BOUND_KIB,
        "node_alive": alive,
    }
    result.update({
        "attacker": attack_results[0] if len(attack_results) == 1 else attack_results,
        "attack_seconds": round(t_end - t_attack, 2),
        "healthy_ping_before": percentiles_ms(before),
        "healthy_ping_during": {**percentiles_ms(during),
                                "corrected": percentiles_ms(during_c),
                                "longest_gap_between_pongs_ms":
                                    round(max(gaps) * 1000, 1) if gaps else None,
                                "unanswered": ping.get("unanswered"), "closed": ping.get("closed"),
                                "histogram": histogram_ms(during)},
        "healthy_connect": conn,
        "node": {**adm, "rss_kib_before": rss0,
                 "rss_kib_growth_max": adm["rss_kib_max"] - rss0 if adm["rss_kib_max"] else None,
                 "cpu_seconds_during": round(cpu1 - cpu0, 2), "alive_after": alive,
                 "exit_status": status, "tracebacks_in_log": log.count("Traceback"),
                 "log": str(log_path)},
        "thresholds": thresholds,
        "passed": all(thresholds.values()),
    })
    return result


# ------------------------------------------------------------------ the attacks

def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(1 << 20):
            pass
    except OSError:
        pass


def _fill_ring(node: AdvNode, messages: int, size: int) -> dict:
    """A member in the replay room (a node keeps history only for rooms it
    holds), then ``messages`` gifts of ``size`` bytes through the admin API."""
    holder = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    holder.sendall(hello(mint(SECRET, "holder"), "holder")
                   + frame(0x02, fv(1, 1) + fb(2, REPLAY_ROOM.encode())))
    rd = FrameReader(holder)
    joined = False
    while not joined:
        got = rd.next(time.monotonic() + 10)
        if isinstance(got, str):
            raise RuntimeError(f"replay room holder: {got}")
        joined = got[0] == 0x47
    holder.settimeout(None)
    threading.Thread(target=_drain, args=(holder,), daemon=True).start()
    # Text as a chat or gift payload is: it compresses, but not to nothing.
    rnd = random.Random(1)
    words = ["gift", "rose", "rocket", "lion", "heart", "wow", "gg", "x2", "combo", "from"]
    payload = " ".join(rnd.choice(words) + str(rnd.randrange(1000)) for _ in range(size // 6))
    payload = payload[:size]
    seqs = []
    for start in range(0, messages, 500):
        batch = [{"room": REPLAY_ROOM, "kind": "gift", "payload": f"{i:06d}{payload}"}
                 for i in range(start, min(messages, start + 500))]
        seqs += [r.get("seq") for r in node.publish(batch)["results"]]
    return {"published": sum(1 for s in seqs if s), "payload_bytes": size + 6,
            "last_seq": max((s for s in seqs if s), default=0)}


def adversarial(quick: bool) -> dict:
    out_dir = Path(tempfile.mkdtemp(prefix="fanout-adversarial-"))    # the nodes' logs
    q = quick
    host = "127.0.0.1"
    ring = (64, 1000) if q else (1024, 1000)
    points = 200 if q else 6000
    attack_s = 1.5 if q else 6.0
    base_s = 0.5 if q else 2.0
    attacks: dict[str, dict] = {}

    attacks["replay_hello"] = _measured(
        "replay_hello", out_dir,
        lambda n: [Background(replay_hello, host, n.port, mint(SECRET, "attacker"), REPLAY_ROOM,
                              points, 60.0 if not q else 5.0)],
        prepare=lambda n: _fill_ring(n, *ring), baseline_s=base_s,
        attack_s=attack_s if q else 12.0)
    attacks["replay_joins"] = _measured(
        "replay_joins", out_dir,
        lambda n: [Background(replay_joins, host, n.port, mint(SECRET, "attacker"), REPLAY_ROOM,
                              points)],
        prepare=lambda n: _fill_ring(n, *ring), baseline_s=base_s,
        attack_s=attack_s if q else 12.0)
    attacks["ping_flood"] = _measured(
        "ping_flood", out_dir,
        lambda n: [Background(ping_flood, host, n.port, mint(SECRET, "attacker"), attack_s)],
        baseline_s=base_s, attack_s=attack_s)
    n_src, per_proc = (2, 300) if q else (50, 10500)
    sources = [f"127.0.0.{i}" for i in range(2, 2 + n_src)]
    half = len(sources) // 2
    attacks["connection_flood"] = _measured(
        "connection_flood", out_dir,
        lambda n: [Background(conn_flood, host, n.port, sources[:half], per_proc, 60000),
                   Background(conn_flood, host, n.port, sources[half:], per_proc, 60000)],
        baseline_s=base_s, attack_s=2.5 if q else 15.0, connects=10 if q else 100,
        connect_interval=0.05, probe_delay=0.5 if q else 3.0)
    attacks["closing_flood"] = _measured(
        "closing_flood", out_dir,
        lambda n: [Background(closing_flood, host, n.port, f"127.0.0.{200 + i}")
                   for i in range(2 if q else 3)],
        baseline_s=base_s, attack_s=attack_s if q else 12.0)
    attacks["admin_slowloris"] = _measured(
        "admin_slowloris", out_dir,
        lambda n: [Background(slowloris, n.admin_port, 20 if q else 1000, 0.2)],
        baseline_s=base_s, attack_s=2.0 if q else 15.0)

    figures = {name: {
        "ping_p50_ms": a["healthy_ping_during"].get("p50_ms"),
        "ping_p99_ms": a["healthy_ping_during"].get("p99_ms"),
        "ping_p99_ms_corrected": a["healthy_ping_during"]["corrected"].get("p99_ms"),
        "ping_max_ms": a["healthy_ping_during"].get("max_ms"),
        "ping_before_p50_ms": a["healthy_ping_before"].get("p50_ms"),
        "connects_within_1s": f"{a['healthy_connect'].get('within_1s', 0)}/{a['healthy_connect']['tries']}",
        "healthz": a["node"]["healthz"], "degradation_level_max": a["node"]["degradation_level_max"],
        "rss_kib_growth_max": a["node"]["rss_kib_growth_max"], "fds_max": a["node"]["fds_max"],
        "passed": a["passed"]} for name, a in attacks.items()}
    return {
        "thresholds": {"ping_p99_under_50ms": "healthy client's ping p99 < 50 ms during the attack "
                       "(corrected for coordinated omission), none unanswered", "connects_99_of_100_within_1s":
                       ">= 99% of valid connects reach AuthOk within 1 s",
                       "healthz_200": "every /healthz sample during the attack answered 200",
                       "rss_bounded": f"node RSS grows <= {RSS_BOUND_KIB // 1024} MiB over its "
                       "pre-attack level", "node_alive": "the node process is alive after"},
        "figures": figures,
        "attacks": attacks,
        "passed": all(a["passed"] for a in attacks.values()),
        "summary": "adversarial: " + "; ".join(
            f"{n} p99 {f['ping_p99_ms_corrected']} ms, connects {f['connects_within_1s']}, "
            f"{'pass' if f['passed'] else 'FAIL'}" for n, f in figures.items()),
    }
