"""End-to-end scenarios of the "Measurement" issue, one command each.

    .venv/bin/python -m bench.scenarios SCENARIO [--quick] [--out DIR]

SCENARIO is one of reference-room, quiet-rooms, idle-connections,
connect-storm, wire-bytes, sweep (deliveries/s against viewers, for the
plot), profile (py-spy of the node at the reference load), or all. Each starts its own node process
(``fanout node --port 0 --admin-port 0 ...`` with the settings it needs), its
load generator (``fanout load``, a separate process: the open-file limit is
20,000 per process) and, where the issue asks for them, its peers in the same
run on the same message stream:

* ``c-reference``: bench/peers/c_tcp_reference.c, the physical limit: the
  same Batch frames (same corpus, same messages per frame as the engine's
  run) written with writev to the same number of sockets, flat out;
* ``naive``: bench/peers/naive_server.py, V1 style, one transport.write(json)
  per message per viewer, read by bench/peers/c_reader.c;
* ``websockets``: bench/peers/ws_server.py, websockets.broadcast() of the same
  JSON lines, read by c_reader in WebSocket mode.

Results go to bench/results/SCENARIO.json (``--quick``: SCENARIO.quick.json)
with the machine and the exact command, and a summary is printed. Every
comparison is a ratio of figures measured in that one run.

Measure under the machine-wide lock, one scenario at a time::

    flock /tmp/fanout-bench.lock .venv/bin/python -m bench.scenarios reference-room

``--quick`` runs scaled-down variants (each well under 20 s) for smoke tests;
their figures are not results.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import selectors
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.peers import stream  # noqa: E402

BIN = ROOT / ".venv" / "bin"
PY = str(BIN / "python") if (BIN / "python").exists() else sys.executable
FANOUT = str(BIN / "fanout")
BUILD = ROOT / "build"
RESULTS = ROOT / "bench" / "results"
SECRET = "bench-secret-not-for-production-use-0123"
API_KEY = "bench-api-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

TARGETS = {
    "reference-room": "≥ 20M deliveries/s, 0 gaps, p99 ≤ 150 ms, ≥ 0.8 × C reference frames/s",
    "quiet-rooms": "p99 ≤ 2 ms",
    "idle-connections": "≤ 2 KiB user-space memory per connection",
    "connect-storm": "≥ 10,000 authenticated connects/s",
    "wire-bytes": "≤ 20% of V1 JSON bytes per delivered message",
}


# ---------------------------------------------------------------- processes

def build_c(name: str) -> Path:
    """Compile bench/peers/NAME.c into build/NAME when the source is newer."""
    src = ROOT / "bench" / "peers" / f"{name}.c"
    out = BUILD / name
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        BUILD.mkdir(exist_ok=True)
        subprocess.run(["cc", "-O2", "-Wall", "-o", str(out), str(src)], check=True)
    return out


class Proc:
    """A child process whose stdout lines are collected by a thread."""

    def __init__(self, argv: list[str], name: str, env: dict | None = None) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self.p = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=ROOT, env=env)
        threading.Thread(target=self._pump, args=(self.p.stdout, True), daemon=True).start()
        self.err: list[str] = []
        threading.Thread(target=self._pump, args=(self.p.stderr, False), daemon=True).start()

    def _pump(self, fh, is_out: bool) -> None:
        for line in fh:
            with self._cv:
                (self.lines if is_out else self.err).append(line.rstrip("\n"))
                self._cv.notify_all()

    def wait_line(self, pattern: str, timeout: float) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cv:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.p.poll() is not None and seen == len(self.lines):
                    tail = "\n".join(self.err[-20:])
                    raise RuntimeError(f"{self.name}: no line matching {pattern!r} "
                                       f"(exit {self.p.poll()}); stderr:\n{tail}")
                self._cv.wait(min(left, 0.2))

    def json_line(self, timeout: float) -> dict:
        return json.loads(self.wait_line(r"^\{.*\}$", timeout).group(0))

    @property
    def pid(self) -> int:
        return self.p.pid

    def cpu(self) -> float:
        """User + system CPU seconds so far (from /proc)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError):
            return float("nan")

    def rss_kib(self) -> int:
        """Resident set (VmRSS), KiB: the process's user-space memory."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self, timeout: float = 10.0) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class Node:
    """A ``fanout node`` process on free ports."""

    def __init__(self, **settings) -> None:
        argv = [FANOUT, "node", "--port", "0", "--admin-port", "0", "--api-key", API_KEY,
                "--secret", SECRET, "--log-level", "WARNING"]
        for key, value in settings.items():
            argv += ["--" + key.replace("_", "-"), str(value)]
        self.settings = settings
        self.proc = Proc(argv, "node")
        m = self.proc.wait_line(r"admin API listening on (\S+):(\d+)", 30)
        self.admin_port = int(m.group(2))
        m = self.proc.wait_line(r"fanout node listening on (\S+):(\d+)", 30)
        self.host, self.port = m.group(1), int(m.group(2))
        self.command = shlex.join(argv)

    def metrics(self) -> dict[str, float]:
        """The node's Prometheus counters, summed over labels."""
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            label = name_labels[len(name):]
            if name == "fanout_batch_bytes_total":
                name += ":" + ("raw" if 'stage="raw"' in label else "compressed")
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                pass
        return out

    def stop(self) -> None:
        self.proc.stop()


def delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


# ---------------------------------------------------------------- load generator

def run_load(node_host: str, node_port: int, args: list[str], timeout: float,
             admin_port: int | None = None, node_pid: int | None = None
             ) -> tuple[dict, str, Proc]:
    """Run ``fanout load`` against a node; returns (its JSON result, command, proc).

    Exit status 3 (a check failed) still gives a result: the scenario
    records it; only a run that produced no result is an error."""
    out = BUILD / f"load-{os.getpid()}-{time.monotonic_ns()}.json"
    BUILD.mkdir(exist_ok=True)
    argv = [FANOUT, "load", "--host", node_host, "--port", str(node_port),
            "--secret", SECRET, "--no-progress", "--json", str(out)]
    if admin_port is not None:
        argv += ["--admin-port", str(admin_port), "--api-key", API_KEY]
    if node_pid is not None:
        argv += ["--node-pid", str(node_pid)]
    argv += args
    proc = Proc(argv, "fanout load")
    try:
        proc.p.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise RuntimeError(f"fanout load did not finish in {timeout:.0f} s")
    if not out.exists():
        tail = "\n".join(proc.err[-20:] + proc.lines[-10:])
        raise RuntimeError(f"fanout load exited {proc.p.returncode} without a result:\n{tail}")
    result = json.loads(out.read_text())
    out.unlink()
    result["exit_status"] = proc.p.returncode
    shown = [a if a != str(out) else "RESULT.json" for a in argv]
    return result, shlex.join(shown), proc


# ---------------------------------------------------------------- machine

def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop
        uv = uvloop.__version__
    except ImportError:
        uv = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=ROOT).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, cwd=ROOT).stdout.strip())
    except OSError:
        commit, dirty = None, None
    import resource
    return {
        "cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
        "uvloop": uv, "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg()[0],
        "open_file_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "commit": commit, "uncommitted_changes": dirty,
    }


# ---------------------------------------------------------------- peers

def run_c_reader(port: int, conns: int, mode: str, duration: float, rooms: int = 1,
                 room: str = "room", idle: float = 2.0) -> Proc:
    reader = build_c("c_reader")
    # The reader runs past the server's stream and stops once nothing came
    # for --idle s, so what was still queued when the stream ended counts.
    return Proc([reader, "--port", port, "--conns", conns, "--mode", mode, "--room", room,
                 "--rooms", rooms, "--duration", duration + 30, "--idle", idle], "c_reader")


def run_py_peer(kind: str, viewers: int, rate: float, duration: float, rooms: int,
                fmt: str = "json", room: str = "room") -> dict:
    """naive or websockets server + c_reader; returns both sides' figures."""
    if kind == "naive":
        argv = [PY, "-m", "bench.peers.naive_server", "--format", fmt]
        mode = "lines"
        pattern = r"naive listening on \S+:(\d+)"
    else:
        argv = [PY, "-m", "bench.peers.ws_server"]
        mode = "ws"
        pattern = r"ws listening on \S+:(\d+)"
    argv += ["--viewers", viewers, "--rate", rate, "--duration", duration, "--linger", 60]
    server = Proc(argv, kind)
    try:
        port = int(server.wait_line(pattern, 30).group(1))
        reader = run_c_reader(port, viewers, mode, duration, rooms=rooms, room=room)
        reader.wait_line(r"^ready", 180)
        cpu0, rcpu0, t0 = server.cpu(), reader.cpu(), time.monotonic()
        sres = server.json_line(duration + 120)
        cpu1, t1 = server.cpu(), time.monotonic()
        rres = reader.json_line(60)
        rcpu = reader.cpu() - rcpu0
        reader.stop()
    finally:
        server.stop()
    secs = t1 - t0
    return {
        "peer": kind, "server": sres, "reader": rres,
        "deliveries_per_s": rres["messages_per_s"],
        "server_cpu_seconds": round(cpu1 - cpu0, 3),
        "server_cpu_share": round((cpu1 - cpu0) / secs, 3) if secs else None,
        "reader_cpu_seconds": round(rcpu, 3),
        "latency_ms": rres["latency_ms"], "gaps": rres["gaps"],
        "wire_bytes_per_message": rres["wire_bytes_per_message"],
        "messages_due": int(rate * duration), "messages_published": sres["messages_published"],
        "server_command": shlex.join(str(a) for a in argv),
        "reader_command": shlex.join(reader.argv),
    }


