"""Pushes to one user: the user's channel "@" + user (docs/protocol.md 5.10).

Every connection of a user is a member from its AuthOk on; the admin API
publishes to it with "user"; its messages carry seqs and resume like a room's.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from clusterkit import admin, cluster  # noqa: F401  (fixture)
from conftest import token
from impair import ImpairedLink
from inprocess import local_app
from rawclient import FT, RawClient
from test_admin_api import api, publish_pb, scrape
from fanout.client import Client
from fanout.logic import Rejected
from fanout.protocol import fanout_pb2 as pb


def authed(node, user: str, **hello) -> tuple[RawClient, pb.AuthOk]:
    client = RawClient(node.host, node.port)
    ok = client.hello(token(user), **hello)
    assert isinstance(ok, pb.AuthOk), ok
    return client, ok


def push(node, user: str, text: str, kind: str = "system") -> int:
    reply = api(node, "POST", "/v1/publish", {"user": user, "kind": kind, "payload": text})
    assert reply.status == 200, reply
    return reply.json()["seq"]


def wake_ack(client: RawClient, channel: str) -> pb.Ack:
    """The Ack{req_id 0} a waiting connection gets when its channel opens."""
    ack = client.expect(FT.ACK)
    assert (ack.req_id, ack.room) == (0, channel) and ack.epoch, ack
    return ack


def test_every_connection_of_the_user_gets_its_pushes_in_order(node):
    phone, ok = authed(node, "u1", device_class="mobile")
    # no history yet: the cursor has no epoch, and the connection waits
    assert (ok.channel, ok.channel_seq, ok.channel_epoch) == ("@u1", 0, "")
    web, ok_web = authed(node, "u1", device_class="web")
    assert (ok_web.channel, ok_web.channel_epoch) == ("@u1", "")
    other, ok_other = authed(node, "u2")
    assert ok_other.channel == "@u2"
    # a room alongside the channel is not disturbed
    assert web.join("show").seq == 0
    assert [push(node, "u1", f"receipt {i}", "gift") for i in range(1, 4)] == [1, 2, 3]
    # the first push opened the channel: each connection got its epoch first
    assert wake_ack(phone, "@u1").epoch == wake_ack(web, "@u1").epoch
    for client in (phone, web):
        got = client.messages(3)
        assert [(m.room, m.seq, m.kind, m.payload) for m in got] == [
            ("@u1", i, pb.GIFT, f"receipt {i}".encode()) for i in (1, 2, 3)]
    # the other user got nothing: its next frame is the Pong
    other.send(FT.PING, pb.Ping(nonce=5))
    assert other.expect(FT.PONG).nonce == 5


def test_a_new_connection_resumes_the_channel_from_its_hello(node):
    first, _ = authed(node, "resumer")
    push(node, "resumer", "one")
    push(node, "resumer", "two")
    ok = wake_ack(first, "@resumer")
    assert ok.seq == 0
    assert [m.seq for m in first.messages(2)] == [1, 2]
    first.close()
    # pushed while the user had no connection: kept in the channel's ring
    push(node, "resumer", "three")
    push(node, "resumer", "four")
    again = RawClient(node.host, node.port)
    again.send(FT.HELLO, pb.Hello(token=token("resumer"), channel_last_seq=2,
                                  channel_epoch=ok.epoch))
    ok2 = again.expect(FT.AUTH_OK)
    assert (ok2.channel, ok2.channel_seq, ok2.channel_epoch) == ("@resumer", 2, ok.epoch)
    assert [(m.seq, m.payload) for m in again.messages(2)] == [(3, b"three"), (4, b"four")]
    # a fresh connection (no cursor) starts from now on
    fresh, ok3 = authed(node, "resumer", device_class="web")
    assert (ok3.channel_seq, ok3.channel_epoch) == (4, ok.epoch)
    push(node, "resumer", "five")
    assert [m.seq for m in fresh.messages(1)] == [5]


def test_a_channel_is_its_users_alone(node):
    c, _ = authed(node, "mallory")
    for room in ("@alice", "@", "@mallory2"):
        err = c.join(room)
        assert isinstance(err, pb.Error) and err.reason == pb.ROOM_FORBIDDEN, (room, err)
    assert "that user's connections only" in err.message
    # already a member of its own channel: no second replay
    err = c.join("@mallory", req_id=4)
    assert isinstance(err, pb.Error) and err.reason == pb.ALREADY_JOINED
    # clients never chat in a channel
    c.chat("@mallory", b"hi", req_id=6)
    err = c.expect(FT.ERROR)
    assert (err.reason, err.req_id, err.room) == (pb.ROOM_FORBIDDEN, 6, "@mallory")
    # a token whose rooms claim names another user's channel still may not
    d = RawClient(node.host, node.port)
    assert isinstance(d.hello(token("eve", rooms=["@alice", "lobby"])), pb.AuthOk)
    assert d.join("@alice").reason == pb.ROOM_FORBIDDEN
    assert isinstance(d.join("lobby"), pb.Ack)
    # and a Hello resume point for it is refused the same way
    e = RawClient(node.host, node.port)
    e.send(FT.HELLO, pb.Hello(token=token("eve2"), resume=[pb.ResumePoint(room="@alice")]))
    assert e.expect(FT.AUTH_OK).channel == "@eve2"
    err = e.expect(FT.ERROR)
    assert (err.reason, err.req_id, err.room) == (pb.ROOM_FORBIDDEN, 0, "@alice")


def test_leaving_the_channel_stops_pushes_to_that_connection(node):
    a, _ = authed(node, "leaver", device_class="a")
    b, _ = authed(node, "leaver", device_class="b")
    a.send(FT.LEAVE, pb.Leave(req_id=3, room="@leaver"))
    assert a.expect(FT.ACK).req_id == 3
    push(node, "leaver", "only b")
    assert b.messages(1)[0].payload == b"only b"
    a.send(FT.PING, pb.Ping(nonce=1))
    assert a.expect(FT.PONG).nonce == 1          # no Batch came before it
    # and joining it again resumes it
    ack = a.join("@leaver", req_id=9, last_seq=0, epoch="")
    assert (ack.req_id, ack.room, ack.seq) == (9, "@leaver", 1)


def test_the_channel_does_not_count_against_the_room_limit(start_node):
    node = start_node("--max-rooms-per-conn", "2")
    c, ok = authed(node, "busy")
    assert ok.channel == "@busy"
    assert isinstance(c.join("r1", req_id=1), pb.Ack)
    assert isinstance(c.join("r2", req_id=2), pb.Ack)
    assert c.join("r3", req_id=3).reason == pb.TOO_MANY_ROOMS


def test_admin_push_forms_and_refusals(node):
    c, _ = authed(node, "bob")
    status, response = publish_pb(node, pb.Publish(user="bob", kind=pb.SYSTEM, payload=b"pb"))
    assert status == 200 and response.results[0].seq == 1
    # a batch mixing rooms and users, answered in order
    reply = api(node, "POST", "/v1/publish", {"messages": [
        {"user": "bob", "kind": "gift", "payload": "g"},
        {"room": "elsewhere", "kind": "chat", "payload": "c"},
        {"room": "@bob", "kind": "system", "payload": "by room name"},
        {"user": "bob", "kind": "system", "payload": "n"}]})
    assert reply.status == 200
    results = reply.json()["results"]
    assert results[:2] == [{"seq": 2}, {"seq": 1}] and results[3] == {"seq": 3}
    # a channel is pushed to by naming the user, never as a room: a service
    # passing on a room name its users chose cannot push to anyone
    assert results[2]["error"]["code"] == "BAD_REQUEST"
    assert "push to a user with 'user'" in results[2]["error"]["message"]
    assert [(m.seq, m.payload) for m in c.messages(3)] == [(1, b"pb"), (2, b"g"), (3, b"n")]
    for body, needle in [
            ({"user": "bob", "room": "x", "kind": "chat", "payload": "p"}, "not both"),
            ({"user": "", "kind": "chat", "payload": "p"}, "user is empty"),
            ({"user": "u" * 129, "kind": "chat", "payload": "p"}, "longer than 128"),
            ({"user": 7, "kind": "chat", "payload": "p"}, "'user' must be a string"),
            ({"room": "@", "kind": "chat", "payload": "p"}, "users' channels")]:
        reply = api(node, "POST", "/v1/publish", body)
        assert reply.status == 400 and needle in reply.error["message"], (body, reply.body)
    status, response = publish_pb(node, pb.Publish(user="bob", room="x", kind=pb.CHAT))
    assert status == 400 and "not both" in response.results[0].message
    # a user id of the longest length the tokens allow has a channel
    longest = "l" * 128
    d, ok = authed(node, longest)
    assert ok.channel == "@" + longest
    assert push(node, longest, "fits") == 1
    assert d.messages(1)[0].room == "@" + longest


def test_channels_are_not_rooms_in_the_lists_counts_or_presence(start_node):
    node = start_node("--presence-interval-ms", "200")
    c, _ = authed(node, "counted")
    assert isinstance(c.join("stage"), pb.Ack)
    push(node, "counted", "opens the channel")
    assert c.messages(1)[0].room == "@counted"
    listing = api(node, "GET", "/v1/rooms").json()
    assert [r["room"] for r in listing["rooms"]] == ["stage"]
    assert (listing["total"], listing["channels"]) == (1, 1)
    metrics = scrape(node)
    assert metrics[("fanout_rooms", ())] == 1
    assert metrics[("fanout_user_channels", ())] == 1
    # presence comes for the room, never for the channel
    deadline = time.monotonic() + 3
    rooms = set()
    while time.monotonic() < deadline:
        item = c.next(timeout=max(0.0, deadline - time.monotonic()))
        if item is not None and item[0] == FT.PRESENCE:
            rooms.add(item[1].room)
    assert rooms == {"stage"}
    # the channel's presence answers "how many connections has this user"
    info = api(node, "GET", "/v1/rooms/@counted/presence").json()
    assert (info["online"], info["users"]) == (1, ["counted"])
    # waiting connections (channel not open) count too
    others = [authed(node, "counted", device_class="second"), authed(node, "idle-user")]
    for user, online in (("counted", 2), ("idle-user", 1), ("nobody", 0)):
        info = api(node, "GET", f"/v1/rooms/@{user}/presence").json()
        assert info["online"] == online, (user, info)
    assert len(others) == 2


def test_user_channels_off(start_node):
    node = start_node("--user-channels", "0")
    c, ok = authed(node, "plain")
    assert ok.channel == "" and ok.channel_seq == 0
    err = c.join("@plain")
    assert err.reason == pb.ROOM_FORBIDDEN and "off on this node" in err.message
    reply = api(node, "POST", "/v1/publish", {"user": "plain", "kind": "chat", "payload": "p"})
    assert reply.status == 400 and "user channels are off" in reply.error["message"]
    assert scrape(node)[("fanout_user_channels", ())] == 0


# ---------------------------------------------------------------- the SDK


async def test_sdk_resumes_the_channel_across_cuts_without_loss_or_duplicates():
    async with local_app(ping_interval_ms=300, idle_timeout_ms=900) as app:
        node = app.node
        async with ImpairedLink(node.address[1]) as link:
            async with Client("127.0.0.1", link.port, token("sdk-user"), backoff_min=0.02,
                              backoff_max=0.1) as client:
                assert client.channel == "@sdk-user" and client.rooms == []
                assert client.cursor("@sdk-user") == ("", 0)
                await client.join("show")
                got: list[int] = []
                for i in range(1, 61):
                    await node.push("sdk-user", "gift", f"receipt {i}")
                    if i % 15 == 0:
                        # the connection dies mid-stream (once the client is
                        # back from the last cut, so each cut cuts something)
                        for _ in range(500):
                            if client.connected and link.conns:
                                break
                            await asyncio.sleep(0.01)
                        link.cut_all()
                    await asyncio.sleep(0.005)
                while len(got) < 60:
                    event = await client.next_event(timeout=10)
                    assert isinstance(event, pb.RoomMessage), event
                    assert event.room == "@sdk-user"
                    got.append(event.seq)
                assert got == list(range(1, 61))
                assert client.stats["gaps"] == 0
                assert link.cuts >= 4
                assert client.cursor("@sdk-user")[1] == 60
                # the Hello resumed the channel through its own fields, not as
                # a resume point (which the node would refuse as already joined)
                assert client.rooms == ["show"]


async def test_sdk_push_reaches_every_device_of_the_user():
    async with local_app() as app:
        node = app.node
        async with Client(*node.address, token("multi"), device_class="phone") as phone, \
                Client(*node.address, token("multi"), device_class="laptop") as laptop:
            seq = await node.push("multi", "system", "your gift was delivered")
            for client in (phone, laptop):
                event = await client.next_event(timeout=10)
                assert (event.room, event.seq, event.payload) == (
                    "@multi", seq, b"your gift was delivered")
        with pytest.raises(Rejected):
            await node.push("", "system", "x")


# ---------------------------------------------------------------- the cluster


async def test_pushes_reach_the_user_on_every_node_and_resume_on_another(cluster):
    cluster.start_nats()
    cluster.start_router()
    a, b, c = cluster.start_node(), cluster.start_node(), cluster.start_node()
    phone = Client(a.host, a.port, token("fan"), device_class="phone",
                   endpoints=[(b.host, b.port)], backoff_min=0.05, backoff_max=0.2)
    laptop = Client(b.host, b.port, token("fan"), device_class="laptop")
    await phone.connect()
    await laptop.connect()
    try:
        assert phone.channel == laptop.channel == "@fan"
        sent = 0
        for node in (a, b, a, b):                   # pushed on either node: one sequence
            status, body = admin(node, "POST", "/v1/publish",
                                 {"user": "fan", "kind": "gift", "payload": f"r{sent + 1}"})
            sent += 1
            assert (status, body) == (200, {"seq": sent})
        for client in (phone, laptop):
            assert [m.seq for m in await _channel_messages(client, sent)] == [1, 2, 3, 4]
        # A connection on a node where the channel is not open waits there;
        # a push through another node wakes it, and it gets that push alone.
        tv = Client(c.host, c.port, token("fan"), device_class="tv")
        await tv.connect()
        assert tv.cursor("@fan")[1] == 4
        status, body = admin(a, "POST", "/v1/publish",
                             {"user": "fan", "kind": "system", "payload": "to all three"})
        sent += 1
        assert (status, body) == (200, {"seq": sent})
        for client in (phone, laptop, tv):
            assert [m.payload for m in await _channel_messages(client, 1)] == [b"to all three"]
        await tv.close()
        # Node A goes away: the phone reconnects to B and resumes the channel
        # there from what the cluster stored, pushes made meanwhile included.
        a.stop()
        for _ in range(3):
            sent += 1
            status, body = admin(b, "POST", "/v1/publish",
                                 {"user": "fan", "kind": "system", "payload": f"r{sent}"})
            assert status == 200, body
        got = await _channel_messages(phone, 3)
        assert [(m.seq, m.payload) for m in got] == [(6, b"r6"), (7, b"r7"), (8, b"r8")]
        assert phone.stats["gaps"] == 0 and (phone.host, phone.port) == (b.host, b.port)
        assert [m.seq for m in await _channel_messages(laptop, 3)] == [6, 7, 8]
        status, body = admin(b, "GET", "/v1/rooms/@fan/history")
        assert status == 200 and [m["seq"] for m in body["messages"]] == list(range(1, 9))
    finally:
        await phone.close()
        await laptop.close()


async def _channel_messages(client: Client, count: int) -> list[pb.RoomMessage]:
    got = []
    while len(got) < count:
        event = await client.next_event(timeout=15)
        assert isinstance(event, pb.RoomMessage) and event.room == client.channel, event
        got.append(event)
    return got
