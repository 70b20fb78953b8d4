"""Cluster-wide rules on real processes (one NATS server, a router, nodes):
the one-login-per-device-class rule across nodes, admin disconnect and
token revocation reaching every node, cluster-wide presence, the admin
API's history and presence, interest-based delivery shown by the NATS
server's own figures, and the event log."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request

import nats
import pytest
from nats.js.api import DeliverPolicy

from fanout.client import Client
from fanout.client.sdk import AuthError, KickedError
from fanout.cluster import subjects as S
from fanout.cluster.events import describe
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol.auth import mint

from clusterkit import admin, cluster, wait_for  # noqa: F401  (fixture)
from conftest import SECRET

# Real processes on one loop (CI time): the rules do not depend on it.
pytestmark = [pytest.mark.parametrize("node_loop", ["uvloop"]),
              pytest.mark.asyncio(loop_factories=["uvloop"])]


def token(user: str, **kw) -> str:
    return mint(SECRET, user, rooms="*", **kw)


async def connect(node, user: str, *, device_class: str = "default", tok: str | None = None,
                  rooms: tuple[str, ...] = ()) -> Client:
    client = Client(node.host, node.port, tok or token(user), device_class=device_class,
                    reconnect=False)
    await client.connect()
    for room in rooms:
        await client.join(room)
    return client


async def kicked(client: Client, timeout: float = 5.0) -> int:
    """The reason of the Kick that ends ``client`` (events before it skipped)."""
    deadline = time.monotonic() + timeout
    with pytest.raises(KickedError) as info:
        while True:
            await client.next_event(timeout=max(0.01, deadline - time.monotonic()))
    return info.value.reason


async def still_open(client: Client, wait: float = 0.5) -> bool:
    """True if nothing ended ``client`` within ``wait`` seconds."""
    try:
        while True:
            await client.next_event(timeout=wait)
    except asyncio.TimeoutError:
        return client.connected


def metric(node, name: str) -> float:
    """One unlabelled sample of the node's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/metrics") as resp:
        text = resp.read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m is not None, f"{name} not in /metrics"
    return float(m.group(1))


def nats_conn(cluster, name: str) -> dict:
    """The NATS server's view of the connection named ``name``, subscriptions included."""
    conns = [c for c in cluster.nats.monitor("connz?subs=1")["connections"]
             if c.get("name") == name]
    assert len(conns) == 1, [c.get("name") for c in cluster.nats.monitor("connz")["connections"]]
    return conns[0]


def closed_all(*clients):
    return asyncio.gather(*(c.close() for c in clients))


# ---------------------------------------------------------------- logins, disconnect, revoke

async def test_a_second_login_on_another_node_kicks_the_first(cluster):
    cluster.start_nats()
    cluster.start_router()
    a, b = cluster.start_node(), cluster.start_node()
    first = await connect(a, "alice", device_class="phone")
    web = await connect(a, "alice", device_class="web")
    second = await connect(b, "alice", device_class="phone")
    try:
        assert await kicked(first) == pb.DUPLICATE_LOGIN
        # Another device class is another login; the new phone login stays.
        assert await still_open(web) and await still_open(second, 0.1)
        # And back: a third phone login on A kicks the one on B.
        third = await connect(a, "alice", device_class="phone")
        assert await kicked(second) == pb.DUPLICATE_LOGIN
        assert await still_open(third)
        await third.close()
    finally:
        await closed_all(first, web, second)


async def test_admin_disconnect_on_any_node_reaches_the_user_everywhere(cluster):
    cluster.start_nats()
    cluster.start_router()
    a, b, c = (cluster.start_node() for _ in range(3))
    bobs = [await connect(a, "bob", device_class="phone"),
            await connect(a, "bob", device_class="web"),
            await connect(b, "bob", device_class="tv")]
    carol = await connect(b, "carol")
    try:
        # C holds none of bob's connections: it says so, and that it told the cluster.
        status, body = admin(c, "POST", "/v1/disconnect", {"user": "bob", "reason": "suspended"})
        assert (status, body) == (200, {"disconnected_here": 0, "cluster": True})
        for client in bobs:
            assert await kicked(client) == pb.ADMIN_DISCONNECT
        assert await still_open(carol)
        # On the node holding two of them, the count is this node's.
        again = [await connect(a, "bob"), await connect(b, "bob", device_class="tv")]
        status, body = admin(a, "POST", "/v1/disconnect", {"user": "bob"})
        assert (status, body) == (200, {"disconnected_here": 1, "cluster": True})
        for client in again:
            assert await kicked(client) == pb.ADMIN_DISCONNECT
    finally:
        await closed_all(*bobs, carol)


