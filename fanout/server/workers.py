"""``fanout node --workers N``: N node processes on one host sharing the
client port (SO_REUSEPORT: the kernel spreads new connections over them),
joined over the cluster bus, so one host uses all its cores.

Each worker is a full node: worker ``i`` has node id ``<node_id>-w<i>`` and
its admin API (``/metrics``, ``/readyz``, ``/v1/...``) on ``admin_port + i``.
Without ``--nats`` the supervisor starts what the workers need on this host:
a nats-server with JetStream (its data in a temp dir) and one router.
SIGTERM or SIGINT drains every worker; the supervisor exits with the worst
worker status.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from .config import NodeConfig


def admin_port(config: NodeConfig, index: int) -> int:
    """Worker ``index``'s admin port (the documented scheme)."""
    if config.admin_port <= 0:
        return config.admin_port
    return config.admin_port + index


def _wait_ready(router: subprocess.Popen, timeout: float = 30.0) -> None:
    """Until the router serves (its first line), so that the workers' first
    joins find it; then its output is passed on."""
    deadline = time.monotonic() + timeout
    for line in router.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if line.startswith("fanout router"):
            break
        if time.monotonic() > deadline:
            break
    threading.Thread(target=_forward, args=(router.stdout,), daemon=True).start()


def _forward(stream) -> None:
    for line in stream:
        sys.stdout.write(line)
    sys.stdout.flush()


def run(config: NodeConfig, argv: list[str]) -> int:
    if config.port == 0:
        print("fanout node: --workers needs a fixed --port (the workers share it)",
              file=sys.stderr)
        return 2
    procs: list[subprocess.Popen] = []
    nats = None
    base_id = config.node_id or socket.gethostname()
    url = config.nats
    workdir = tempfile.mkdtemp(prefix="fanout-workers-")
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        if not url:
            from ..cluster.natsproc import NatsServer
            nats = NatsServer(store_dir=os.path.join(workdir, "jetstream"),
                              log_file=os.path.join(workdir, "nats.log"))
            os.makedirs(nats.store_dir, exist_ok=True)
            nats.start()
            url = nats.url
            router = subprocess.Popen([sys.executable, "-m", "fanout", "router", "--nats", url,
                                       "--loop", config.loop, "--log-level", config.log_level],
                                      stdout=subprocess.PIPE, text=True, start_new_session=True)
            procs.append(router)
            _wait_ready(router)
            print(f"fanout workers: started nats-server {url} and a router "
                  f"(data in {workdir})", flush=True)
        for i in range(config.workers):
            args = [sys.executable, "-m", "fanout", "node", *argv,
                    "--workers", "1", "--reuse-port", "1", "--nats", url,
                    "--node-id", f"{base_id}-w{i}", "--admin-port", str(admin_port(config, i))]
            procs.append(subprocess.Popen(args, start_new_session=True))
        workers = procs[-config.workers:]
        while not stopping and all(p.poll() is None for p in workers):
            time.sleep(0.2)
        stop()
        status = 0
        for proc in workers:
            try:
                status = max(status, proc.wait(60) or 0)
            except subprocess.TimeoutExpired:
                proc.kill()
                status = max(status, 1)
        for proc in procs:
            if proc.poll() is None:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        return status
    finally:
        stop()
        if nats is not None:
            nats.stop()