def write_frames_file(path: Path, n_frames: int, per_frame: int, room: str,
                      compress_min: int = 256, seed: int = 1) -> dict:
    """The C reference's frame stream: the corpus as Batch frames of
    ``per_frame`` messages each, seqs from 1, encoded by the engine's core."""
    from fanout import _core
    src = stream.messages(seed)
    ts = stream.now_ms()
    seq = 0
    total = 0
    with open(path, "wb") as fh:
        for _ in range(n_frames):
            records = []
            for _ in range(per_frame):
                seq += 1
                m = next(src)
                records.append(_core.encode_room_message(room, seq, m.kind, m.priority,
                                                         m.sender, m.payload, ts))
            frame = _core.pack_frame(0x43, b"".join(records), compress_min)
            fh.write(frame)
            total += len(frame)
    return {"frames": n_frames, "messages_per_frame": per_frame,
            "mean_frame_bytes": round(total / n_frames, 1)}


def run_c_reference(frames_file: Path, viewers: int, duration: float,
                    load_args: list[str], rate: float = 0.0) -> dict:
    """C reference server + `fanout load` viewers (no publishing)."""
    ref = build_c("c_tcp_reference")
    server = Proc([ref, "--frames", frames_file, "--viewers", viewers, "--rate", rate,
                   "--duration", duration, "--start-timeout", 120], "c_reference")
    try:
        port = int(server.wait_line(r"listening on \S+:(\d+)", 10).group(1))
        load, cmd, _ = run_load("127.0.0.1", port, load_args, duration + 240)
        sres = server.json_line(60)
    finally:
        server.stop()
    return {"server": sres, "load": load, "load_command": cmd,
            "server_command": shlex.join(server.argv)}


# ---------------------------------------------------------------- raw viewers and publisher

class RawViewers:
    """A few protocol viewers in one thread that count wire bytes and messages.

    Used by wire-bytes (no load generator needed): every byte a viewer
    receives after its join Ack counts, Batch frames, Presence and Pongs
    alike, so bytes per delivered message is the true downstream cost.
    """

    def __init__(self, host: str, port: int, room: str, n: int) -> None:
        from fanout.protocol import wire
        from fanout.protocol.auth import mint
        from fanout.protocol import fanout_pb2 as pb
        self.wire, self.pb = wire, pb
        self.sel = selectors.DefaultSelector()
        self.viewers = []
        for i in range(n):
            s = socket.create_connection((host, port))
            s.sendall(wire.encode_frame(wire.FrameType.HELLO, pb.Hello(
                token=mint(SECRET, f"viewer-{i}"), device_id=f"d{i}")))
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


# ---------------------------------------------------------------- scenarios

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

    # End to end through a real node: viewers count every byte they receive.
    duration = 3.0 if quick else 20.0
    rate = 2000.0
    settings = dict(max_delay_ms=100, room_budget=100000)
    node = Node(**settings)
    try:
        viewers = RawViewers(node.host, node.port, room, 5 if quick else 20)
        pub = publish_stream(node.admin_port, room, rate, duration)
        time.sleep(1.0)
        counts = viewers.close()
    finally:
        node.stop()
    tot_bytes = sum(c["bytes"] for c in counts)
    tot_msgs = sum(c["messages"] for c in counts)
    e2e = {"viewers": len(counts), "published": pub["published"], "refused": pub["refused"],
           "messages_delivered": tot_msgs,
           "expected_deliveries": pub["published"] * len(counts),
           "gaps": sum(c["gaps"] for c in counts),
           "frames": sum(c["frames"] for c in counts),
           "bytes_per_message": round(tot_bytes / tot_msgs, 2) if tot_msgs else None,
           "node_command": node.command}

    # V1 end to end: the naive server's JSON lines through a socket, same corpus.
    naive = run_py_peer("naive", 5 if quick else 20, rate, duration, rooms=1, room=room)
    v1_e2e = naive["wire_bytes_per_message"]
    ratio = e2e["bytes_per_message"] / v1_e2e if e2e["bytes_per_message"] else None
    return {
        "corpus": stream.SOURCE, "messages": n,
        "mean_payload_bytes": round(payload_per, 2),
        "v1_json_bytes_per_message": round(v1_per, 2),
        "protobuf_record_bytes_per_message": round(sum(map(len, records)) / n, 2),
        "static_by_batch_size": static,
        "breakdown_200_per_frame": breakdown,
        "engine_end_to_end": e2e,
        "v1_end_to_end": {"bytes_per_message": v1_e2e, "gaps": naive["gaps"],
                          "messages": naive["reader"]["messages"],
                          "server_command": naive["server_command"],
                          "reader_command": naive["reader_command"]},
        "ratio_engine_to_v1": round(ratio, 4) if ratio else None,
        "target": TARGETS["wire-bytes"],
        "verdict": "met" if ratio is not None and ratio <= 0.20 else "missed",
    }


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


