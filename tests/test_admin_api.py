"""The admin HTTP API (fanout/server/admin.py) against real node processes."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from conftest import token
from fanout.client import Client
from fanout.protocol import fanout_pb2 as pb
from rawclient import FT, RawClient

DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana" / "fanout-dashboard.json"
PROTOBUF = "application/x-protobuf"
CLIENTS = 1000
_KEY = object()   # api(): use the node's own key


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes

    def json(self):
        assert self.content_type.startswith("application/json"), self.content_type
        return json.loads(self.body)

    @property
    def error(self) -> dict:
        return self.json()["error"]


def api(node, method: str, path: str, body=None, *, key=_KEY,
        content_type: str = "application/json", headers: dict | None = None) -> Reply:
    """One request to ``node``'s admin API; ``body`` is JSON-encoded unless bytes."""
    headers = dict(headers or {})
    if key is _KEY:
        key = node.api_key
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if body is not None:
        headers["Content-Type"] = content_type
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{node.admin_port}{path}", data=body,
                                     method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Reply(response.status, response.headers["Content-Type"], response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, exc.headers["Content-Type"], exc.read())


def scrape(node) -> dict[tuple, float]:
    """``/metrics`` as {(sample name, sorted label items): value}."""
    reply = api(node, "GET", "/metrics", key=None)
    assert reply.status == 200 and reply.content_type.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(reply.body.decode())
            for s in family.samples}


def publish_pb(node, *messages: pb.Publish) -> tuple[int, pb.PublishResponse]:
    body = pb.PublishRequest(messages=messages).SerializeToString()
    reply = api(node, "POST", "/v1/publish", body, content_type=PROTOBUF)
    assert reply.content_type == PROTOBUF, reply
    return reply.status, pb.PublishResponse.FromString(reply.body)


def joined(node, user: str, room: str, **hello) -> RawClient:
    client = RawClient(node.host, node.port)
    assert isinstance(client.hello(token(user), **hello), pb.AuthOk)
    assert isinstance(client.join(room), pb.Ack)
    return client


# ---------------------------------------------------------------- publish


def test_every_publish_form_reaches_a_thousand_clients_in_order(node):
    room = "show:42"
    # (kind, priority, sender, payload) of each message, in publish order
    sent: list[tuple[int, int, str, bytes]] = []
    seqs: list[int] = []

    def publish_all():
        reply = api(node, "POST", "/v1/publish",
                    {"room": room, "kind": "system", "payload": "stream starts"})
        assert reply.status == 200, reply
        seqs.append(reply.json()["seq"])
        sent.append((pb.SYSTEM, 0, "api", b"stream starts"))

        batch = []
        for i in range(60):
            kind = ("chat", "gift", "system")[i % 3]
            item = {"room": room, "kind": kind, "sender": f"svc-{i % 4}", "priority": i % 5}
            raw = bytes([i, 0, 255]) + f"#{i}".encode()
            if i % 2:
                item["payload_b64"] = base64.b64encode(raw).decode()
            else:
                raw = f"hello {i} ✓".encode()
                item["payload"] = raw.decode()
            batch.append(item)
            sent.append(({"chat": pb.CHAT, "gift": pb.GIFT, "system": pb.SYSTEM}[kind],
                         i % 5, f"svc-{i % 4}", raw))
        reply = api(node, "POST", "/v1/publish", {"messages": batch})
        assert reply.status == 200, reply
        results = reply.json()["results"]
        assert all(set(r) == {"seq"} for r in results), results
        seqs.extend(r["seq"] for r in results)

        protos = [pb.Publish(room=room, kind=pb.GIFT, priority=7, sender="gift-svc",
                             payload=f"rocket {i}".encode()) for i in range(40)]
        protos.append(pb.Publish(room=room, kind=pb.CHAT, payload=b"no sender given"))
        status, response = publish_pb(node, *protos)
        assert status == 200
        assert all(r.reason == pb.REASON_UNSPECIFIED and not r.message for r in response.results)
        seqs.extend(r.seq for r in response.results)
        sent.extend((p.kind, p.priority, p.sender or "api", p.payload) for p in protos)

        status, response = publish_pb(node, pb.Publish(room=room, kind=pb.SYSTEM, payload=b"end"))
        assert status == 200
        seqs.append(response.results[0].seq)
        sent.append((pb.SYSTEM, 0, "api", b"end"))

    async def collect(client: Client, count: int) -> list[pb.RoomMessage]:
        got = []
        while len(got) < count:
            event = await client.next_event(timeout=60)
            assert isinstance(event, pb.RoomMessage), event
            got.append(event)
        return got

    async def main():
        clients = [Client(node.host, node.port, token(f"viewer-{i}"), device_id=str(i))
                   for i in range(CLIENTS)]
        try:
            await asyncio.gather(*(c.connect() for c in clients))
            await asyncio.gather(*(c.join(room) for c in clients))
            await asyncio.to_thread(publish_all)
            return await asyncio.gather(*(collect(c, len(sent)) for c in clients))
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    streams = asyncio.run(main())
    assert seqs == list(range(1, len(sent) + 1))
    for stream in streams:
        assert [m.seq for m in stream] == seqs
        assert [(m.kind, m.priority, m.sender, m.payload) for m in stream] == sent
        assert {m.room for m in stream} == {room}


