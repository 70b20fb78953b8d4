"""The load generator (``fanout load``, a process of its own): running it
against a node, its flags for each scenario, and the figures the scenarios
read from its JSON result."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time

from bench.scenarios.harness import API_KEY, BUILD, FANOUT, SECRET, Proc


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
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise RuntimeError(f"fanout load did not finish in {timeout:.0f} s")
    if not out.exists():
        tail = "\n".join(proc.log().splitlines()[-20:] + proc.lines[-10:])
        raise RuntimeError(f"fanout load exited {proc.returncode} without a result:\n{tail}")
    result = json.loads(out.read_text())
    out.unlink()
    result["exit_status"] = proc.returncode
    shown = [a if a != str(out) else "RESULT.json" for a in argv]
    return result, shlex.join(shown), proc


def run_load_on(node, args: list[str], timeout: float, transport: str = "tcp"
                ) -> tuple[dict, str]:
    """Run ``fanout load`` against a running harness ``Node`` (its admin
    API and pid given, so the result has the node's CPU and loop lag), its
    viewers over ``transport`` (``tcp``: the client port; ``ws``: the
    WebSocket port; ``tls``, ``wss``: its TLS ports, the certificate not
    checked); returns (its JSON result, command)."""
    if transport == "tcp":
        port = node.port
    else:
        port = {"ws": node.ws_port, "tls": getattr(node, "tls_port", None),
                "wss": getattr(node, "wss_port", None)}.get(transport, -1)
        if port == -1:
            raise ValueError(f"unknown transport {transport!r}")
        if not port:
            raise RuntimeError(f"the node has no port for {transport} (--{transport}-port?)")
        args = ["--transport", transport, *args]
    load, cmd, _ = run_load(node.host, port, args, timeout,
                            admin_port=node.admin_port, node_pid=node.proc.pid)
    return load, cmd


def latency_summary(load: dict) -> dict:
    """p50, p99 and p999 of a load result's latency (ms)."""
    latency = load.get("latency_ms") or load.get("latency") or {}
    return {k: v for k, v in latency.items() if k in ("p50", "p99", "p999")}


def slim(load: dict) -> dict:
    """A load result without its bulky per-worker list (histogram kept)."""
    return {k: v for k, v in load.items() if k not in ("workers",)}


def load_deliveries(load: dict) -> float | None:
    for key in ("deliveries_per_s", "deliveries_per_second"):
        if load.get(key) is not None:
            return float(load[key])
    return None


# The load generator's flags, in one place (see `fanout load --help`).

REF_PREFIX = "live:ref-"          # the reference room is "live:ref-0"
REF_ROOM = REF_PREFIX + "0"
STORM_WINDOW = 4096               # = the node's listen backlog
# A storm's 4,096 handshakes in flight pass a default node's unauthenticated
# budget (1,024) and per-address handshake cap (16): lift both.
STORM_ADMISSION = dict(max_unauthenticated=20000, max_unauthenticated_per_ip=256)


def load_args_reference(viewers: int, duration: float, rate: float = 2000) -> list[str]:
    return ["--viewers", str(viewers), "--rooms", "1", "--room-prefix", REF_PREFIX,
            "--rate", str(rate), "--gift-share", "0.5", "--payload-bytes", "50",
            "--duration", str(duration), "--warmup", "3"]


def load_args_viewers_only(viewers: int, duration: float) -> list[str]:
    return ["--viewers", str(viewers), "--rooms", "1", "--room-prefix", REF_PREFIX,
            "--rate", "0", "--duration", str(duration), "--warmup", "0"]


# The node in the quiet-rooms runs: no room budget in the way, connection
# limits raised for 10,000 viewers from one host.
QUIET_SETTINGS = dict(room_budget=100000, conn_rate_per_ip=100000, conn_burst_per_ip=100000)


def load_args_quiet(rooms: int, per_room: int, duration: float) -> list[str]:
    # One message per publish request, when it is due, as the naive peer
    # publishes: the default 10 ms of messages per request made each
    # request a burst of 5 rooms' flushes in one loop turn, and a message
    # waited behind the rooms before it in its request (docs/benchmarks.md).
    rate = rooms * 5
    return ["--viewers", str(rooms * per_room), "--rooms", str(rooms),
            "--room-prefix", "quiet-", "--rate", str(rate), "--gift-share", "0.5",
            "--payload-bytes", "50", "--duration", str(duration), "--warmup", "2",
            "--publish-tick-ms", f"{1000 / rate:g}"]


def load_args_idle(n: int, hold: float) -> list[str]:
    return ["--viewers", str(n), "--rooms", "1", "--rate", "0", "--duration", str(hold),
            "--warmup", "0"]


def load_args_storm(n: int) -> list[str]:
    return ["--viewers", str(n), "--rooms", "1", "--rate", "0", "--duration", "1",
            "--warmup", "0", "--connect-window", str(STORM_WINDOW)]
