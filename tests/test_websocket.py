"""The WebSocket transport (RFC 6455; pyx/core/websocket.pyx,
fanout/server/wsupgrade.py): the shared frame with its header written once,
masked input undone in C, the handshake's rules, control frames, close
codes, and the TCP rules applied unchanged. Real sockets only."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import API_KEY, token
from nodeprobe import metric
from rawclient import RawClient, WsRawClient, upgrade_request, ws_frame
from test_core import MAX, Owner, drain, make_pair, record
from fanout import _core
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol import wire
from fanout.server import wsupgrade

FT = wire.FrameType


# ---------------------------------------------------------------- the core kind

def make_ws(loop, **limits):
    """(WsConnection past its handshake, client socket)."""
    node_side, client_side = socket.socketpair()
    node_side.setblocking(False)
    conn = _core.WsConnection(node_side.detach(), loop, **limits)
    conn.owner = Owner()
    client_side.sendall(upgrade_request())
    items = conn.read()
    assert items[0][0] == _core.UPGRADE_REQUEST
    assert conn.accept_upgrade(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    client_side.setblocking(True)
    assert client_side.recv(100).startswith(b"HTTP/1.1 101")
    client_side.setblocking(False)
    return conn, client_side


def split_ws(stream: bytes) -> list[tuple[int, bytes]]:
    """Server frames (opcode, payload) of a byte stream; unmasked, unfragmented."""
    out = []
    while stream:
        assert stream[0] & 0x80 and not stream[1] & 0x80
        n, pos = stream[1] & 0x7F, 2
        if n == 126:
            n, pos = int.from_bytes(stream[2:4], "big"), 4
        elif n == 127:
            n, pos = int.from_bytes(stream[2:10], "big"), 10
        out.append((stream[0] & 0x0F, stream[pos:pos + n]))
        stream = stream[pos + n:]
    return out


async def test_websocket_members_share_the_tcp_members_frame():
    """One frame object for TCP and WebSocket members of a room: the
    WebSocket header is written once into its headroom (no copy per
    recipient), TCP members never see it, every length form is right."""
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop)
    room = hub.room("r", "e", 0)
    tcp = [make_pair(loop) for _ in range(2)]
    ws = [make_ws(loop) for _ in range(3)]
    for conn, _ in tcp + ws:
        room.add(conn)
    copies = _core.prefix_copies()
    # payload sizes giving wire frames under 126 bytes, up to 64 KiB, over it
    sizes = [10, 1000, 70_000]
    for seq, size in enumerate(sizes, 1):
        hub.publish("r", "e", seq, _core.encode_room_message("r", seq, 1, 0, "s",
                                                             os.urandom(size), 0))
        hub.flush()
    plain = [await drain(peer, sum(sizes)) for _, peer in tcp]
    framed = [await drain(peer, sum(sizes)) for _, peer in ws]
    assert len(set(plain)) == 1 and len(set(framed)) == 1
    frames, used = _core.parse_frames(plain[0], 1 << 20)
    assert used == len(plain[0]) and len(frames) == 3
    messages = split_ws(framed[0])
    assert [op for op, _ in messages] == [0x2] * 3
    assert b"".join(p for _, p in messages) == plain[0]     # one wire frame per message
    assert _core.prefix_copies() == copies
    for conn, _ in tcp + ws:
        conn.close()


async def test_masked_fragmented_input_with_a_ping_between():
    loop = asyncio.get_running_loop()
    conn, peer = make_ws(loop)
    hello = wire.encode_frame(FT.HELLO, pb.Hello(token="t" * 300))
    ping = wire.encode_frame(FT.PING, pb.Ping(nonce=7))
    data = (ws_frame(0x2, hello[:100], fin=False) + ws_frame(0x9, b"hb")
            + ws_frame(0x0, hello[100:200], fin=False) + ws_frame(0x0, hello[200:])
            + ws_frame(0x2, ping + ping))                # two frames in one message
    frames = []
    for i in range(0, len(data), 7):                     # any split of the stream
        peer.sendall(data[i:i + 7])
        await asyncio.sleep(0)
        frames += conn.read()
    assert [f[0] for f in frames] == [FT.HELLO, FT.PING, FT.PING]
    assert pb.Hello.FromString(frames[0][2]).token == "t" * 300
    assert split_ws(await drain(peer, 4)) == [(0xA, b"hb")]
    assert conn.pings_answered == 1 and conn.read_error is None
    conn.close()


@pytest.mark.parametrize("data, reason", [
    (ws_frame(0x2, b"\x01\x05\0\0\0\0\0\0", mask=False), pb.BAD_FRAME),      # unmasked
    (ws_frame(0x1, b"hello"), pb.BAD_REQUEST),                               # text
    (ws_frame(0x2, b"x", rsv=4), pb.BAD_FRAME),                              # RSV bit
    (ws_frame(0x3, b""), pb.BAD_FRAME),                                      # opcode
    (ws_frame(0x0, b"x"), pb.BAD_FRAME),                                     # stray continuation
    (ws_frame(0x2, b"a", fin=False) + ws_frame(0x2, b"b"), pb.BAD_FRAME),    # nested message
    (ws_frame(0x9, b"p", fin=False), pb.BAD_FRAME),                          # fragmented ping
    (ws_frame(0x2, b"\x01\x05\0\0\0\0\0\x09"), pb.BAD_FRAME),                # frame spans messages
    (ws_frame(0x2, b"", length=1 << 40)[:14], pb.FRAME_TOO_LARGE),           # header alone
])
async def test_bad_websocket_input_is_refused_with_a_reason(data, reason):
    loop = asyncio.get_running_loop()
    conn, peer = make_ws(loop, max_frame=4096)
    peer.sendall(data)
    for _ in range(100):
        await asyncio.sleep(0.001)
        conn.read()
        if conn.read_error is not None:
            break
    assert conn.read_error is not None and conn.read_error.reason == reason
    assert conn.carry_capacity == 0          # nothing of a refused payload was kept
    conn.close()


async def test_message_limit_is_checked_before_the_payload():
    loop = asyncio.get_running_loop()
    conn, peer = make_ws(loop, max_frame=1000)
    ok = wire.encode_frame(FT.CHAT, pb.Chat(payload=b"x" * 900))
    peer.sendall(ws_frame(0x2, ok))
    await asyncio.sleep(0.01)
    assert len(conn.read()) == 1
    # fragments: the limit is on the whole message
    peer.sendall(ws_frame(0x2, b"\0" * 600, fin=False) + ws_frame(0x0, b"", length=600)[:8])
    await asyncio.sleep(0.01)
    conn.read()
    assert conn.read_error.reason == pb.FRAME_TOO_LARGE
    conn.close()


async def test_close_after_ends_with_a_close_carrying_the_reason():
    loop = asyncio.get_running_loop()
    conn, peer = make_ws(loop)
    kick = _core.core_frame(FT.KICK, pb.Kick(reason=pb.SLOW_CONSUMER).SerializeToString())
    conn.close_after(kick, reason=pb.SLOW_CONSUMER)
    got = split_ws(await drain(peer, len(_core.wire_bytes(kick)) + 6))
    assert got[0] == (0x2, _core.wire_bytes(kick))
    assert got[1][0] == 0x8
    assert int.from_bytes(got[1][1][:2], "big") == 4000 + pb.SLOW_CONSUMER
    assert got[1][1][2:] == b"SLOW_CONSUMER"
    assert wsupgrade and _core.close_code(0) == 1000
    conn.close()


async def test_client_close_is_answered_and_reads_as_eof():
    loop = asyncio.get_running_loop()
    conn, peer = make_ws(loop)
    peer.sendall(ws_frame(0x8, (1001).to_bytes(2, "big") + b"bye") + ws_frame(0x2, b"junk"))
    await asyncio.sleep(0.01)
    assert conn.read() == [] and conn.eof and conn.read_error is None
    assert conn.close_code == 1001
    assert split_ws(await drain(peer, 4)) == [(0x8, (1001).to_bytes(2, "big"))]
    conn.close()


async def test_request_head_split_over_reads_and_its_bound():
    loop = asyncio.get_running_loop()
    node_side, peer = socket.socketpair()
    conn = _core.WsConnection(node_side.detach(), loop)
    head = upgrade_request()
    req = head + ws_frame(0x2, wire.encode_frame(FT.PING, pb.Ping()))
    items = []
    for i in range(len(req)):                       # a byte at a time
        peer.sendall(req[i:i + 1])
        await asyncio.sleep(0)
        items += conn.read()
    assert [t for t, _, _ in items] == [_core.UPGRADE_REQUEST, FT.PING]
    assert items[0][2] == head
    conn.close()
    node_side, peer = socket.socketpair()
    conn = _core.WsConnection(node_side.detach(), loop)
    peer.sendall(b"GET /ws HTTP/1.1\r\nX: " + b"a" * 9000)
    await asyncio.sleep(0.01)
    conn.read()
    conn.read()
    assert conn.read_error is not None and conn.read_error.reason == pb.BAD_REQUEST
    conn.close()


# ---------------------------------------------------------------- the handshake

@pytest.mark.parametrize("request_, status", [
    (upgrade_request("/nope"), 404),
    (upgrade_request(version="8"), 426),
    (upgrade_request(key="c2hvcnQ="), 400),
    (b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", 426),
    (b"POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
    (b"GET /ws HTTP/1.0\r\nUpgrade: websocket\r\n\r\n", 400),
    (b"GARBAGE\r\n\r\n", 400),
    (upgrade_request(extra="Sec-WebSocket-Protocol: chat\r\n"), 400),
    (upgrade_request(extra="Origin: https://evil.example\r\n"), 403),
])
def test_handshake_refusals(request_, status):
    with pytest.raises(wsupgrade.Refused) as exc:
        wsupgrade.check(request_, path="/ws", origins=frozenset({"https://live.example"}))
    assert exc.value.status == status
    assert exc.value.response().startswith(f"HTTP/1.1 {status} ".encode())


def test_handshake_accepts_rfc_example_and_subprotocol():
    head = upgrade_request("/ws?x=1", key="dGhlIHNhbXBsZSBub25jZQ==",
                           extra="Origin: https://Live.example/\r\n"
                                 "Sec-WebSocket-Protocol: chat, fanout.v1\r\n"
                                 "Sec-WebSocket-Extensions: permessage-deflate\r\n")
    reply = wsupgrade.check(head, path="/ws", origins=frozenset({"https://live.example"}))
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in reply   # RFC 6455 1.3
    assert b"Sec-WebSocket-Protocol: fanout.v1\r\n" in reply
    assert b"Extensions" not in reply                  # never permessage-deflate


# ---------------------------------------------------------------- a real node

def publish(node, room: str, kind: str, payload: str) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{node.admin_port}/v1/publish",
        data=json.dumps({"room": room, "kind": kind, "payload": payload}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)["seq"]


def test_browser_and_tcp_viewers_get_the_same_messages(node):
    ws = WsRawClient("127.0.0.1", node.ws_port)
    tcp = RawClient("127.0.0.1", node.port)
    for client, user in ((ws, "web"), (tcp, "app")):
        assert isinstance(client.hello(token(user)), pb.AuthOk)
        assert isinstance(client.join("live"), pb.Ack)
    publish(node, "live", "gift", "rocket")
    ws.chat("live", b"hi from the browser")
    got = [[(m.kind, m.payload) for m in c.messages(2)] for c in (ws, tcp)]
    assert got[0] == got[1] == [(pb.GIFT, b"rocket"), (pb.CHAT, b"hi from the browser")]
    ws.send(FT.PING, pb.Ping(nonce=1))
    assert ws.expect(FT.PONG, FT.PRESENCE)
    assert metric(node, "fanout_websocket_connections") == 1
    assert metric(node, "fanout_connections") == 2
    ws.close()
    tcp.close()
    deadline = time.monotonic() + 5
    while metric(node, "fanout_websocket_connections") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metric(node, "fanout_websocket_connections") == 0
    assert metric(node, "fanout_websocket_upgrades_total") == 1


def test_bad_input_closes_with_error_then_close_code(node):
    ws = WsRawClient("127.0.0.1", node.ws_port)
    ws.sock.sendall(ws_frame(0x1, b"text"))
    frames = ws.until_closed()
    assert [(t, m.reason) for t, m in frames] == [(FT.ERROR, pb.BAD_REQUEST)]
    assert ws.close_code == 4000 + pb.BAD_REQUEST
    # the node keeps serving
    again = WsRawClient("127.0.0.1", node.ws_port)
    assert isinstance(again.hello(token("bob")), pb.AuthOk)
    again.close()


def test_refused_token_and_refused_upgrade(start_node):
    node = start_node("--ws-origins", "https://live.example")
    ws = WsRawClient("127.0.0.1", node.ws_port, headers="Origin: https://live.example\r\n")
    err = ws.hello("not-a-token")
    assert isinstance(err, pb.Error) and err.reason == pb.AUTH_INVALID
    ws.until_closed()
    assert ws.close_code == 4000 + pb.AUTH_INVALID
    evil = WsRawClient("127.0.0.1", node.ws_port, upgrade=False)
    reply = evil.handshake(headers="Origin: https://evil.example\r\n")
    assert reply.startswith(b"HTTP/1.1 403 ") and b"ws_origins" in reply


def test_handshake_deadline_answers_in_http(start_node):
    node = start_node("--auth-timeout-ms", "300")
    s = socket.create_connection(("127.0.0.1", node.ws_port), timeout=5)
    s.sendall(b"GET /ws HTTP/1.1\r\n")               # and nothing more
    reply = b""
    while chunk := s.recv(4096):
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 408 ") and b"AUTH_TIMEOUT" in reply


def test_slow_websocket_consumer_is_cut(start_node):
    node = start_node("--max-backlog-bytes", "65536", "--sndbuf-bytes", "4096",
                      "--max-publish-bytes", "60000")
    ws = WsRawClient("127.0.0.1", node.ws_port, rcvbuf=4096)
    assert isinstance(ws.hello(token("slow")), pb.AuthOk)
    assert isinstance(ws.join("r"), pb.Ack)
    for _ in range(60):                               # the client reads nothing
        publish(node, "r", "gift", os.urandom(25_000).hex())     # lz4 cannot shrink it
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "cut as slow consumer" not in node.log():
        time.sleep(0.05)
    assert "cut as slow consumer" in node.log()
    ws.close()


def test_websocket_port_off(start_node):
    node = start_node("--ws-port", "-1")
    assert node.ws_port is None


async def test_writer_threads_write_websocket_members_the_same_frame():
    """A room flushed by the writer threads (rounds.pxd): WebSocket members
    and TCP members, each gets every message once, in order, each WebSocket
    message one wire frame, with no private copy."""
    loop = asyncio.get_running_loop()
    hub = _core.Hub(loop, max_delay=0.0, write_threads=1, thread_min_members=1)
    try:
        room = hub.room("r", "e", 0)
        tcp = [make_pair(loop) for _ in range(20)]
        ws = [make_ws(loop) for _ in range(20)]
        for conn, _ in tcp + ws:
            room.add(conn)
        copies = _core.prefix_copies()
        for seq in range(1, 41):
            hub.publish("r", "e", seq, record("r", seq))
            hub.flush("r")
            if seq % 8 == 0:
                await asyncio.sleep(0)
        hub.settle()
        assert hub.rounds > 0
        plain = {await drain(peer, 1) for _, peer in tcp}
        assert len(plain) == 1
        for _, peer in ws:
            stream = b""
            for _ in range(200):
                stream += await drain(peer, 1, loop_rounds=1)
                messages = split_ws(stream) if stream else []
                if b"".join(p for _, p in messages) == next(iter(plain)):
                    break
            frames = [_core.parse_frames(p, MAX)[0] for _, p in messages]
            assert all(len(f) == 1 for f in frames)
            seqs = [m.seq for [(_, _, body)] in frames for m in pb.Batch.FromString(body).messages]
            assert seqs == list(range(1, 41))
        assert _core.prefix_copies() == copies
        for conn, _ in tcp + ws:
            conn.close()
    finally:
        hub.close()


def test_refused_at_connect_a_browser_reads_http(start_node):
    node = start_node(env={"FANOUT_MAX_CONNS_PER_IP": "1", "FANOUT_MAX_UNAUTHENTICATED_PER_IP": "1"})
    first = WsRawClient("127.0.0.1", node.ws_port)
    s = socket.socket()
    s.settimeout(5)
    reply = b""
    try:
        s.connect(("127.0.0.1", node.ws_port))
    except ConnectionResetError:
        pass            # on loopback the RST can beat connect(); what came first is readable
    try:
        while chunk := s.recv(4096):
            reply += chunk
    except ConnectionResetError:
        pass
    assert reply.startswith(b"HTTP/1.1 429 ") and b"ADDRESS_LIMIT" in reply
    first.close()


WS_VECTORS = json.loads((Path(__file__).parent / "vectors" / "frames.json").read_text())["websocket"]


@pytest.mark.parametrize("vector", WS_VECTORS["server_headers"], ids=lambda v: str(v["frame_length"]))
async def test_core_writes_the_vector_headers(vector):
    loop = asyncio.get_running_loop()
    conn, peer = make_ws(loop, max_backlog_bytes=1 << 22)
    n = vector["frame_length"]
    frame = _core.core_frame(FT.BATCH, os.urandom(n - 8))      # uncompressed: random
    assert len(_core.wire_bytes(frame)) == n
    conn.send(frame)
    header = bytes.fromhex(vector["header_hex"])
    got = await drain(peer, len(header) + n)
    assert got[:len(header)] == header and got[len(header):] == _core.wire_bytes(frame)
    conn.close()


async def test_core_reads_the_vector_client_message_and_writes_the_close():
    loop = asyncio.get_running_loop()
    conn, peer = make_ws(loop)
    client = WS_VECTORS["client_message"]
    peer.sendall(bytes.fromhex(client["message_hex"]))
    await asyncio.sleep(0.01)
    [(ftype, flags, body)] = conn.read()
    assert wire.encode_frame(ftype, pb.Ping.FromString(body)) == bytes.fromhex(client["frame_hex"])
    close = WS_VECTORS["close"]
    err = _core.core_frame(FT.ERROR, pb.Error(reason=pb.AUTH_INVALID).SerializeToString())
    conn.close_after(err, reason=pb.Reason.Value(close["reason"]))
    got = await drain(peer, 100)
    assert got.endswith(bytes.fromhex(close["message_hex"]))
    conn.close()


def test_request_budget_and_idle_timeout_apply_over_websocket(start_node):
    node = start_node("--request-rate", "10", "--request-burst", "20",
                      "--ping-interval-ms", "200", "--idle-timeout-ms", "600")
    ws = WsRawClient("127.0.0.1", node.ws_port)
    assert isinstance(ws.hello(token("flood")), pb.AuthOk)
    ping = wire.encode_frame(FT.PING, pb.Ping(nonce=1))
    ws.sock.sendall(ws_frame(0x2, ping * 100))          # 100 requests in one message
    frames = ws.until_closed()
    assert frames[-1][0] == FT.ERROR and frames[-1][1].reason == pb.TOO_MANY_REQUESTS
    assert ws.close_code == 4000 + pb.TOO_MANY_REQUESTS
    idle = WsRawClient("127.0.0.1", node.ws_port)
    assert isinstance(idle.hello(token("idle")), pb.AuthOk)
    frames = idle.until_closed(timeout=5)                 # says nothing more
    assert frames[-1][0] == FT.KICK and frames[-1][1].reason == pb.HEARTBEAT_TIMEOUT
    assert idle.close_code == 4000 + pb.HEARTBEAT_TIMEOUT


async def test_a_ping_flood_buys_one_pong_a_second_and_tiny_fragments_add_up():
    loop = asyncio.get_running_loop()
    conn, peer = make_ws(loop)
    peer.sendall(ws_frame(0x9, b"p") * 5000)             # 30 KB of pings
    for _ in range(20):
        await asyncio.sleep(0.001)
        conn.read()
    assert conn.pings_answered == 1 and conn.read_error is None
    assert split_ws(await drain(peer, 3)) == [(0xA, b"p")]
    # a Hello in one-byte fragments: one frame, as if sent whole
    hello = wire.encode_frame(FT.HELLO, pb.Hello(token="x" * 2000))
    data = b"".join(ws_frame(0x2 if i == 0 else 0x0, hello[i:i + 1], fin=i == len(hello) - 1)
                    for i in range(len(hello)))
    peer.sendall(data)
    frames = []
    for _ in range(50):
        await asyncio.sleep(0.001)
        frames += conn.read()
        if frames:
            break
    assert [f[0] for f in frames] == [FT.HELLO]
    assert pb.Hello.FromString(frames[0][2]).token == "x" * 2000
    conn.close()