# ---------------------------------------------------------------- refusals


def test_auth_failures_and_bad_requests_get_json_errors(node):
    ok = {"room": "r", "kind": "gift", "payload": "x"}
    cases = [
        # (what, method, path, body, options, status, code, words in the message)
        ("no key", "POST", "/v1/publish", ok, {"key": None}, 401, "UNAUTHORIZED", "API key"),
        ("wrong key", "POST", "/v1/publish", ok, {"key": "nope"}, 403, "FORBIDDEN", "wrong"),
        ("wrong key header", "POST", "/v1/drain", None,
         {"key": None, "headers": {"X-API-Key": "nope"}}, 403, "FORBIDDEN", "wrong"),
        ("basic auth", "GET", "/v1/rooms/r", None,
         {"key": None, "headers": {"Authorization": "Basic Zm9vOmJhcg=="}}, 401,
         "UNAUTHORIZED", "Bearer"),
        ("invalid JSON", "POST", "/v1/publish", b'{"room": ', {}, 400, "BAD_REQUEST", "JSON"),
        ("not an object", "POST", "/v1/publish", [ok], {}, 400, "BAD_REQUEST", "object"),
        ("room not a string", "POST", "/v1/publish", {**ok, "room": 5}, {}, 400,
         "BAD_REQUEST", "'room' must be a string"),
        ("priority a string", "POST", "/v1/publish", {**ok, "priority": "1"}, {}, 400,
         "BAD_REQUEST", "'priority' must be an integer"),
        ("priority a bool", "POST", "/v1/publish", {**ok, "priority": True}, {}, 400,
         "BAD_REQUEST", "'priority' must be an integer"),
        ("negative priority", "POST", "/v1/publish", {**ok, "priority": -1}, {}, 400,
         "BAD_REQUEST", "priority"),
        ("missing kind", "POST", "/v1/publish", {"room": "r", "payload": "x"}, {}, 400,
         "BAD_REQUEST", "'kind' is required"),
        ("unknown kind", "POST", "/v1/publish", {**ok, "kind": "confetti"}, {}, 400,
         "BAD_REQUEST", "confetti"),
        ("empty room", "POST", "/v1/publish", {**ok, "room": ""}, {}, 400,
         "BAD_REQUEST", "empty"),
        ("unknown field", "POST", "/v1/publish", {**ok, "priorty": 3}, {}, 400,
         "BAD_REQUEST", "priorty"),
        ("no payload", "POST", "/v1/publish", {"room": "r", "kind": "gift"}, {}, 400,
         "BAD_REQUEST", "payload_b64"),
        ("two payloads", "POST", "/v1/publish", {**ok, "payload_b64": "eA=="}, {}, 400,
         "BAD_REQUEST", "exactly one"),
        ("bad base64", "POST", "/v1/publish", {"room": "r", "kind": "gift",
                                               "payload_b64": "*not base64*"}, {}, 400,
         "BAD_REQUEST", "base64"),
        ("message too large", "POST", "/v1/publish", {**ok, "payload": "x" * 70_000}, {}, 413,
         "MESSAGE_TOO_LARGE", "65536"),
        ("body too large", "POST", "/v1/publish", b"x" * (5 << 20), {}, 413,
         "PAYLOAD_TOO_LARGE", "bytes"),
        ("form body", "POST", "/v1/publish", b"room=r", {"content_type":
         "application/x-www-form-urlencoded"}, 415, "UNSUPPORTED_MEDIA_TYPE",
         "add -H 'Content-Type: application/json'"),
        ("too many items", "POST", "/v1/publish", {"messages": [ok] * 1001}, {}, 400,
         "BAD_REQUEST", "at most 1000"),
        ("no items", "POST", "/v1/publish", {"messages": []}, {}, 400, "BAD_REQUEST", "no messages"),
        ("items not a list", "POST", "/v1/publish", {"messages": ok}, {}, 400,
         "BAD_REQUEST", "array"),
        ("bad protobuf", "POST", "/v1/publish", b"\xff\xff\xff", {"content_type": PROTOBUF},
         400, "BAD_REQUEST", "PublishRequest"),
        ("disconnect without user", "POST", "/v1/disconnect", {"reason": "x"}, {}, 400,
         "BAD_REQUEST", "'user' is required"),
        ("room name too long", "GET", "/v1/rooms/" + "r" * 200, None, {}, 400,
         "BAD_REQUEST", "longer"),
        ("unknown endpoint", "GET", "/v1/nothing", None, {}, 404, "NOT_FOUND", "/v1/nothing"),
        ("wrong method", "GET", "/v1/publish", None, {}, 405, "METHOD_NOT_ALLOWED", "POST"),
    ]
    for what, method, path, body, options, status, code, words in cases:
        reply = api(node, method, path, body, **options)
        assert (reply.status, reply.error["code"]) == (status, code), (what, reply)
        assert words in reply.error["message"], (what, reply.error)

    # A batch reports each bad item in place and publishes the rest.
    reply = api(node, "POST", "/v1/publish",
                {"messages": [ok, {**ok, "kind": "confetti"}, "x", {**ok, "room": ""}, ok]})
    assert reply.status == 200
    results = reply.json()["results"]
    assert results[0] == {"seq": 1} and results[4] == {"seq": 2}
    assert [r["error"]["code"] for r in results[1:4]] == ["BAD_REQUEST"] * 3

    # A refused one-message protobuf request: the reason's status, and the body says why.
    status, response = publish_pb(node, pb.Publish(room="r", payload=b"x"))  # no kind
    assert status == 400 and response.results[0].reason == pb.BAD_REQUEST
    assert response.results[0].seq == 0 and response.results[0].message
    status, response = publish_pb(node, pb.Publish(room="r", kind=pb.GIFT, payload=b"x" * 70_000),
                                  pb.Publish(room="r", kind=pb.GIFT, payload=b"y"))
    assert status == 200
    assert [(r.reason, r.seq) for r in response.results] == [(pb.MESSAGE_TOO_LARGE, 0), (0, 3)]

    # Both key headers work, and the node kept serving through all of the above.
    assert node.alive()
    reply = api(node, "POST", "/v1/publish", ok, key=None, headers={"X-API-Key": node.api_key})
    assert reply.status == 200 and reply.json() == {"seq": 4}
    assert api(node, "GET", "/healthz", key=None).json() == {"status": "ok"}