async def test_revocation_on_one_node_reaches_every_node(cluster):
    cluster.start_nats()
    cluster.start_router()
    a, b, c = (cluster.start_node() for _ in range(3))
    old = token("mallory", issued_at=int(time.time()) - 10)
    victim = await connect(b, "mallory", tok=old)
    bystander = await connect(b, "trent")
    try:
        before = time.time() - 5
        status, body = admin(a, "POST", "/v1/users/mallory/revoke", {"before": before})
        assert (status, body) == (200, {"user": "mallory", "before": before, "kicked_here": 0,
                                        "cluster": True})
        assert await kicked(victim) == pb.TOKEN_REVOKED              # on node B
        with pytest.raises(AuthError) as info:                       # a new Hello on node C
            await connect(c, "mallory", tok=old)
        assert info.value.reason == pb.TOKEN_REVOKED
        fresh = await connect(c, "mallory", tok=token("mallory"))   # issued after `before`
        assert await still_open(fresh, 0.2) and await still_open(bystander, 0.1)
        await fresh.close()
    finally:
        await closed_all(victim, bystander)


# ---------------------------------------------------------------- presence

async def test_presence_counts_are_cluster_wide(cluster):
    cluster.start_nats()
    cluster.start_router()
    a, b, c = (cluster.start_node("--presence-interval-ms", "100") for _ in range(3))
    on_a = [await connect(a, f"user-{i:02d}", rooms=("show",)) for i in range(2)]
    on_b = [await connect(b, f"user-{i:02d}", rooms=("show",)) for i in range(2, 5)]
    # A user on two devices on two nodes is one user, two connections.
    twice = await connect(b, "user-00", device_class="web", rooms=("show",))
    elsewhere = await connect(c, "user-99", rooms=("other",))
    members = [*on_a, *on_b, twice]
    try:
        # Every member, on either node, gets the cluster-wide count pushed.
        for client in members:
            await _drain_until(client, lambda cl: cl.online("show") == 6)

        # The admin API of a node without members of the room sees all of it.
        status, body = admin(c, "GET", "/v1/rooms/show/presence")
        assert status == 200, body
        assert body == {"room": "show", "online": 6, "nodes": 2,
                        "users": [f"user-{i:02d}" for i in range(5)]}
        # Paged: sorted, bounded, with a cursor while there may be more.
        status, page1 = admin(c, "GET", "/v1/rooms/show/presence?limit=2")
        assert (page1["users"], page1["next"], page1["online"]) == (["user-00", "user-01"],
                                                                    "user-01", 6)
        _, page2 = admin(a, "GET", "/v1/rooms/show/presence?limit=2&after=user-01")
        assert (page2["users"], page2["next"]) == (["user-02", "user-03"], "user-03")
        _, page3 = admin(b, "GET", "/v1/rooms/show/presence?limit=2&after=user-03")
        assert page3["users"] == ["user-04"] and "next" not in page3
        _, empty = admin(b, "GET", "/v1/rooms/nobody-here/presence")
        assert empty == {"room": "nobody-here", "online": 0, "nodes": 0, "users": []}

        # Leaves on B reach A's members as a lower count, without waiting
        # for B's count to go stale.
        for client in on_b:
            await client.leave("show")
        await twice.close()
        t0 = time.monotonic()
        for client in on_a:
            await _drain_until(client, lambda cl: cl.online("show") == 2)
        assert time.monotonic() - t0 < 2.0
        _, body = admin(c, "GET", "/v1/rooms/show/presence")
        assert (body["online"], body["nodes"], body["users"]) == (2, 1, ["user-00", "user-01"])
    finally:
        await closed_all(*members, elsewhere)


