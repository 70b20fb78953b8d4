"""Fixtures: real node processes on loopback, and a raw-socket test client."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fanout.protocol.auth import DEV_SECRET, mint

sys.path.insert(0, str(Path(__file__).parent))

LISTEN_RE = re.compile(r"fanout node listening on (\S+):(\d+)")
ADMIN_RE = re.compile(r"fanout admin API listening on (\S+):(\d+)")
SECRET = "test-secret-for-the-fanout-suite-0123456789"
API_KEY = "test-api-key-for-the-fanout-suite"


class NodeProcess:
    """A `fanout node` subprocess; logs go to a file kept for failed tests."""

    def __init__(self, tmp_path: Path, args: list[str], env: dict | None = None):
        self.log_path = tmp_path / f"node-{time.monotonic_ns()}.log"
        self.args = args
        self.env = {**os.environ, "FANOUT_SECRET": SECRET, **(env or {})}
        self.proc = None
        self.host = self.port = None
        self.admin_port = None
        self.api_key = API_KEY

    def start(self, port: int = 0) -> "NodeProcess":
        cmd = [sys.executable, "-m", "fanout", "node", "--port", str(port),
               "--admin-port", "0", "--api-key", API_KEY, *self.args]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, env=self.env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                break
            admin = ADMIN_RE.search(line)
            if admin:
                self.admin_port = int(admin.group(2))
            m = LISTEN_RE.search(line)
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
                return self
        raise RuntimeError(f"node did not start: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def start_node(tmp_path, request):
    """start_node(*flags, env=None, port=0) -> a running NodeProcess."""
    nodes: list[NodeProcess] = []

    def start(*args: str, env: dict | None = None, port: int = 0) -> NodeProcess:
        node = NodeProcess(tmp_path, list(args), env).start(port)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for node in nodes:
            sys.stderr.write(f"--- node log {node.log_path} ---\n{node.log()[-4000:]}\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request):
    """Runs a test against a node on each event loop."""
    return request.param


@pytest.fixture
def node(start_node):
    return start_node("--chat-rate", "100000", "--chat-burst", "100000")


def token(user: str = "alice", rooms="*", ttl: float = 3600, secret: str = SECRET) -> str:
    return mint(secret, user, rooms=rooms, ttl=ttl)


__all__ = ["token", "SECRET", "DEV_SECRET"]



def pytest_asyncio_loop_factories(config, item):
    """In-process async tests run once on uvloop and once on asyncio."""
    import asyncio

    import uvloop

    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