# ---------------------------------------------------------------- metrics, rooms


def test_metrics_follow_publishes_and_connections(start_node):
    node = start_node("--presence-interval-ms", "0")
    members, gifts = 25, 40
    clients = [joined(node, f"fan-{i}", "gala") for i in range(members)]
    before = scrape(node)
    assert before[("fanout_connections", ())] == members

    items = [{"room": "gala", "kind": "gift", "payload": f"rose {i}"} for i in range(gifts)]
    assert api(node, "POST", "/v1/publish", {"messages": items}).status == 200
    for client in clients:
        assert [m.seq for m in client.messages(gifts)] == list(range(1, gifts + 1))
    after = scrape(node)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("fanout_messages_in_total", kind="gift") == gifts
    assert grew("fanout_messages_in_total", kind="chat") == 0
    assert grew("fanout_deliveries_total") == gifts * members
    assert grew("fanout_frames_written_total") >= members
    assert grew("fanout_batch_messages_count") >= 1
    assert grew("fanout_batch_messages_sum") == gifts
    assert grew("fanout_flush_delay_seconds_count") == grew("fanout_batch_messages_count")
    # End to end: one observation per frame as well (every record has its
    # server_ts_ms), each the frame's flush delay plus the trip from the
    # sequencer to the room: on one node, on one clock, a few ms at most.
    frames = grew("fanout_delivery_latency_seconds_count")
    assert frames == grew("fanout_flush_delay_seconds_count") >= 1
    waited = grew("fanout_flush_delay_seconds_sum")
    assert waited <= grew("fanout_delivery_latency_seconds_sum") <= waited + 0.05 * frames
    assert grew("fanout_batch_bytes_total", stage="raw") > 0
    # Body bytes only, so the ratio cannot read over 1 (headers were counted once).
    assert 0 < grew("fanout_batch_bytes_total", stage="compressed") <= grew(
        "fanout_batch_bytes_total", stage="raw")
    # The process: memory, and a descriptor per client at least.
    assert after[("process_resident_memory_bytes", ())] > 0
    assert after[("process_open_fds", ())] >= members
    assert after[("process_cpu_seconds_total", ())] > 0

    # One message under compress_min: sent as it is, so compressed == raw exactly.
    before = after
    assert api(node, "POST", "/v1/publish", {"room": "gala", "kind": "gift",
                                             "payload": "tiny"}).status == 200
    for client in clients:
        assert [m.seq for m in client.messages(1)] == [gifts + 1]
    after = scrape(node)
    assert grew("fanout_batch_bytes_total", stage="raw") > 0
    assert grew("fanout_batch_bytes_total", stage="compressed") == grew(
        "fanout_batch_bytes_total", stage="raw")
    # The lag probe runs every 100 ms; this test can be quicker than that.
    for _ in range(50):
        if scrape(node).get(("fanout_event_loop_lag_seconds_count", ()), 0) > 0:
            break
        time.sleep(0.05)
    assert scrape(node)[("fanout_event_loop_lag_seconds_count", ())] > 0
    assert after[("fanout_connections", ())] == members
    assert after[("fanout_rooms", ())] == 1
    for client in clients[:10]:
        client.close()
    deadline = time.monotonic() + 10
    while scrape(node)[("fanout_connections", ())] != members - 10:
        assert time.monotonic() < deadline, "fanout_connections did not drop"
        time.sleep(0.05)


