"""Fixtures: real node processes on loopback, and a raw-socket test client."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from fanout._testbase import NodeProcess
from fanout.protocol.auth import DEV_SECRET, mint

sys.path.insert(0, str(Path(__file__).parent))

SECRET = "test-secret-for-the-fanout-suite-0123456789"
# The suite plays many users from 127.0.0.1; the admission tests
# (tests/test_adv_slots.py) give their nodes the limits they test.
SUITE_ADMISSION = {"FANOUT_MAX_CONNS_PER_IP": "1000000", "FANOUT_MAX_UNAUTHENTICATED": "1000000",
                   "FANOUT_MAX_UNAUTHENTICATED_PER_IP": "1000000",
                   # The suite connects its many users from 127.0.0.1: never shed it.
                   "FANOUT_SHED_AFTER_REFUSALS": "0"}
API_KEY = "test-api-key-for-the-fanout-suite"


@pytest.fixture(params=["uvloop", "asyncio"], ids=["node-uvloop", "node-asyncio"])
def node_loop(request):
    """The event loop (``--loop``) of the nodes a test starts: every test that
    starts one runs once per loop. A test for one loop only overrides it with
    ``@pytest.mark.parametrize("node_loop", ["uvloop"])``."""
    return request.param


@pytest.fixture
def start_node(tmp_path, request, node_loop):
    """start_node(*flags, env=None, port=0) -> a running NodeProcess on node_loop."""
    nodes: list[NodeProcess] = []

    def start(*args: str, env: dict | None = None, port: int = 0) -> NodeProcess:
        if "--loop" in args:
            raise ValueError("start_node takes the loop from the node_loop fixture; "
                             "parametrize node_loop to pin it")
        node = NodeProcess(["--loop", node_loop, *args], api_key=API_KEY, port=port,
                           env={**os.environ, "FANOUT_SECRET": SECRET, **SUITE_ADMISSION, **(env or {})},
                           log_path=tmp_path / f"node-{time.monotonic_ns()}.log")
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


@pytest.fixture
def node(start_node):
    return start_node("--chat-rate", "100000", "--chat-burst", "100000",
                      "--request-rate", "1e6", "--request-burst", "1e6")


def token(user: str = "alice", rooms="*", ttl: float = 3600, secret: str = SECRET) -> str:
    return mint(secret, user, rooms=rooms, ttl=ttl)


def dev_certs(tmp_path_factory, name: str):
    """A directory with a development CA and a certificate for
    localhost/127.0.0.1/::1, made by `fanout cert`."""
    import subprocess
    d = tmp_path_factory.mktemp(name)
    subprocess.run([sys.executable, "-m", "fanout", "cert", "--dir", str(d)], check=True,
                   capture_output=True, timeout=60)
    return d


__all__ = ["token", "dev_certs", "SECRET", "DEV_SECRET"]



def pytest_asyncio_loop_factories(config, item):
    """In-process async tests run once on uvloop and once on asyncio."""
    import asyncio

    import uvloop

    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