async def _drain_until(client: Client, done, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done(client):
        left = deadline - time.monotonic()
        assert left > 0, f"presence never reached the expected count: {client.online('show')}"
        try:
            await client.next_event(timeout=min(0.1, left))
        except asyncio.TimeoutError:
            pass


# ---------------------------------------------------------------- history

async def test_history_from_any_node(cluster):
    cluster.start_nats()
    cluster.start_router()
    a, b = cluster.start_node(), cluster.start_node()
    for i in range(1, 31):
        status, body = admin(a, "POST", "/v1/publish",
                             {"room": "hist", "kind": "gift", "payload": f"gift {i}"})
        assert (status, body) == (200, {"seq": i})
    # B never held the room: its answers come from JetStream.
    status, last = admin(b, "GET", "/v1/rooms/hist/history?limit=10")
    assert status == 200, last
    assert last["epoch"] and "next" not in last
    assert [(m["seq"], m["payload"], m["kind"]) for m in last["messages"]] == \
        [(i, f"gift {i}", "gift") for i in range(21, 31)]
    _, since = admin(b, "GET", "/v1/rooms/hist/history?since=25")
    assert [m["seq"] for m in since["messages"]] == [26, 27, 28, 29, 30]
    assert since["epoch"] == last["epoch"]
    # Paging forward with the cursor covers every seq once.
    seqs, cursor = [], 0
    while True:
        _, page = admin(a, "GET", f"/v1/rooms/hist/history?since={cursor}&limit=7")
        seqs += [m["seq"] for m in page["messages"]]
        if "next" not in page:
            break
        cursor = page["next"]
    assert seqs == list(range(1, 31))
    _, none = admin(b, "GET", "/v1/rooms/never-used/history")
    assert none == {"room": "never-used", "epoch": "", "messages": []}


BAD_QUERIES = [
    ("history?limit=0", "'limit' must be from 1 to 1000, got 0"),
    ("history?limit=1001", "'limit' must be from 1 to 1000, got 1001"),
    ("history?limit=ten", "'limit' must be a whole number from 1 to 1000, got 'ten'"),
    ("history?limit=%2B5", "'limit' must be a whole number from 1 to 1000, got '+5'"),
    ("history?since=-1", "'since' must be a whole number from 0 to"),
    ("history?since=1&since=2", "query parameter 'since' given more than once"),
    ("history?limt=5", "unknown query parameter(s) limt; allowed: limit, since"),
    ("presence?limit=", "'limit' must be a whole number from 1 to 1000, got ''"),
    ("presence?after=x&page=2", "unknown query parameter(s) page; allowed: after, limit"),
    ("presence?after=" + "u" * 129, "'after' longer than 128 bytes"),
]


async def test_history_and_presence_refuse_bad_queries_clearly(start_node):
    node = start_node()
    for query, message in BAD_QUERIES:
        status, body = admin(node, "GET", f"/v1/rooms/r/{query}")
        assert status == 400 and body["error"]["code"] == "BAD_REQUEST", (query, body)
        assert body["error"]["message"].startswith(message), (query, body)
    status, body = admin(node, "GET", f"/v1/rooms/{'r' * 129}/history")
    assert (status, body["error"]["code"]) == (400, "BAD_REQUEST")


async def test_history_and_presence_of_a_single_node(start_node):
    """Without a cluster the ring is the history and the node is the presence."""
    node = start_node("--presence-interval-ms", "100")
    viewer = await connect(node, "viewer", rooms=("solo",))
    try:
        for i in range(1, 6):
            assert admin(node, "POST", "/v1/publish", {"room": "solo", "kind": "chat",
                                                       "payload": f"m{i}"})[1] == {"seq": i}
        _, body = admin(node, "GET", "/v1/rooms/solo/history?limit=2")
        assert [(m["seq"], m["payload"]) for m in body["messages"]] == [(4, "m4"), (5, "m5")]
        _, body = admin(node, "GET", "/v1/rooms/solo/history?since=3")
        assert [m["seq"] for m in body["messages"]] == [4, 5]
        _, body = admin(node, "GET", "/v1/rooms/solo/presence")
        assert body == {"room": "solo", "online": 1, "nodes": 1, "users": ["viewer"]}
        status, body = admin(node, "POST", "/v1/disconnect", {"user": "viewer"})
        assert (status, body) == (200, {"disconnected": 1})
    finally:
        await viewer.close()


# ---------------------------------------------------------------- interest-based delivery

async def test_a_node_without_members_of_a_room_receives_none_of_it(cluster):
    cluster.start_nats()
    cluster.start_router()
    a, b = cluster.start_node(), cluster.start_node("--room-release-s", "1")
    room = "stage"
    subject = S.room_subject(room)
    viewer_a = await connect(a, "viewer-a", rooms=(room,))
    try:
        def subs(name):
            return nats_conn(cluster, name).get("subscriptions_list", [])
        assert subject in subs("fanout-node node-0")
        assert subject not in subs("fanout-node node-1")
        out_before = nats_conn(cluster, "fanout-node node-1")["out_bytes"]

        payload = "x" * 1000
        for _ in range(200):
            status, _body = admin(a, "POST", "/v1/publish",
                                  {"room": room, "kind": "gift", "payload": payload})
            assert status == 200
        sent = 200 * len(payload)
        wait_for(lambda: metric(a, "fanout_bus_messages_received_total") == 200)
        assert metric(a, "fanout_bus_bytes_received_total") > sent
        # B: not one byte of the room, by its own count and by the server's.
        assert metric(b, "fanout_bus_messages_received_total") == 0
        assert metric(b, "fanout_bus_bytes_received_total") == 0
        assert subject not in subs("fanout-node node-1")
        out_after = nats_conn(cluster, "fanout-node node-1")["out_bytes"]
        assert out_after - out_before < sent / 20, (out_before, out_after)

        # Interest follows the members: one joins on B, B gets the room.
        viewer_b = await connect(b, "viewer-b", rooms=(room,))
        assert subject in subs("fanout-node node-1")
        status, body = admin(b, "POST", "/v1/publish",
                             {"room": room, "kind": "gift", "payload": "for both"})
        assert (status, body) == (200, {"seq": 201})
        event = await viewer_b.next_event(timeout=5)
        assert (event.seq, event.payload) == (201, b"for both")
        assert metric(b, "fanout_bus_messages_received_total") == 1
        assert metric(b, "fanout_bus_connected") == 1 and metric(b, "fanout_router_reachable") == 1
        assert metric(b, "fanout_bus_holes_lost_total") == 0
        await viewer_b.close()
        # ... and loses it once its last member there has been gone for
        # room_release_s (1 s here), though the room stays busy.
        wait_for(lambda: subject not in subs("fanout-node node-1"), 10)
        received = metric(b, "fanout_bus_messages_received_total")
        for _ in range(50):
            status, _body = admin(a, "POST", "/v1/publish",
                                  {"room": room, "kind": "gift", "payload": payload})
            assert status == 200
        wait_for(lambda: metric(a, "fanout_bus_messages_received_total") == 251)
        assert metric(b, "fanout_bus_messages_received_total") == received
        # A member back on B resumes from B's ring, loaded again from JetStream.
        epoch = viewer_a.cursor(room)[0]
        viewer_b = await connect(b, "viewer-b2")
        await viewer_b.join(room, last_seq=200, epoch=epoch)
        seqs = []
        while len(seqs) < 51:
            event = await viewer_b.next_event(timeout=5)
            assert isinstance(event, pb.RoomMessage), event
            seqs.append(event.seq)
        assert seqs == list(range(201, 252))
        await viewer_b.close()
    finally:
        await viewer_a.close()


async def test_refusals_are_unavailable_while_the_router_or_bus_is_away(cluster):
    cluster.start_nats()
    node = cluster.start_node()                    # no router yet
    status, body = admin(node, "POST", "/v1/publish",
                         {"room": "r", "kind": "gift", "payload": "p"})
    assert (status, body["error"]["code"]) == (503, "UNAVAILABLE"), body
    assert metric(node, "fanout_router_unavailable_total") >= 1
    assert metric(node, "fanout_router_reachable") == 0
    cluster.start_router()
    wait_for(lambda: admin(node, "POST", "/v1/publish",
                           {"room": "r", "kind": "gift", "payload": "p"})[0] == 200)
    assert metric(node, "fanout_router_reachable") == 1

    # The bus away (the router first: it is not what this test is about).
    cluster.routers.pop().stop()
    cluster.nats.stop()
    wait_for(lambda: metric(node, "fanout_bus_connected") == 0)
    for method, path, body in (("POST", "/v1/disconnect", {"user": "u"}),
                               ("GET", "/v1/rooms/r/history", None),
                               ("GET", "/v1/rooms/r/presence", None),
                               ("POST", "/v1/users/u/revoke", None)):
        status, answer = admin(node, method, path, body)
        assert (status, answer["error"]["code"]) == (503, "UNAVAILABLE"), (path, answer)


# ---------------------------------------------------------------- event log

async def test_connects_kicks_disconnects_and_messages_reach_the_event_log(cluster):
    cluster.start_nats()
    cluster.start_router()
    a, b = cluster.start_node(), cluster.start_node()
    first = await connect(a, "eve", rooms=("log",))
    assert admin(b, "POST", "/v1/publish",
                 {"room": "log", "kind": "gift", "payload": "rocket"})[1] == {"seq": 1}
    ack = await first.say("log", "hello")
    assert ack.seq == 2
    second = await connect(b, "eve")                   # kicks the first, on A
    assert await kicked(first) == pb.DUPLICATE_LOGIN
    await second.close()

    want = [("connect", "node-0"), ("message", 1), ("message", 2), ("connect", "node-1"),
            ("kick", "node-0"), ("disconnect", "node-0"), ("disconnect", "node-1")]

    def key(e):
        return (e["event"], e["seq"] if e["event"] == "message" else e["node"])

    async def read_stream() -> list[dict]:
        nc = await nats.connect(cluster.nats.url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(S.EVENT_STREAM)
            sub = await js.subscribe(">", stream=S.EVENT_STREAM, ordered_consumer=True,
                                     deliver_policy=DeliverPolicy.ALL)
            out = []
            for _ in range(info.state.messages):
                out.append(describe(await sub.next_msg(timeout=5)))
            return out
        finally:
            await nc.close()

    deadline = time.monotonic() + 10
    while True:
        events = await read_stream()
        if sorted(map(key, events)) == sorted(want) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert sorted(map(key, events)) == sorted(want), events
    by_kind = {}
    for e in events:
        by_kind.setdefault(e["event"], []).append(e)
    connect_a = next(e for e in by_kind["connect"] if e["node"] == "node-0")
    assert connect_a["user"] == "eve" and connect_a["device_class"] == "default"
    (kick,) = by_kind["kick"]
    assert (kick["user"], kick["reason"], kick["session"]) == \
        ("eve", "DUPLICATE_LOGIN", connect_a["session"])
    messages = sorted(by_kind["message"], key=lambda e: e["seq"])
    assert [(m["room"], m["kind"], m["sender"], m["payload"]) for m in messages] == \
        [("log", "gift", "api", "rocket"), ("log", "chat", "eve", "hello")]

    # `fanout events` prints the same log as JSON lines.
    out = subprocess.run([sys.executable, "-m", "fanout", "events", "--from-start",
                          "--count", str(len(events)), "--nats", cluster.nats.url],
                         capture_output=True, text=True, timeout=20, env=cluster.env)
    assert out.returncode == 0, out.stderr
    printed = [json.loads(line) for line in out.stdout.splitlines()]
    assert printed == events


async def test_a_publish_batch_keeps_each_rooms_order(cluster):
    """The admin API pipelines a batch's calls to the routers; each room's
    messages still get their seqs in the batch's order."""
    cluster.start_nats()
    cluster.start_router()
    node = cluster.start_node()
    rooms = ["batch-a", "batch-b", "batch-c"]
    items = [{"room": rooms[i % 3], "kind": "gift", "payload": f"m{i}"} for i in range(60)]
    status, body = admin(node, "POST", "/v1/publish", {"messages": items})
    assert status == 200, body
    seqs = {room: [] for room in rooms}
    for item, result in zip(items, body["results"]):
        seqs[item["room"]].append(result["seq"])
    assert all(s == list(range(1, 21)) for s in seqs.values()), seqs
    status, body = admin(node, "GET", "/v1/rooms/batch-b/history?limit=20")
    assert status == 200
    assert [m["payload"] for m in body["messages"]] == [f"m{i}" for i in range(1, 60, 3)]
