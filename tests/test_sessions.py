"""Session behaviour against a real node: heartbeats, logins, rate limits, resume."""

from __future__ import annotations

import time

from conftest import token
from fanout.protocol import fanout_pb2 as pb
from rawclient import FT, RawClient


def test_join_chat_ping_roundtrip(node):
    c = RawClient(node.host, node.port)
    ok = c.hello(token("alice"))
    assert ok.user == "alice" and ok.ping_interval_ms > 0
    ack = c.join("room-1")
    assert ack.room == "room-1" and ack.seq == 0 and ack.epoch
    c.chat("room-1", "héllo 🎁".encode(), req_id=7)
    chat_ack = c.expect(FT.ACK)
    assert (chat_ack.req_id, chat_ack.seq) == (7, 1)
    [msg] = c.messages(1)
    assert (msg.room, msg.seq, msg.kind, msg.sender) == ("room-1", 1, pb.CHAT, "alice")
    assert msg.payload == "héllo 🎁".encode()
    assert abs(msg.server_ts_ms / 1000 - time.time()) < 60
    c.send(FT.PING, pb.Ping(nonce=42))
    assert c.expect(FT.PONG).nonce == 42


def test_leave_stops_delivery(node):
    a, b = RawClient(node.host, node.port), RawClient(node.host, node.port)
    a.hello(token("a"))
    b.hello(token("b"))
    a.join("r")
    b.join("r")
    a.send(FT.LEAVE, pb.Leave(req_id=3, room="r"))
    assert a.expect(FT.ACK).req_id == 3
    b.chat("r", b"after leave")
    b.expect(FT.ACK)
    assert b.messages(1)[0].payload == b"after leave"
    a.send(FT.PING, pb.Ping(nonce=1))
    assert a.expect(FT.PONG).nonce == 1     # no Batch in between


def test_idle_connection_times_out(start_node):
    node = start_node("--ping-interval-ms", "200", "--idle-timeout-ms", "600")
    c = RawClient(node.host, node.port)
    c.hello(token("sleepy"))
    start = time.monotonic()
    frames = c.until_closed(timeout=10)
    kicks = [m for t, m in frames if t == FT.KICK]
    assert kicks and kicks[0].reason == pb.HEARTBEAT_TIMEOUT
    assert time.monotonic() - start >= 0.5


def test_pings_keep_connection_alive(start_node):
    node = start_node("--ping-interval-ms", "200", "--idle-timeout-ms", "600")
    c = RawClient(node.host, node.port)
    c.hello(token("awake"))
    for i in range(12):                 # 2.4 s, four idle timeouts long
        c.send(FT.PING, pb.Ping(nonce=i))
        assert c.expect(FT.PONG).nonce == i
        time.sleep(0.2)


def test_auth_timeout(start_node):
    node = start_node("--auth-timeout-ms", "300")
    c = RawClient(node.host, node.port)
    frames = c.until_closed(timeout=10)
    assert [m.reason for t, m in frames if t == FT.ERROR] == [pb.AUTH_TIMEOUT]


def test_second_login_kicks_the_first(node):
    first = RawClient(node.host, node.port)
    first.hello(token("zoe"), device_class="mobile")
    first.join("r")
    other_class = RawClient(node.host, node.port)
    other_class.hello(token("zoe"), device_class="web")
    second = RawClient(node.host, node.port)
    second.hello(token("zoe"), device_class="mobile")
    frames = first.until_closed()
    assert [m.reason for t, m in frames if t == FT.KICK] == [pb.DUPLICATE_LOGIN]
    for c in (other_class, second):
        c.send(FT.PING, pb.Ping(nonce=5))
        assert c.expect(FT.PONG).nonce == 5


def test_chat_rate_limit(start_node):
    node = start_node("--chat-rate", "1", "--chat-burst", "3")
    c = RawClient(node.host, node.port)
    c.hello(token("spammer"))
    c.join("r")
    for i in range(10):
        c.chat("r", b"spam", req_id=100 + i)
    replies = {}
    while len(replies) < 10:
        ftype, msg = c.next()
        if ftype in (FT.ACK, FT.ERROR):
            replies[msg.req_id] = msg
    acks = [r for r in replies.values() if isinstance(r, pb.Ack)]
    limited = [r for r in replies.values() if isinstance(r, pb.Error)]
    assert len(acks) == 3
    assert len(limited) == 7 and all(e.reason == pb.RATE_LIMITED for e in limited)
    c.send(FT.PING, pb.Ping(nonce=1))        # still connected
    while (item := c.next())[0] != FT.PONG:
        pass


def _publish(node, room: str, count: int, start: int = 0) -> None:
    pub = RawClient(node.host, node.port)
    pub.hello(token(f"pub-{room}-{start}"))
    pub.join(room)
    for i in range(count):
        pub.chat(room, f"m{start + i}".encode(), req_id=i + 1)
    acks = 0
    while acks < count:
        ftype, msg = pub.next()
        assert ftype != FT.ERROR, msg
        acks += ftype == FT.ACK
    pub.close()


def test_resume_without_gap(node):
    c = RawClient(node.host, node.port)
    c.hello(token("viewer"))
    ack = c.join("live")
    _publish(node, "live", 5)
    seen = c.messages(5)
    last = seen[-1].seq
    c.close()
    _publish(node, "live", 7, start=5)
    again = RawClient(node.host, node.port)
    again.hello(token("viewer"), resume=[pb.ResumePoint(room="live", last_seq=last, epoch=ack.epoch)])
    resumed = again.expect(FT.ACK)
    assert (resumed.req_id, resumed.seq, resumed.epoch) == (0, last, ack.epoch)
    replay = again.messages(7)
    assert [m.seq for m in replay] == list(range(last + 1, last + 8))
    assert [m.payload for m in replay] == [f"m{i}".encode() for i in range(5, 12)]


def test_resume_with_gap_gets_explicit_notice(start_node):
    node = start_node("--ring-size", "10", "--chat-rate", "1e6", "--chat-burst", "1e6")
    c = RawClient(node.host, node.port)
    c.hello(token("viewer"))
    ack = c.join("hot")
    _publish(node, "hot", 3)
    assert [m.seq for m in c.messages(3)] == [1, 2, 3]
    c.close()
    _publish(node, "hot", 30, start=3)             # seqs 4..33; ring keeps 24..33
    time.sleep(0.3)   # past max_delay: flushed. (Unflushed ones would arrive live.)
    again = RawClient(node.host, node.port)
    again.hello(token("viewer"))
    assert again.join("hot", last_seq=3, epoch=ack.epoch).seq == 3
    gap = again.expect(FT.GAP)
    assert (gap.room, gap.from_seq, gap.to_seq) == ("hot", 4, 23)
    assert [m.seq for m in again.messages(10)] == list(range(24, 34))


def test_resume_from_another_epoch_starts_over(node):
    _publish(node, "r", 4)
    c = RawClient(node.host, node.port)
    c.hello(token("viewer"))
    ack = c.join("r", last_seq=2, epoch="some-old-epoch")
    assert ack.seq == 0 and ack.epoch != "some-old-epoch"
    assert [m.seq for m in c.messages(4)] == [1, 2, 3, 4]
