"""The cluster's benchmarks (issue 9), each against a baseline in the same run:

* ``cluster-quiet``: quiet rooms (100 rooms x 100 viewers, 5 msg/s each)
  through a cluster (NATS + router + one node) against the single embedded
  node: the p99 the NATS hop and the router add. Goal <= 1 ms.
* ``router-throughput``: publish calls straight to one router for a fixed
  time (bench/scenarios/router_driver.py): stored messages per second per
  router CPU-second (goal >= 20,000), call latency, and the NATS bytes each
  message costs on the router's side.
* ``workers-reference``: the reference room (10,000 viewers, 2,000 msg/s)
  on ``fanout node --workers 2`` (two node processes on one port, joined by
  NATS) against one process: deliveries/s, p99, CPU per process, and NATS
  bytes per delivered message.
* ``reconnect-storm``: 10,000 clients on node A of a two-node cluster; A is
  killed (-9); the time until 99% have resumed on node B. Goal <= 5 s.

Every process runs on this 2-core machine together: the cluster's figures
include the NATS server's and the router's CPU competing with the node's.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.scenarios.harness import API_KEY, BUILD, FANOUT, PY, SECRET, Node, Proc
from bench.scenarios.load import (latency_summary, load_args_quiet, load_args_reference,
                                  run_load, slim)
from bench.scenarios.reference_room import REFERENCE_SETTINGS
from fanout._testbase.process import LISTEN_RE, children, cpu_seconds
from fanout.cluster.natsproc import NatsServer, free_port, free_port_run

TARGETS = {
    "cluster-quiet": "p99 added by the NATS hop and the router <= 1 ms",
    "router-throughput": ">= 20,000 messages/s per router core",
    "workers-reference": "deliveries/s, p99 and CPU per process of --workers 2 vs one process",
    "reconnect-storm": "99% of 10,000 clients resumed <= 5 s after their node is killed",
}

#: Admission caps lifted where every client comes from 127.0.0.1.
OPEN_ADMISSION = dict(max_conns_per_ip=100000, max_unauthenticated=20000,
                      max_unauthenticated_per_ip=20000, conn_rate_per_ip=100000,
                      conn_burst_per_ip=100000, shed_after_refusals=0)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Rig:
    """A NATS server, routers and cluster nodes for one measurement."""

    def __init__(self, *, nodes: int = 1, routers: int = 1, node_settings: dict | None = None,
                 router_flags: list[str] | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="bench-cluster-", dir=str(BUILD))
        self.nats = NatsServer(store_dir=os.path.join(self.dir, "js"),
                               log_file=os.path.join(self.dir, "nats.log"))
        os.makedirs(self.nats.store_dir, exist_ok=True)
        self.nats.start()
        self.routers: list[Proc] = []
        self.nodes: list[Node] = []
        try:
            for i in range(routers):
                r = Proc([FANOUT, "router", "--nats", self.nats.url, "--log-level", "WARNING",
                          "--router-id", f"bench-router-{i}", *(router_flags or [])],
                         f"router {i}")
                r.wait_line("fanout router", 30)
                self.routers.append(r)
            for i in range(nodes):
                self.nodes.append(Node(nats=self.nats.url, node_id=f"bench-node-{i}",
                                       **(node_settings or {})))
        except BaseException:
            self.stop()
            raise

    def varz(self) -> dict:
        return self.nats.monitor("varz")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        for r in self.routers:
            r.stop()
        self.nats.stop()


def _router_flags(settings: dict) -> list[str]:
    flags = []
    for key in ("room_budget", "max_publish_bytes"):
        if key in settings:
            flags += ["--" + key.replace("_", "-"), str(settings[key])]
    return flags


# ---------------------------------------------------------------- cluster-quiet

def cluster_quiet(quick: bool) -> dict:
    rooms, per_room = (10, 20) if quick else (100, 100)
    duration = 5.0 if quick else 20.0
    rounds = 1 if quick else 2
    settings = dict(room_budget=100000, **OPEN_ADMISSION)
    runs: dict[str, list] = {"single": [], "cluster": []}
    def measure(node: Node) -> dict:
        load, cmd, _ = run_load(node.host, node.port, load_args_quiet(rooms, per_room, duration),
                                duration + 200, admin_port=node.admin_port,
                                node_pid=node.proc.pid)
        return {"latency_ms": latency_summary(load), "gaps": load.get("gaps"),
                "load_command": cmd, "node_command": node.command}
    for _ in range(rounds):
        node = Node(**settings)
        try:
            runs["single"].append(measure(node))
        finally:
            node.stop()
        rig = Rig(node_settings=settings, router_flags=_router_flags(settings))
        try:
            runs["cluster"].append(measure(rig.nodes[0]))
        finally:
            rig.stop()

    def med(kind, p):
        values = [r["latency_ms"].get(p) for r in runs[kind] if r["latency_ms"].get(p) is not None]
        return round(float(np.median(values)), 3) if values else None
    single_p99, cluster_p99 = med("single", "p99"), med("cluster", "p99")
    added = round(cluster_p99 - single_p99, 3) if single_p99 is not None and cluster_p99 else None
    gaps = sum((r["gaps"] or 0) for k in runs for r in runs[k])
    hop = hop_latency(60 if quick else 300)
    return {"hop_alone": hop, "rooms": rooms, "viewers_per_room": per_room, "rate_per_room": 5,
            "duration_s": duration, "rounds": rounds, "runs": runs,
            "median_p50_ms": {"single": med("single", "p50"), "cluster": med("cluster", "p50")},
            "median_p99_ms": {"single": single_p99, "cluster": cluster_p99},
            "p99_added_ms": added, "gaps": gaps, "target": TARGETS["cluster-quiet"],
            "verdict": "met" if added is not None and added <= 1.0 and gaps == 0 else "missed",
            "summary": f"cluster-quiet: p99 single {single_p99} ms, cluster {cluster_p99} ms, "
                       f"added {added} ms, gaps {gaps}; the hop alone {hop['latency_ms']}"}


# ---------------------------------------------------------------- router-throughput

def router_throughput(quick: bool) -> dict:
    seconds, warmup = (4.0, 1.0) if quick else (15.0, 3.0)
    rooms, inflight = 100, 512
    rig = Rig(nodes=0, router_flags=["--room-budget", "1000000"])
    try:
        out_file = BUILD / f"router-driver-{os.getpid()}.json"
        router_pid = rig.routers[0].pid
        nats_pid = rig.nats.proc.pid
        driver = Proc([PY, "-m", "bench.scenarios.router_driver", "--nats", rig.nats.url,
                       "--rooms", str(rooms), "--inflight", str(inflight), "--seconds",
                       str(seconds), "--warmup", str(warmup), "--result", str(out_file)],
                      "router driver")
        time.sleep(warmup)
        cpu0, ncpu0, dcpu0, v0 = (cpu_seconds(router_pid), cpu_seconds(nats_pid),
                                  cpu_seconds(driver.pid), rig.varz())
        time.sleep(seconds)
        cpu1, ncpu1, dcpu1, v1 = (cpu_seconds(router_pid), cpu_seconds(nats_pid),
                                  cpu_seconds(driver.pid), rig.varz())
        driver.wait(60)
        result = json.loads(out_file.read_text())
        out_file.unlink()
    finally:
        rig.stop()
    stored = result["measured"]["stored"]
    router_cpu = cpu1 - cpu0
    per_core = stored / router_cpu if router_cpu > 0 else None
    in_bytes = v1["in_bytes"] - v0["in_bytes"]
    out_bytes = v1["out_bytes"] - v0["out_bytes"]
    return {
        "rooms": rooms, "inflight": inflight, "seconds": seconds, "driver": result,
        "stored_per_s": round(stored / seconds),
        "router_cpu_s": round(router_cpu, 2), "nats_server_cpu_s": round(ncpu1 - ncpu0, 2),
        "driver_cpu_s": round(dcpu1 - dcpu0, 2),
        "messages_per_router_core_s": round(per_core) if per_core else None,
        "nats_bytes_per_message": {"in": round(in_bytes / stored, 1) if stored else None,
                                   "out": round(out_bytes / stored, 1) if stored else None},
        "note": "no node subscribed: the republished copy has no interest and is not sent; "
                "per-delivery NATS bytes are in workers-reference",
        "target": TARGETS["router-throughput"],
        "verdict": "met" if per_core and per_core >= 20000 else "missed",
        "summary": f"router-throughput: {round(stored / seconds)} stored/s using "
                   f"{router_cpu / seconds:.2f} router cores -> "
                   f"{round(per_core) if per_core else None} msgs/s per router core; "
                   f"call p99 {result['latency_ms'].get('p99')} ms",
    }


# ---------------------------------------------------------------- workers-reference

def _cpu_of(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def workers_reference(quick: bool) -> dict:
    viewers = 300 if quick else 10000
    duration = 5.0 if quick else 30.0
    settings = dict(REFERENCE_SETTINGS, **OPEN_ADMISSION)
    out: dict = {"viewers": viewers, "duration_s": duration, "rate_in": 2000,
                 "node_settings": settings, "target": TARGETS["workers-reference"]}

    # One process: the embedded default.
    node = Node(**settings)
    try:
        c0 = node.proc.cpu()
        load, cmd, _ = run_load(node.host, node.port, load_args_reference(viewers, duration),
                                duration + 400, admin_port=node.admin_port,
                                node_pid=node.proc.pid)
        c1 = node.proc.cpu()
    finally:
        node.stop()
    out["single"] = {"deliveries_per_s": load.get("deliveries_per_s"), "gaps": load.get("gaps"),
                     "latency_ms": latency_summary(load),
                     "cpu_s": {"node": round(c1 - c0, 2)}, "load": slim(load),
                     "load_command": cmd, "node_command": node.command}

    # Two workers on one port, joined by NATS (a router beside them).
    rig = Rig(nodes=0, router_flags=_router_flags(settings))
    port = free_port()
    admin = free_port_run(2)
    flags = ["--secret", SECRET, "--api-key", API_KEY, "--log-level", "WARNING",
             "--port", str(port), "--ws-port", str(free_port()), "--admin-port", str(admin),
             "--workers", "2",
             "--nats", rig.nats.url]
    for key, value in settings.items():
        flags += ["--" + key.replace("_", "-"), str(value)]
    sup = Proc([FANOUT, "node", *flags], "workers")
    try:
        _wait_lines(sup, LISTEN_RE, 2, 60)
        workers = {f"worker-{i}": pid for i, pid in enumerate(
            p for p in children(sup.pid) if " node " in cmdline(p))}
        pids = {**workers, "router": rig.routers[0].pid, "nats-server": rig.nats.proc.pid}
        v0 = rig.varz()
        cpu0 = _cpu_of(pids)
        t0 = time.monotonic()
        load, cmd, _ = run_load("127.0.0.1", port, load_args_reference(viewers, duration),
                                duration + 400, admin_port=admin)
        # cpu_s and nats_bytes cover this span (connect, warm-up, window,
        # drain), not only the load's measuring window: a CPU share is
        # cpu_s / span_s (scripts/capacity_model.py).
        span = time.monotonic() - t0
        cpu1 = _cpu_of(pids)
        v1 = rig.varz()
    finally:
        sup.stop(signal.SIGTERM, 60)
        rig.stop()
    deliveries = (load.get("deliveries") or
                  (load.get("deliveries_per_s") or 0) * (load.get("window_s") or duration))
    nats_out = v1["out_bytes"] - v0["out_bytes"]
    nats_in = v1["in_bytes"] - v0["in_bytes"]
    out["workers_2"] = {
        "deliveries_per_s": load.get("deliveries_per_s"), "gaps": load.get("gaps"),
        "latency_ms": latency_summary(load),
        "cpu_s": {k: round(cpu1[k] - cpu0[k], 2) for k in pids},
        "span_s": round(span, 2),
        "nats_bytes": {"in": nats_in, "out": nats_out},
        "nats_bytes_per_delivery": round((nats_in + nats_out) / deliveries, 4)
        if deliveries else None,
        "load": slim(load), "load_command": cmd, "node_command": sup.argv and " ".join(sup.argv)}
    single, two = out["single"], out["workers_2"]
    out["ratios"] = {
        "deliveries_workers_to_single": round(two["deliveries_per_s"] / single["deliveries_per_s"], 3)
        if single["deliveries_per_s"] and two["deliveries_per_s"] else None,
        "p99_workers_to_single": round(two["latency_ms"]["p99"] / single["latency_ms"]["p99"], 3)
        if single["latency_ms"].get("p99") and two["latency_ms"].get("p99") else None}
    out["summary"] = (f"workers-reference: single {single['deliveries_per_s']} deliveries/s p99 "
                      f"{single['latency_ms'].get('p99')} ms cpu {single['cpu_s']}; --workers 2 "
                      f"{two['deliveries_per_s']} deliveries/s p99 {two['latency_ms'].get('p99')} "
                      f"ms cpu {two['cpu_s']}; gaps {single['gaps']}/{two['gaps']}")
    return out


def _wait_lines(proc: Proc, pattern: str, count: int, timeout: float) -> None:
    import re
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while sum(1 for line in proc.lines if rx.search(line)) < count:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited: {proc.log()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name}: fewer than {count} lines {pattern!r}")
        time.sleep(0.1)


# ---------------------------------------------------------------- reconnect-storm

def reconnect_storm(quick: bool, **extra) -> dict:
    clients = 500 if quick else 10000
    per_process = clients // 2
    room = "storm"
    settings = dict(max_connections=19000, room_budget=100000, **OPEN_ADMISSION, **extra)
    rig = Rig(nodes=2, node_settings=settings, router_flags=_router_flags(settings))
    a, b = rig.nodes
    results = [BUILD / f"storm-{os.getpid()}-{i}.json" for i in range(2)]
    procs = []
    stop_publishing = threading.Event()
    published = [0]

    def publisher():
        while not stop_publishing.is_set():
            body = json.dumps({"room": room, "kind": "gift", "payload": "storm"}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{b.admin_port}/v1/publish",
                                         data=body, method="POST",
                                         headers={"Authorization": f"Bearer {API_KEY}",
                                                  "Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=5).read()
                published[0] += 1
            except OSError:
                pass
            time.sleep(0.1)
    try:
        for i in range(2):
            procs.append(Proc([PY, "-m", "bench.scenarios.storm_client", "--first", str(a.port),
                               "--then", str(b.port), "--clients", str(per_process),
                               "--room", room, "--secret", SECRET, "--result", str(results[i]),
                               "--tag", str(i), "--wait", "60"], f"storm clients {i}"))
        for proc in procs:
            proc.wait_line("ready", 300)
        thread = threading.Thread(target=publisher, daemon=True)
        thread.start()
        time.sleep(2.0)                        # messages the resumes must carry
        killed_at = time.time()
        a.proc.stop(signal.SIGKILL)
        for proc in procs:
            proc.wait(120)
        stop_publishing.set()
        times = []
        for path in results:
            times += json.loads(path.read_text())["resumed_at"]
            path.unlink()
        b_metrics = b.metrics()
    finally:
        stop_publishing.set()
        for proc in procs:
            proc.stop()
        rig.stop()
    done = np.asarray([t - killed_at for t in times if t is not None])
    resumed = len(done)

    def at(q):
        # The time by which q of ALL clients had resumed (None: never).
        need = int(np.ceil(q * clients))
        return round(float(np.sort(done)[need - 1]), 3) if resumed >= need else None
    p99 = at(0.99)
    return {"clients": clients, "resumed": resumed, "published_during": published[0],
            "time_to_resumed_s": {"50%": at(0.5), "99%": p99, "100%": at(1.0)},
            "client_backoff": "full jitter, uniform(0, 0.2 s x 2^attempt), as the SDK",
            "node_b_connections_at_end": b_metrics.get("fanout_connections"),
            "target": TARGETS["reconnect-storm"],
            "verdict": "met" if p99 is not None and p99 <= 5.0 else "missed",
            "summary": f"reconnect-storm: {resumed}/{clients} resumed; 50% after "
                       f"{at(0.5)} s, 99% after {p99} s, all after {at(1.0)} s"}


def reconnect_storm_channels(quick: bool) -> dict:
    """reconnect-storm with users' channels on (the default) and off, one
    after the other: what the channel costs a cluster's resuming clients."""
    runs = {label: reconnect_storm(quick, user_channels=value)
            for label, value in (("on", 1), ("off", 0))}
    p99 = {label: r["time_to_resumed_s"]["99%"] for label, r in runs.items()}
    return {"runs": runs, "p99_resumed_s": p99,
            "summary": f"99% resumed after {p99['on']} s with channels, {p99['off']} s without",
            "target": TARGETS["reconnect-storm"] + ", channels on",
            "verdict": runs["on"]["verdict"]}