def test_room_list_pages_through_the_rooms_held_here(node):
    """GET /v1/rooms: rooms by name with their members here and last seq, a
    page at a time; the cursor walks them all once; bad parameters are 400."""
    names = [f"room-{i:02d}" for i in range(7)]
    clients = [joined(node, f"u{i}", name) for i, name in enumerate(names)]
    clients.append(joined(node, "extra", "room-03"))
    assert api(node, "POST", "/v1/publish",
               {"room": "room-03", "kind": "gift", "payload": "x"}).json() == {"seq": 1}
    seen, after = [], ""
    while True:
        reply = api(node, "GET", "/v1/rooms?limit=3" + (f"&after={after}" if after else ""))
        assert reply.status == 200, reply
        page = reply.json()
        assert page["total"] == 7 and len(page["rooms"]) <= 3
        seen += page["rooms"]
        after = page["next"]
        if after is None:
            break
    assert [r["room"] for r in seen] == names
    assert {r["room"]: (r["online"], r["last_seq"]) for r in seen}["room-03"] == (2, 1)
    assert all(r["online"] == 1 and r["epoch"] for r in seen if r["room"] != "room-03")
    everything = api(node, "GET", "/v1/rooms").json()
    assert len(everything["rooms"]) == 7 and everything["next"] is None
    for query, words in (("limit=0", "limit"), ("limit=1001", "limit"), ("room=x", "room"),
                         ("after=" + "r" * 200, "longer")):
        reply = api(node, "GET", "/v1/rooms?" + query)
        assert (reply.status, reply.error["code"]) == (400, "BAD_REQUEST"), (query, reply)
        assert words in reply.error["message"], (query, reply.error)
    assert api(node, "GET", "/v1/rooms", key="wrong").status == 403
    for client in clients:
        client.close()


def test_room_info_reports_online_and_last_seq(node):
    room = "live:42/hd ü"      # ':', '/', space and non-ASCII, percent-encoded in the path
    path = "/v1/rooms/" + urllib.parse.quote(room, safe="")
    members = [joined(node, f"v{i}", room) for i in range(3)]
    for i in range(5):
        assert api(node, "POST", "/v1/publish",
                   {"room": room, "kind": "gift", "payload": str(i)}).json() == {"seq": i + 1}
    reply = api(node, "GET", path)
    assert reply.status == 200
    info = reply.json()
    assert (info["room"], info["online"], info["last_seq"]) == (room, 3, 5)
    assert {"epoch", "rates", "budget", "degraded"} <= info.keys()
    assert info["rates"]["gift"] > 0 and set(info["degraded"]) == {"chat", "gift", "system"}
    members[0].close()
    deadline = time.monotonic() + 10
    while api(node, "GET", path).json()["online"] != 2:
        assert time.monotonic() < deadline, "online count did not drop"
        time.sleep(0.05)
    empty = api(node, "GET", "/v1/rooms/never-used").json()
    assert (empty["online"], empty["last_seq"]) == (0, 0)