def _load_latency(load: dict) -> dict:
    return load.get("latency_ms") or load.get("latency") or {}


def _lat(load: dict) -> dict:
    return {k: v for k, v in _load_latency(load).items() if k in ("p50", "p99", "p999")}


def reference_room(quick: bool) -> dict:
    viewers = 300 if quick else 10000
    duration = 5.0 if quick else 60.0
    peer_duration = 4.0 if quick else 20.0
    room = REF_ROOM
    settings = dict(max_delay_ms=100, room_budget=100000, max_connections=19000,
                    conn_rate_per_ip=100000, conn_burst_per_ip=100000)
    out: dict = {"viewers": viewers, "duration_s": duration, "rate_in": 2000,
                 "peer_duration_s": peer_duration,
                 "target": TARGETS["reference-room"], "node_settings": settings}
    node = Node(**settings)
    try:
        load, cmd, _ = run_load(node.host, node.port, load_args_reference(viewers, duration),
                                duration + 400, admin_port=node.admin_port,
                                node_pid=node.proc.pid)
        m1 = node.metrics()
    finally:
        node.stop()
    out["engine"] = {"load": slim(load), "node_counters_end": {
        k: v for k, v in m1.items() if k in (
            "fanout_deliveries_total", "fanout_frames_written_total",
            "fanout_slow_consumers_total", "fanout_degraded_messages_total",
            "fanout_batch_bytes_total:raw", "fanout_batch_bytes_total:compressed",
            "fanout_degradation_level")},
        "load_command": cmd, "node_command": node.command}
    per_frame = max(1, round(load.get("messages_per_batch") or 200))

    # The engine flat out: it flushes whenever its loop is free (max_delay_ms
    # 0) and is fed faster than it can flush (4,000 msg/s), so its frames/s is
    # its capacity, not what 2,000 msg/s asks of it.
    node = Node(**dict(settings, max_delay_ms=0))
    try:
        flat, flat_cmd, _ = run_load(node.host, node.port,
                                     load_args_reference(viewers, peer_duration, rate=4000),
                                     peer_duration + 400, admin_port=node.admin_port,
                                     node_pid=node.proc.pid)
    finally:
        node.stop()
    out["engine_flat_out"] = {"load": slim(flat), "load_command": flat_cmd,
                              "node_command": node.command}

    # C reference: the same frames (corpus, messages per frame), the same
    # number of sockets and the same viewers (fanout load), flat out.
    frames_file = BUILD / "reference_frames.bin"
    BUILD.mkdir(exist_ok=True)
    # Enough frames for flat out (seqs must not repeat): about 700k writes/s
    # at most on this machine, spread over the viewers.
    per_viewer_max = min(3000.0, 700000.0 / viewers)
    info = write_frames_file(frames_file, int(peer_duration * per_viewer_max) + 100,
                             per_frame, room)
    cref = run_c_reference(frames_file, viewers, peer_duration,
                           load_args_viewers_only(viewers, peer_duration))
    cref["load"] = slim(cref["load"])
    cref["frames"] = info
    out["c_reference"] = cref
    # The same C server paced at the engine's frame rate per viewer: what the
    # same work costs in CPU without the engine.
    paced_rate = (load.get("batch_frames_per_s") or 0.0) / viewers
    if paced_rate > 0:
        paced = run_c_reference(frames_file, viewers, peer_duration,
                                load_args_viewers_only(viewers, peer_duration),
                                rate=round(paced_rate, 3))
        paced["load"] = slim(paced["load"])
        out["c_reference_paced"] = paced
    out["naive"] = run_py_peer("naive", viewers, 2000, peer_duration, rooms=1, room=room)
    out["websockets"] = run_py_peer("websockets", viewers, 2000, peer_duration, rooms=1,
                                    room=room)

    eng_fps = load.get("batch_frames_per_s") or 0.0
    c_fps = cref["server"]["frames_per_s"]
    c_fps_viewers = cref["load"].get("batch_frames_per_s") or 0.0
    d = load.get("deliveries_per_s") or 0.0
    lat = load.get("latency_ms", {})
    paced = out.get("c_reference_paced", {}).get("server", {})
    node_cores = (load.get("cpu") or {}).get("node_window_cores")
    out["ratios"] = {
        "engine_frames_per_s_to_c_reference": round(eng_fps / c_fps, 3) if c_fps else None,
        "engine_node_cores_to_c_paced_cores": round(
            node_cores / (paced["cpu_seconds"] / paced["seconds"]), 2)
        if node_cores and paced.get("cpu_seconds") else None,
        "engine_frames_per_s_to_c_reference_as_read": round(eng_fps / c_fps_viewers, 3)
        if c_fps_viewers else None,
        "engine_flat_out_frames_per_s_to_c_reference": round(
            (flat.get("batch_frames_per_s") or 0.0) / c_fps, 3) if c_fps else None,
        "engine_deliveries_to_naive": round(d / out["naive"]["deliveries_per_s"], 1)
        if out["naive"]["deliveries_per_s"] else None,
        "engine_deliveries_to_websockets": round(d / out["websockets"]["deliveries_per_s"], 1)
        if out["websockets"]["deliveries_per_s"] else None,
    }
    checks = {
        "deliveries_per_s >= 20M": d >= 20e6,
        "gaps == 0": load.get("gaps") == 0 and load.get("divergences") == 0,
        "p99 <= 150 ms": (lat.get("p99") or 1e9) <= 150,
        "frames/s >= 0.8 x C": max(out["ratios"]["engine_frames_per_s_to_c_reference"] or 0,
                                   out["ratios"]["engine_flat_out_frames_per_s_to_c_reference"]
                                   or 0) >= 0.8,
    }
    out["checks"] = checks
    out["verdict"] = "met" if all(checks.values()) else "missed"
    return out


