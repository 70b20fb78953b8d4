"""Runs of the peers the engine is measured against (bench/peers/): the C
reference server (its frame stream encoded by the engine's core, its viewers
``fanout load``), the naive and websockets servers and the Node peers
(uWebSockets.js pub/sub, ws broadcast) read by c_reader."""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path

from bench.peers import stream
from bench.scenarios.harness import BUILD, PY, ROOT, Proc, build_c
from bench.scenarios.load import run_load

NODE_PEERS_DIR = ROOT / "bench" / "peers" / "node"
# Result key -> the Node peer's script (bench/peers/node/) and its flags.
# "uws" and "node_ws" give the loop back after each message to a large room,
# as ws_server.py does; "uws_batched" publishes up to 200 due messages per
# loop turn, which uWS writes to each subscriber with one send (its own
# batching; 200 is the engine's batch at the reference load). ws has no such
# batching: each send() is a write of its own.
NODE_PEERS = {"uws": ("uws_server.js", []),
              "uws_batched": ("uws_server.js", ["--burst", 200]),
              "node_ws": ("ws_server.js", [])}
# What the Node peers' stream file holds at most; longer runs read it in a loop.
NODE_STREAM_MAX = 40000


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
    return _run_peer(kind, argv, mode, pattern, viewers, rate, duration, rooms, room)


def node_peers_ready() -> str | None:
    """Why the Node peers cannot run here, or None when they can."""
    if shutil.which("node") is None:
        return "no `node` on PATH (Debian: apt-get install nodejs npm)"
    for pkg in ("uwebsockets", "ws"):
        if not (NODE_PEERS_DIR / "node_modules" / pkg / "package.json").exists():
            return (f"{NODE_PEERS_DIR / 'node_modules' / pkg} is missing: run `make node-peers` "
                    f"(npm ci in bench/peers/node)")
    return None


def run_node_peer(kind: str, viewers: int, rate: float, duration: float, rooms: int,
                  room: str = "room", seed: int = 1) -> dict:
    """A Node WebSocket peer (a key of :data:`NODE_PEERS`) +
    c_reader; the same figures as :func:`run_py_peer`. ``rate`` 0 is flat
    out: each message as soon as the server's loop gets to it."""
    why = node_peers_ready()
    if why:
        raise RuntimeError(f"Node peer {kind}: {why}")
    BUILD.mkdir(exist_ok=True)
    n = min(NODE_STREAM_MAX, int(rate * duration) + 1) if rate > 0 else NODE_STREAM_MAX
    stream_file = BUILD / f"node-stream-{seed}-{n}.jsonl"
    stream.write_node_stream(stream_file, n, seed)
    script, flags = NODE_PEERS[kind]
    argv = [shutil.which("node"), str(NODE_PEERS_DIR / script), "--stream", stream_file, *flags]
    label = "uws" if script.startswith("uws") else "ws"
    return _run_peer(kind, argv, "ws", label + r" listening on \S+:(\d+)", viewers, rate,
                     duration, rooms, room)


def _run_peer(kind: str, argv: list, mode: str, pattern: str, viewers: int, rate: float,
              duration: float, rooms: int, room: str) -> dict:
    argv = argv + ["--viewers", viewers, "--rate", rate, "--duration", duration, "--linger", 60]
    server = Proc(argv, kind)
    try:
        port = int(server.wait_line(pattern, 30).group(1))
        reader = run_c_reader(port, viewers, mode, duration, rooms=rooms, room=room)
        reader.wait_line(r"^ready", 180)
        cpu0, rcpu0, t0 = server.cpu(), reader.cpu(), time.monotonic()
        sres = server.json_line(duration + 120)
        cpu1, t1 = server.cpu(), time.monotonic()
        rres = reader.json_line(60)
        # What the server still wrote from its buffers after the stream
        # (until the reader went idle) is part of the cost of its deliveries.
        cpu_end = server.cpu()
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
        # Deliveries per second of one core of the server: what it would
        # deliver with a core to itself.
        "deliveries_per_core_s": round(rres["messages"] / (cpu_end - cpu0))
        if cpu_end > cpu0 else None,
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