# ---------------------------------------------------------------- disconnect, drain


def test_disconnect_closes_every_connection_of_the_user(node):
    bob = [joined(node, "bob", "r", device_class=cls) for cls in ("mobile", "web", "tv")]
    carol = joined(node, "carol", "r")
    reply = api(node, "POST", "/v1/disconnect", {"user": "bob", "reason": "account suspended"})
    assert (reply.status, reply.json()) == (200, {"disconnected": 3})
    for client in bob:
        frames = client.until_closed()
        ftype, kick = frames[-1]
        assert ftype == FT.KICK, frames
        assert (kick.reason, kick.message) == (pb.ADMIN_DISCONNECT, "account suspended")
    # Others stay connected and keep receiving.
    assert api(node, "POST", "/v1/publish",
               {"room": "r", "kind": "system", "payload": "still here"}).status == 200
    assert carol.messages(1)[0].payload == b"still here"
    again = api(node, "POST", "/v1/disconnect", {"user": "bob"})
    assert again.json() == {"disconnected": 0}


def fanout_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fanout", *args], capture_output=True,
                          text=True, timeout=30)


def test_drain_command_drains_the_node_and_it_exits(start_node):
    node = start_node("--drain-grace-ms", "3000", "--drain-jitter-ms", "200",
                      "--presence-interval-ms", "0")
    port = str(node.admin_port)
    wrong = fanout_cli("drain", "--admin-port", port, "--api-key", "nope")
    assert wrong.returncode == 1 and "403" in wrong.stderr and "FORBIDDEN" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
    assert node.alive()

    # A viewer that reads its Kick but keeps the socket open, so the drain
    # lasts its grace period and the node can be watched meanwhile.
    viewer = joined(node, "viewer", "r")
    done = fanout_cli("drain", "--admin-port", port, "--api-key", node.api_key)
    assert done.returncode == 0, done.stderr
    assert "draining" in done.stdout
    ftype, kick = viewer.next()
    assert ftype == FT.KICK and kick.reason == pb.SERVER_SHUTDOWN
    ready = api(node, "GET", "/readyz", key=None)
    assert ready.status == 503
    assert ready.json()["ready"] is False and ready.json()["draining"] is True
    assert api(node, "GET", "/healthz", key=None).status == 200
    refused = api(node, "POST", "/v1/publish", {"room": "r", "kind": "gift", "payload": "x"})
    assert (refused.status, refused.error["code"]) == (503, "DRAINING")
    assert scrape(node)[("fanout_draining", ())] == 1
    assert api(node, "POST", "/v1/drain").status == 202          # idempotent

    assert node.proc.wait(timeout=15) == 0
    viewer.close()
    gone = fanout_cli("drain", "--admin-port", port, "--api-key", node.api_key)
    assert gone.returncode == 1 and "cannot reach" in gone.stderr


# ---------------------------------------------------------------- dashboard


def _sample_names(metrics_text: str) -> set[str]:
    """Every series name the exposition can have, including families with no
    samples yet (a labelled counter before its first increment)."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("", "_count", "_sum", "_created")}
    return {family.name + suffix
            for family in text_string_to_metric_families(metrics_text)
            for suffix in suffixes.get(family.type, ("",))}


def test_dashboard_queries_use_metrics_the_node_exports(node):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["title"]
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels if p["type"] != "row" for t in p["targets"]]
    exprs += [v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
              for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert len(exprs) >= 15
    text = api(node, "GET", "/metrics", key=None).body.decode()
    used = {name for expr in exprs
            for name in re.findall(r"\b(?:fanout|process)_[a-z0-9_]+", expr)}
    exported = _sample_names(text)
    assert used and not used - exported, f"not exported: {sorted(used - exported)}"
    # Every family of the node is on the dashboard somewhere. (The 0.0.4 text
    # format shows a counter's or histogram's _created series as a gauge of its own.)
    on_dashboard = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in used}
    families = {f.name for f in text_string_to_metric_families(text)
                if not f.name.endswith("_created")}
    assert not families - on_dashboard, f"no panel for {sorted(families - on_dashboard)}"