def slim(load: dict) -> dict:
    """A load result without its bulky per-worker list (histogram kept)."""
    return {k: v for k, v in load.items() if k not in ("workers",)}


def quiet_rooms(quick: bool) -> dict:
    rooms, per_room = (10, 20) if quick else (100, 100)
    duration = 5.0 if quick else 30.0
    peer_duration = 4.0 if quick else 15.0
    settings = dict(room_budget=100000, conn_rate_per_ip=100000, conn_burst_per_ip=100000)
    node = Node(**settings)
    try:
        load, cmd, _ = run_load(node.host, node.port, load_args_quiet(rooms, per_room, duration),
                                duration + 200, admin_port=node.admin_port,
                                node_pid=node.proc.pid)
    finally:
        node.stop()
    naive = run_py_peer("naive", rooms * per_room, rooms * 5, peer_duration, rooms=rooms,
                        room="quiet")
    p99 = (load.get("latency_ms") or {}).get("p99")
    return {
        "rooms": rooms, "viewers_per_room": per_room, "rate_per_room": 5,
        "duration_s": duration, "peer_duration_s": peer_duration, "node_settings": settings,
        "engine": {"load": slim(load), "load_command": cmd, "node_command": node.command},
        "naive": naive,
        "ratios": {"engine_p99_to_naive_p99": round(p99 / naive["latency_ms"]["p99"], 3)
                   if p99 and naive["latency_ms"]["p99"] else None},
        "target": TARGETS["quiet-rooms"],
        "verdict": "met" if p99 is not None and p99 <= 2.0 and load.get("gaps") == 0
        else "missed",
    }


