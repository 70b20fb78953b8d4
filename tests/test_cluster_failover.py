"""Cluster faults of the routers and of NATS, with real processes under load.

Publishers run all along (gifts through the admin API of every node, chat
from clients on every node) and record each outcome; receivers on every node
record what they are delivered. Then, for every test:

* every receiver got the same sequence, 1..N, no duplicate and no hole;
* every acknowledged publish is delivered, at its seq, with its payload;
* every refusal is ``UNAVAILABLE``, and nothing else went wrong;
* whatever is delivered was published, once.

A publish refused after a timeout (the router or JetStream did not answer in
time) may still have been stored: the publisher cannot tell, and the check
allows such a payload to be delivered (docs/cluster.md says so). Every such
case is counted and printed; nothing acknowledged may be missing.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import nats
from nats.js.errors import KeyValueError
import pytest

from fanout.client import Client
from fanout.client.sdk import AuthError, ConnectionLostError, RequestError
from fanout.cluster import subjects as S
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol.auth import mint

from clusterkit import admin, cluster, wait_for  # noqa: F401  (fixture)
from conftest import API_KEY, SECRET

ROOM = "failover"

# Faults run on one loop each side (CI time); test_cluster.py covers both.
pytestmark = [pytest.mark.parametrize("node_loop", ["uvloop"]),
              pytest.mark.asyncio(loop_factories=["uvloop"])]


class Load:
    """Publishers and receivers on the given nodes, until :meth:`stop`."""

    def __init__(self, nodes, *, room: str = ROOM, gifts_per_node: int = 2,
                 pause: float = 0.01) -> None:
        self.nodes = nodes
        self.room = room
        self.gifts_per_node = gifts_per_node
        self.pause = pause
        self.acked: dict[bytes, int] = {}           # payload -> seq
        self.refused: dict[bytes, str] = {}         # payload -> message (UNAVAILABLE)
        self.wrong: list[str] = []                  # any other outcome
        self.ack_times: list[float] = []            # monotonic time of every ack
        self.refusal_times: list[float] = []
        self.receivers: list[Client] = []
        self.chatters: list[Client] = []
        self.received: list[list] = []
        self._tasks: list[asyncio.Task] = []
        self._running = True

    async def start(self) -> None:
        for n, node in enumerate(self.nodes):
            for r in range(2):
                client = Client(node.host, node.port, mint(SECRET, f"rx-{n}-{r}", rooms="*"))
                await client.connect()
                await _join(client, self.room)
                self.receivers.append(client)
                self.received.append([])
            chatter = Client(node.host, node.port, mint(SECRET, f"chat-{n}", rooms="*"))
            await chatter.connect()
            await _join(chatter, self.room)
            self.chatters.append(chatter)
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=aiohttp.ClientTimeout(total=15))
        for i, client in enumerate(self.receivers):
            self._tasks.append(asyncio.ensure_future(self._receive(client, self.received[i])))
        for n, node in enumerate(self.nodes):
            for g in range(self.gifts_per_node):
                self._tasks.append(asyncio.ensure_future(self._gifts(node, f"g{n}.{g}")))
        for n, chatter in enumerate(self.chatters):
            self._tasks.append(asyncio.ensure_future(self._chat(chatter, f"c{n}")))

    def _ok(self, payload: bytes, seq: int) -> None:
        self.acked[payload] = seq
        self.ack_times.append(time.monotonic())

    def _refused(self, payload: bytes, code: str, message: str) -> None:
        if code == "UNAVAILABLE":
            self.refused[payload] = message
            self.refusal_times.append(time.monotonic())
        else:
            self.wrong.append(f"{payload!r}: {code} {message}")

    async def _gifts(self, node, name: str) -> None:
        url = f"http://127.0.0.1:{node.admin_port}/v1/publish"
        i = 0
        while self._running:
            i += 1
            payload = f"{name}.{i}".encode()
            try:
                async with self._session.post(url, json={
                        "room": self.room, "kind": "gift", "payload": payload.decode()}) as resp:
                    body = await resp.json()
                    if resp.status == 200:
                        self._ok(payload, body["seq"])
                    else:
                        error = body.get("error", {})
                        self._refused(payload, error.get("code", str(resp.status)),
                                      error.get("message", ""))
            except Exception as exc:            # the node itself must stay up
                self.wrong.append(f"{payload!r}: {exc!r}")
            await asyncio.sleep(self.pause)

    async def _chat(self, client: Client, name: str) -> None:
        i = 0
        while self._running:
            i += 1
            payload = f"{name}.{i}".encode()
            try:
                ack = await client.say(self.room, payload)
                self._ok(payload, ack.seq)
            except RequestError as exc:
                self._refused(payload, pb.Reason.Name(exc.reason), str(exc))
            except Exception as exc:
                self.wrong.append(f"{payload!r}: {exc!r}")
            await asyncio.sleep(0.25)            # under the chat rate (5/s a user)

    @staticmethod
    async def _receive(client: Client, into: list) -> None:
        while True:
            event = await client.next_event()
            if isinstance(event, pb.RoomMessage):
                into.append((event.seq, bytes(event.payload)))
            elif isinstance(event, pb.Gap):
                into.append(("gap", event.from_seq, event.to_seq))

    def acks_after(self, t: float) -> int:
        return sum(1 for a in self.ack_times if a > t)

    async def wait_acks_after(self, t: float, count: int, timeout: float) -> float:
        """Seconds from ``t`` until ``count`` publishes were acknowledged after it."""
        deadline = time.monotonic() + timeout
        while self.acks_after(t) < count:
            assert time.monotonic() < deadline, (
                f"only {self.acks_after(t)} acks in {timeout} s; wrong: {self.wrong[:5]}")
            await asyncio.sleep(0.02)
        return sorted(a for a in self.ack_times if a > t)[count - 1] - t

    async def stop(self) -> None:
        """Stop publishing; wait until every receiver has everything stored."""
        self._running = False
        publishers = self._tasks[len(self.receivers):]
        await asyncio.gather(*publishers)
        await self._session.close()
        top = max(self.acked.values(), default=0)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(got and got[-1][0] != "gap" and got[-1][0] >= top for got in self.received):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)                 # anything stored late arrives too
        for task in self._tasks[:len(self.receivers)]:
            task.cancel()
        for client in [*self.receivers, *self.chatters]:
            await client.close()

    def check(self) -> dict:
        """The checks every test makes; returns the figures."""
        assert not self.wrong, f"{len(self.wrong)} unexpected outcomes: {self.wrong[:10]}"
        first = self.received[0]
        seqs = [item[0] for item in first]
        assert seqs == list(range(1, len(first) + 1)), (
            f"not 1..N: {[(i, s) for i, s in enumerate(seqs) if s != i + 1][:10]}")
        for got in self.received[1:]:
            assert got == first, "receivers disagree"
        delivered = dict(first)                  # seq -> payload
        by_payload: dict[bytes, int] = {}
        for seq, payload in first:
            assert payload not in by_payload, f"{payload!r} delivered twice"
            by_payload[payload] = seq
        for payload, seq in self.acked.items():
            assert delivered.get(seq) == payload, (
                f"acknowledged {payload!r} at seq {seq}; delivered there: {delivered.get(seq)!r}")
        late = [p for p in by_payload if p not in self.acked]
        for payload in late:
            assert payload in self.refused, f"{payload!r} delivered but never published"
        figures = {"delivered": len(first), "acked": len(self.acked),
                   "refused": len(self.refused),
                   "refused_then_stored": len(late)}
        return figures


async def _owner(url: str, room: str, wait: float = 10.0) -> str:
    """The router holding the room's partition lease (waiting while the
    partition is between routers: the second router's arrival moves half
    of them)."""
    nc = await nats.connect(url)
    deadline = time.monotonic() + wait
    try:
        kv = await nc.jetstream().key_value(S.LEASE_BUCKET)
        while True:
            try:
                return (await kv.get(f"p{S.partition(room)}")).value.decode()
            except KeyValueError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def _revocations_reach_every_router(nodes, tag: str) -> None:
    """Revoke users through one node (one router stores each revocation, the
    others learn it from the KV bucket they watch); their old tokens are then
    refused on another node, whichever router holds each user's partition."""
    issued = int(time.time()) - 10
    users = [f"revoked-{tag}-{i}" for i in range(8)]
    for user in users:
        status, body = await asyncio.to_thread(admin, nodes[0], "POST",
                                               f"/v1/users/{user}/revoke", {})
        assert status == 200, body
    await asyncio.sleep(0.5)                     # the watch's delivery
    let_in = []
    for user in users:
        for attempt in range(20):
            client = Client(nodes[-1].host, nodes[-1].port,
                            mint(SECRET, user, rooms="*", issued_at=issued))
            try:
                await client.connect()
                let_in.append(user)
            except ConnectionLostError as exc:   # UNAVAILABLE: retry, as clients do
                assert exc.reason == pb.UNAVAILABLE, exc
                await asyncio.sleep(0.1)
                continue
            except AuthError as exc:
                assert exc.reason == pb.TOKEN_REVOKED, exc
            finally:
                await client.close()
            break
        else:
            raise AssertionError(f"user {user}'s router unavailable for 2 s")
    assert not let_in, f"revoked users let in {tag} the outage: {let_in}"


