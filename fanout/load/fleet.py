"""The viewer worker processes: each holds one :class:`fanout._loadgen.Viewers`
(at most :data:`~fanout.load.config.MAX_PER_PROCESS` viewers) built from its
spec by :func:`build_viewers`, runs its loop and sends snapshots of its
counters to the driver, whose handle on them is :class:`Fleet`.

Driver -> worker commands (over a pipe): ``start``, ``snap`` (a tagged
snapshot), ``reset_latency``, ``final`` (stop recording; stats, verification,
latency buckets, how viewers ended, room members) and ``quit``. Workers send
``ready``, ``stats`` every :data:`_REPORT_EVERY` seconds once started, the
replies, or ``error`` with a traceback.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import resource
import time
import traceback

from ..protocol import fanout_pb2 as pb
from .config import LoadError

__all__ = ["Fleet", "build_viewers"]

_REPORT_EVERY = 0.25        # seconds between a worker's progress reports
_SLICE = 0.02               # seconds a worker runs its loop between pipe checks


def build_viewers(spec: dict):
    """The :class:`fanout._loadgen.Viewers` of one worker spec from
    :func:`~fanout.load.config.plan`: a minted token and Hello frame per
    viewer (user ``load-<proc>-<i>``, device class ``mobile``) and a Join
    frame per room.
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
        read_interval=spec.get("read_interval", 0.0),
        transport=spec.get("transport", "tcp"), ws_path=spec.get("ws_path", "/ws"),
        tls_ca=spec.get("tls_ca", ""), tls_server_name=spec.get("tls_server_name", ""))


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
    """Entry point of a viewer worker process: builds its viewers, then runs
    their loop and answers the driver's commands until ``quit``."""
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


class Fleet:
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