def idle_connections(quick: bool) -> dict:
    n = 500 if quick else 19000
    hold = 5.0 if quick else 30.0
    settings = dict(max_connections=19500, conn_rate_per_ip=100000, conn_burst_per_ip=100000,
                    ping_interval_ms=5000, idle_timeout_ms=15000)
    node = Node(**settings)
    box: dict = {}
    try:
        time.sleep(1.0)
        node.metrics()        # the scrape path's own memory belongs in the baseline
        time.sleep(0.5)
        rss0 = node.proc.rss_kib()
        worker = threading.Thread(target=lambda: box.update(zip(
            ("load", "cmd", "proc"), run_load(node.host, node.port, load_args_idle(n, hold),
                                              hold + 300, node_pid=node.proc.pid))))
        worker.start()
        samples = []          # (connections, node RSS KiB), while the load runs
        while worker.is_alive():
            worker.join(1.0)
            try:
                conns = node.metrics().get("fanout_connections", 0)
            except OSError:
                continue
            samples.append((int(conns), node.proc.rss_kib()))
        if "load" not in box:
            raise RuntimeError("fanout load failed; see above")
    finally:
        node.stop()
    full = sorted(rss for conns, rss in samples if conns >= n)
    # The median of the samples taken while all n were connected (the RSS is
    # steady then; min and max are recorded too).
    rss1 = full[len(full) // 2] if full else max(r for _, r in samples)
    per_conn = (rss1 - rss0) * 1024 / n
    load = box["load"]
    return {
        "connections": n, "hold_s": hold, "node_settings": settings,
        "node_rss_kib_before": rss0, "node_rss_kib_with_connections": rss1,
        "samples_at_full": len(full),
        "rss_kib_at_full_min_max": [full[0], full[-1]] if full else None,
        "bytes_per_connection": round(per_conn, 1),
        "kernel_note": "RSS is the node's user-space memory; socket buffers are kernel memory",
        "load": slim(load), "load_command": box["cmd"],
        "node_command": node.command, "target": TARGETS["idle-connections"],
        "verdict": "met" if per_conn <= 2048 and full else "missed",
    }


def connect_storm(quick: bool) -> dict:
    n = 500 if quick else 19000
    settings = dict(max_connections=19500, conn_rate_per_ip=1000000,
                    conn_burst_per_ip=1000000)
    node = Node(**settings)
    try:
        m0 = node.metrics()
        load, cmd, _ = run_load(node.host, node.port, load_args_storm(n), 400,
                                node_pid=node.proc.pid)
        m1 = node.metrics()
    finally:
        node.stop()
    c = load.get("connect", {})
    rate = c.get("connects_per_s")
    return {
        "connections": n, "connect_window": STORM_WINDOW, "node_settings": settings,
        "load": slim(load), "load_command": cmd, "node_command": node.command,
        "connects_per_s": rate, "time_to_all_joined_s": c.get("time_to_all_joined_s"),
        "refused": int(delta(m1, m0, "fanout_connections_refused_total")),
        "target": TARGETS["connect-storm"],
        "verdict": "met" if rate is not None and rate >= 10000
        and c.get("joined") == n else "missed",
    }


def sweep(quick: bool) -> dict:
    """Deliveries/s against viewers at the reference load, engine and peers
    (for bench/plots.py)."""
    counts = [50, 150] if quick else [1000, 3000, 10000]
    duration = 4.0 if quick else 15.0
    peer_duration = 3.0 if quick else 10.0
    room = REF_ROOM
    settings = dict(max_delay_ms=100, room_budget=100000, max_connections=19000,
                    conn_rate_per_ip=100000, conn_burst_per_ip=100000)
    series: dict[str, list] = {"engine": [], "naive": [], "websockets": []}
    for viewers in counts:
        node = Node(**settings)
        try:
            load, cmd, _ = run_load(node.host, node.port,
                                    load_args_reference(viewers, duration, room),
                                    duration + 240, admin_port=node.admin_port,
                                    node_pid=node.proc.pid)
        finally:
            node.stop()
        lat = dict(load.get("latency_ms") or {})
        lat.pop("histogram", None)
        series["engine"].append({"viewers": viewers, "deliveries_per_s": load_deliveries(load),
                                 "frames_per_s": load.get("frames_per_s"),
                                 "gaps": load.get("gaps"), "cpu": load.get("cpu"),
                                 "latency_ms": lat, "load_command": cmd})
        for peer in ("naive", "websockets"):
            r = run_py_peer(peer, viewers, 2000, peer_duration, rooms=1, room=room)
            series[peer].append({"viewers": viewers, "deliveries_per_s": r["deliveries_per_s"],
                                 "server_cpu_share": r["server_cpu_share"],
                                 "latency_ms": r["latency_ms"], "gaps": r["gaps"]})
    return {"viewers": counts, "rate_in": 2000, "duration_s": duration,
            "peer_duration_s": peer_duration, "node_settings": settings, "series": series}


def profile(quick: bool) -> dict:
    """py-spy (native frames on; it pauses the node for each sample, so the
    run's own figures are perturbed) of the node at the reference load: where
    its CPU goes. Writes the collapsed stacks to build/ and a chart of the top
    frames to docs/img/reference_room_profile.png."""
    viewers = 300 if quick else 10000
    duration = 5.0 if quick else 25.0
    settings = dict(max_delay_ms=100, room_budget=100000, max_connections=19000,
                    conn_rate_per_ip=100000, conn_burst_per_ip=100000)
    return _profile("reference_room", settings, load_args_reference(viewers, duration),
                    publish=True, start_after=3.0 if quick else 8.0,
                    seconds=2 if quick else int(duration - 6), timeout=duration + 300,
                    title="fanout node at the reference load (10k viewers, 2,000 msg/s)")


def profile_storm(quick: bool) -> dict:
    """py-spy of the node during connect-storm: what one connect costs."""
    n = 500 if quick else 19000
    settings = dict(max_connections=19500, conn_rate_per_ip=1000000, conn_burst_per_ip=1000000)
    return _profile("connect_storm", settings, load_args_storm(n), publish=False,
                    start_after=0.0, seconds=2 if quick else 6, timeout=300,
                    title="fanout node during connect-storm (19,000 connects)")


def profile_quiet(quick: bool) -> dict:
    """py-spy of the node during quiet-rooms: where a quiet room's latency goes."""
    rooms, per_room = (10, 20) if quick else (100, 100)
    duration = 5.0 if quick else 20.0
    settings = dict(room_budget=100000, conn_rate_per_ip=100000, conn_burst_per_ip=100000)
    return _profile("quiet_rooms", settings, load_args_quiet(rooms, per_room, duration),
                    publish=True, start_after=3.0 if quick else 8.0,
                    seconds=2 if quick else int(duration - 6), timeout=duration + 300,
                    title="fanout node in quiet-rooms (100 rooms x 100 viewers, 5 msg/s each)")


def _profile(name: str, settings: dict, load_args: list[str], *, publish: bool,
             start_after: float, seconds: int, timeout: float, title: str) -> dict:
    raw = BUILD / f"{name}_profile.txt"
    BUILD.mkdir(exist_ok=True)
    node = Node(**settings)
    box: dict = {}
    try:
        worker = threading.Thread(target=lambda: box.update(zip(
            ("load", "cmd", "proc"), run_load(node.host, node.port, load_args, timeout,
                                              admin_port=node.admin_port if publish else None,
                                              node_pid=node.proc.pid))))
        worker.start()
        time.sleep(start_after)
        spy_argv = [str(BIN / "py-spy"), "record", "--pid", str(node.proc.pid), "--native",
                    "--rate", "200", "--duration", str(seconds), "--format", "raw",
                    "--output", str(raw)]
        spy = subprocess.run(spy_argv, capture_output=True, text=True)
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed ({spy.returncode}): {spy.stderr[-2000:]}")
        worker.join()
    finally:
        node.stop()
    stacks = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        stacks.append((stack.split(";"), int(count)))
    total = sum(c for _, c in stacks) or 1
    self_time: dict[str, int] = {}
    incl: dict[str, int] = {}
    for frames, count in stacks:
        names = [_frame_name(f) for f in frames]
        self_time[names[-1]] = self_time.get(names[-1], 0) + count
        for fname in set(names):
            incl[fname] = incl.get(fname, 0) + count
    top_self = sorted(self_time.items(), key=lambda kv: -kv[1])[:15]
    top_incl = sorted(incl.items(), key=lambda kv: -kv[1])[:25]
    load = box.get("load", {})
    chart = _profile_chart(name, top_self, total, title)
    return {"samples": total, "py_spy_command": shlex.join(spy_argv),
            "collapsed_stacks": str(raw.relative_to(ROOT)),
            "top_self": [[n, round(c / total, 4)] for n, c in top_self],
            "top_inclusive": [[n, round(c / total, 4)] for n, c in top_incl],
            "chart": chart,
            "load": {k: load.get(k) for k in ("deliveries_per_s", "batch_frames_per_s",
                                              "messages_per_batch", "gaps", "connect")},
            "load_latency_ms": _lat(load) if load else None,
            "load_cpu": load.get("cpu"), "load_command": box.get("cmd"),
            "node_command": node.command}


def _frame_name(frame: str) -> str:
    # "function (file:line)" -> "function (file)"; native frames have no file.
    name = re.sub(r":\d+\)$", ")", frame.strip())
    return re.sub(r"\(/[^)]*/(site-packages|lib/python3\.\d+|main)/", "(", name)


def _profile_chart(name: str, top: list, total: int, title: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    out = ROOT / "docs" / "img" / f"{name}_profile.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    names = [n[:70] for n, _ in top][::-1]
    shares = [c / total * 100 for _, c in top][::-1]
    fig, ax = plt.subplots(figsize=(10, 6), dpi=100)
    ax.barh(names, shares, color="#1f77b4")
    for i, v in enumerate(shares):
        ax.text(v + 0.3, i, f"{v:.1f}%", va="center", fontsize=8)
    ax.set_xlabel("share of the node's samples where this frame is on top (self time), %")
    ax.set_title(f"{title}: py-spy --native, self time", fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return str(out.relative_to(ROOT))


def load_deliveries(load: dict) -> float | None:
    for key in ("deliveries_per_s", "deliveries_per_second"):
        if load.get(key) is not None:
            return float(load[key])
    return None


# The load generator's flags, in one place (see `fanout load --help`).

REF_PREFIX = "live:ref-"          # the reference room is "live:ref-0"
REF_ROOM = REF_PREFIX + "0"


def load_args_reference(viewers: int, duration: float, room: str = REF_ROOM,
                        rate: float = 2000) -> list[str]:
    return ["--viewers", str(viewers), "--rooms", "1", "--room-prefix", REF_PREFIX,
            "--rate", str(rate), "--gift-share", "0.5", "--payload-bytes", "50",
            "--duration", str(duration), "--warmup", "3"]


def load_args_viewers_only(viewers: int, duration: float, room: str = REF_ROOM) -> list[str]:
    return ["--viewers", str(viewers), "--rooms", "1", "--room-prefix", REF_PREFIX,
            "--rate", "0", "--duration", str(duration), "--warmup", "0"]


def load_args_quiet(rooms: int, per_room: int, duration: float) -> list[str]:
    return ["--viewers", str(rooms * per_room), "--rooms", str(rooms),
            "--room-prefix", "quiet-", "--rate", str(rooms * 5), "--gift-share", "0.5",
            "--payload-bytes", "50", "--duration", str(duration), "--warmup", "2"]


def load_args_idle(n: int, hold: float) -> list[str]:
    return ["--viewers", str(n), "--rooms", "1", "--rate", "0", "--duration", str(hold),
            "--warmup", "0"]


def load_args_storm(n: int) -> list[str]:
    return ["--viewers", str(n), "--rooms", "1", "--rate", "0", "--duration", "1",
            "--warmup", "0", "--connect-window", str(STORM_WINDOW)]


STORM_WINDOW = 4096               # = the node's listen backlog


SCENARIOS = {
    "reference-room": reference_room,
    "quiet-rooms": quiet_rooms,
    "idle-connections": idle_connections,
    "connect-storm": connect_storm,
    "wire-bytes": wire_bytes,
    "sweep": sweep,
    "profile": profile,
    "profile-storm": profile_storm,
    "profile-quiet": profile_quiet,
}


def summarize(name: str, r: dict) -> str:
    if name == "wire-bytes":
        e = r["engine_end_to_end"]
        return (f"wire-bytes: engine {e['bytes_per_message']} B/msg end to end vs V1 JSON "
                f"{r['v1_end_to_end']['bytes_per_message']} B/msg -> ratio "
                f"{r['ratio_engine_to_v1']} ({r['verdict']}; target ≤ 0.20); gaps {e['gaps']}")
    if name == "reference-room":
        e = r["engine"]["load"]
        return (f"reference-room: {e['deliveries_per_s'] / 1e6:.2f}M deliveries/s, "
                f"gaps {e['gaps']}, latency {_lat(e)}, checks {r['checks']}, "
                f"ratios {r['ratios']} ({r['verdict']})")
    if name == "quiet-rooms":
        return (f"quiet-rooms: latency {_lat(r['engine']['load'])} gaps "
                f"{r['engine']['load']['gaps']} ({r['verdict']}); naive {r['naive']['latency_ms']}")
    if name.startswith("profile"):
        return "profile: top self " + ", ".join(f"{n} {v:.1%}" for n, v in r["top_self"][:6])
    if name == "sweep":
        return "sweep: " + ", ".join(f"{peer} " + " ".join(
            f"{row['viewers']}:{(row['deliveries_per_s'] or 0) / 1e6:.2f}M" for row in rows)
            for peer, rows in r["series"].items())
    if name == "idle-connections":
        return (f"idle-connections: {r['bytes_per_connection']} B/connection over "
                f"{r['connections']} ({r['verdict']})")
    if name == "connect-storm":
        return (f"connect-storm: {r['connects_per_s']} connects/s, all joined "
                f"after {r['time_to_all_joined_s']} s ({r['verdict']})")
    return name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scenarios",
                                description=__doc__.split("\n")[0])
    p.add_argument("scenario", choices=[*SCENARIOS, "all"])
    p.add_argument("--quick", action="store_true", help="scaled-down smoke variant")
    p.add_argument("--out", default=str(RESULTS), help="directory for SCENARIO.json")
    args = p.parse_args(argv)
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rc = 0
    for name in names:
        started = time.time()
        info = machine()
        result = SCENARIOS[name](args.quick)
        result = {"scenario": name, "quick": args.quick, "machine": info,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                  "wall_seconds": round(time.time() - started, 1),
                  "command": "python -m bench.scenarios " + name + (" --quick" if args.quick else ""),
                  **result}
        path = out_dir / (name + (".quick" if args.quick else "") + ".json")
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(summarize(name, result))
        print(f"  -> {path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