async def _join(client: Client, room: str) -> None:
    # Before the fault too, a router may not serve the room's partition yet
    # (its lease still being taken on a loaded machine): UNAVAILABLE means
    # retry later, and clients do.
    deadline = time.monotonic() + 15
    while True:
        try:
            await client.join(room)
            return
        except RequestError as exc:
            if exc.reason != pb.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def _ready(node) -> tuple[int, dict]:
    return admin(node, "GET", "/readyz")


async def test_router_killed_under_load(cluster):
    cluster.start_nats()
    routers = {f"router-{i}": cluster.start_router(router_id=f"router-{i}") for i in range(2)}
    nodes = [cluster.start_node() for _ in range(2)]
    # Both routers hold their share before the load starts.
    wait_for(lambda: all("partitions" in r.log() for r in routers.values()), 10)
    load = Load(nodes)
    await load.start()
    try:
        await load.wait_acks_after(time.monotonic(), 100, 15)
        owner = await _owner(cluster.nats.url, ROOM)
        survivor = next(name for name in routers if name != owner)
        killed = time.monotonic()
        routers[owner].kill()
        takeover = await load.wait_acks_after(killed, 1, 15)
        await load.wait_acks_after(killed, 100, 15)
        assert await _owner(cluster.nats.url, ROOM) == survivor
    finally:
        await load.stop()
    figures = load.check()
    refusals_after = sum(1 for t in load.refusal_times if t > killed)
    print(f"\nrouter kill: takeover {takeover:.2f} s; {figures}; "
          f"refusals after the kill {refusals_after}")
    assert takeover < 10
    assert figures["acked"] >= 200           # 100 before the fault and 100 after, waited for