# ---------------------------------------------------------------- the hop alone

def hop_latency(messages: int = 300, rate: float = 50.0) -> dict:
    """The cluster hop with nothing else running: one process publishes
    through a router (RouterLogic -> router -> JetStream -> republish) and
    receives the message on its own bus subscription; the time from the
    publish call to the handler, with one clock. Quiet-room load adds the
    competition for the 2 cores on top of this."""
    import asyncio

    from fanout.bus.nats import NatsBus
    from fanout.logic.remote import RouterLogic
    from fanout.protocol import fanout_pb2 as pb

    rig = Rig(nodes=0)

    async def run() -> list[float]:
        bus = NatsBus(rig.nats.url, node_id="hop-probe")
        await bus.start()
        logic = RouterLogic(bus)
        sent: dict[int, float] = {}
        arrived: dict[int, float] = {}

        def handler(room, epoch, seq, record, sampled):
            # Often before the publish call returns: the republished copy
            # can beat the router's answer.
            arrived[seq] = time.perf_counter()
        await bus.subscribe("hop", handler)
        await logic.join("hop")
        for i in range(messages + 20):
            began = time.perf_counter()
            seq = await logic.publish("hop", pb.GIFT, b"x" * 50, sender="probe")
            if i >= 20:                               # warm-up
                sent[seq] = began
            await asyncio.sleep(1 / rate)
        await asyncio.sleep(0.5)
        await bus.close()
        return [arrived[seq] - began for seq, began in sent.items() if seq in arrived]
    try:
        import uvloop
        uvloop.install()
        got = asyncio.run(run())
    finally:
        rig.stop()
    lat = np.asarray(got) * 1000
    return {"messages": len(got), "rate": rate,
            "latency_ms": {p: round(float(np.percentile(lat, q)), 3)
                           for p, q in (("p50", 50), ("p99", 99), ("max", 100))}}
