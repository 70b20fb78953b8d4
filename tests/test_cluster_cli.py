"""The cluster's commands, as a user runs them: ``fanout cluster`` starts a
NATS server, a router and nodes and stops them all on Ctrl-C;
``fanout node --workers 2`` runs two node processes on one client port,
each with its own admin API, joined over the bus; ``fanout router`` refuses
to start without a bus."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from fanout._testbase.process import Proc, children
from fanout.client import Client
from fanout.cluster.natsproc import free_port, free_port_run
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol.auth import mint

from conftest import API_KEY, SECRET, SUITE_ADMISSION


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _one_message(port_a: int, port_b: int) -> pb.RoomMessage:
    """A message published through a client on one port reaches a client
    on the other."""
    listener = Client("127.0.0.1", port_a, mint(SECRET, "cli-listener", rooms="*"))
    speaker = Client("127.0.0.1", port_b, mint(SECRET, "cli-speaker", rooms="*"))
    await listener.connect()
    await speaker.connect()
    try:
        await listener.join("cli-room")
        await speaker.join("cli-room")
        await speaker.say("cli-room", "across")
        while True:
            event = await listener.next_event(timeout=10)
            if isinstance(event, pb.RoomMessage):
                return event
    finally:
        await listener.close()
        await speaker.close()


@pytest.mark.parametrize("node_loop", ["uvloop"])
async def test_fanout_cluster_starts_prints_and_stops_everything(tmp_path, node_loop):
    base = free_port_run(6)
    proc = Proc([sys.executable, "-m", "fanout", "cluster", "--nodes", "2", "--nats-port", "0",
                 "--base-port", str(base), "--loop", node_loop], "cluster",
                env={**os.environ, "FANOUT_SECRET": SECRET, **SUITE_ADMISSION},
                log_path=tmp_path / "cluster.log")
    try:
        proc.wait_line(r"Ctrl-C stops everything", 60)
        text = "\n".join(proc.lines)
        assert re.search(r"nats\s+nats://127\.0\.0\.1:\d+", text)
        assert "router    router-0" in text
        ports = [int(p) for p in re.findall(r"clients 127\.0\.0\.1:(\d+)", text)]
        assert ports == [base, base + 3]
        assert re.findall(r"ws://127\.0\.0\.1:(\d+)/ws", text) == [str(base + 2), str(base + 5)]
        got = await _one_message(ports[0], ports[1])
        assert got.payload == b"across" and got.seq == 1
        family = children(proc.pid)
        assert len(family) == 4                   # nats-server, router, two nodes
    finally:
        proc.send_signal(signal.SIGINT)           # Ctrl-C
        assert proc.wait(30) == 0
    assert not [pid for pid in family if _alive(pid)]


@pytest.mark.parametrize("node_loop", ["uvloop"])
async def test_workers_share_one_port_and_each_has_its_admin_api(tmp_path, node_loop):
    port = free_port()
    admin = free_port_run(2)
    proc = Proc([sys.executable, "-m", "fanout", "node", "--workers", "2", "--port", str(port),
                 "--ws-port", str(free_port()), "--admin-port", str(admin), "--api-key", API_KEY, "--loop", node_loop,
                 "--node-id", "host"], "workers",
                env={**os.environ, "FANOUT_SECRET": SECRET, **SUITE_ADMISSION},
                log_path=tmp_path / "workers.log")
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while sum("fanout node listening" in line for line in proc.lines) < 2:
            assert asyncio.get_running_loop().time() < deadline, proc.log()[-3000:]
            assert proc.alive(), proc.log()[-3000:]
            await asyncio.sleep(0.1)
        # The documented scheme: worker i answers on admin_port + i, as <id>-w<i>.
        for i in range(2):
            req = urllib.request.Request(f"http://127.0.0.1:{admin + i}/readyz")
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 200
        # Both workers take connections on the one port (SO_REUSEPORT):
        # clients land on both, and a message crosses between them.
        got = await _one_message(port, port)
        assert got.payload == b"across"
        clients = [Client("127.0.0.1", port, mint(SECRET, f"spread-{i}", rooms="*"))
                   for i in range(40)]
        for c in clients:
            await c.connect()
        per_worker = []
        for i in range(2):
            with urllib.request.urlopen(f"http://127.0.0.1:{admin + i}/metrics",
                                        timeout=10) as resp:
                m = re.search(r"^fanout_connections (\d+)", resp.read().decode(), re.M)
                per_worker.append(int(m.group(1)))
        for c in clients:
            await c.close()
        assert sum(per_worker) == 40 and min(per_worker) > 0, per_worker
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_router_needs_a_bus():
    out = subprocess.run([sys.executable, "-m", "fanout", "router"], capture_output=True,
                         text=True, timeout=30, env={**os.environ,
                                                     "FANOUT_NATS": ""})
    assert out.returncode == 2
    assert "--nats is required" in out.stderr