async def test_nats_stopped_for_ten_seconds(cluster):
    (server,) = cluster.start_nats()
    cluster.start_router(router_id="router-0")
    cluster.start_router(router_id="router-1")
    nodes = [cluster.start_node() for _ in range(2)]
    wait_for(lambda: all(_ready(n)[0] == 200 for n in nodes), 10)
    await _revocations_reach_every_router(nodes, "before")
    load = Load(nodes)
    await load.start()
    try:
        await load.wait_acks_after(time.monotonic(), 100, 15)
        server.stop()
        stopped = time.monotonic()
        for node in nodes:
            status, body = await asyncio.to_thread(
                wait_for, lambda n=node: (lambda r: r if r[0] == 503 else None)(_ready(n)), 5)
            assert body["not_ready_because"] == ["bus unreachable"], body
        refused_before = len(load.refused)
        await asyncio.sleep(10 - (time.monotonic() - stopped))
        assert len(load.refused) > refused_before, "no explicit refusal during the outage"
        assert all(c.connected for c in [*load.receivers, *load.chatters])
        assert all(c.stats["reconnects"] == 0 for c in [*load.receivers, *load.chatters])
        restarted = time.monotonic()
        server.start()                           # same port, same store
        for node in nodes:
            await asyncio.to_thread(wait_for, lambda n=node: _ready(n)[0] == 200, 15)
        ready_after = time.monotonic() - restarted
        recovered = await load.wait_acks_after(restarted, 1, 15)
        await load.wait_acks_after(restarted, 100, 15)
    finally:
        await load.stop()
    figures = load.check()
    assert all(c.stats["reconnects"] == 0 for c in load.receivers)
    print(f"\nNATS outage 10 s: ready again {ready_after:.2f} s and publishing again "
          f"{recovered:.2f} s after the restart; {figures}")
    assert figures["acked"] >= 200           # 100 before the fault and 100 after, waited for
    # Revocations still reach every router (their KV watch came back).
    await _revocations_reach_every_router(nodes, "after")


async def test_nats_server_killed_in_r3_cluster(cluster):
    servers = cluster.start_nats(3)
    cluster.start_router("--cluster-replicas", "3", router_id="router-0")
    nodes = [cluster.start_node("--cluster-replicas", "3") for _ in range(2)]
    wait_for(lambda: all(_ready(n)[0] == 200 for n in nodes), 15)
    load = Load(nodes)
    await load.start()
    try:
        await load.wait_acks_after(time.monotonic(), 100, 15)
        # The stream leader's server: the worst one to lose.
        victim = _stream_leader(servers)
        assert victim is not None, "no leader of the history stream"
        router_there = _has_client(victim, "router-0")
        killed = time.monotonic()
        victim.kill()
        await load.wait_acks_after(killed, 100, 25)
    finally:
        await load.stop()
    figures = load.check()
    refusing = max((t for t in load.refusal_times if t > killed), default=killed) - killed
    print(f"\nR3, the stream leader {victim.name} killed"
          f"{' (the router was connected to it)' if router_there else ''}: "
          f"refusals for {refusing:.2f} s; {figures}")
    assert figures["acked"] >= 200           # 100 before the fault and 100 after, waited for


def _has_client(server, name: str) -> bool:
    return any(c.get("name") == name for c in server.monitor("connz").get("connections", []))


def _stream_leader(servers):
    """The server leading the history stream (from its monitoring endpoint)."""
    for server in servers:
        try:
            jsz = server.monitor("jsz?streams=true")
        except OSError:
            continue
        for account in jsz.get("account_details", []):
            for stream in account.get("stream_detail", []):
                if stream.get("name") == S.HISTORY_STREAM:
                    leader = stream.get("cluster", {}).get("leader")
                    for s in servers:
                        if s.name == leader:
                            return s
    return None
