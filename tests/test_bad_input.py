"""Bad input gets its reason code and a close, and hurts nobody else."""

from __future__ import annotations

import struct

import lz4.block
import pytest

from conftest import token
from fanout.protocol import wire
from fanout.protocol import fanout_pb2 as pb
from rawclient import FT, RawClient


def header(ftype: int, length: int, *, version: int = 1, flags: int = 0, reserved: int = 0) -> bytes:
    return struct.pack(">BBBBI", version, ftype, flags, reserved, length)


def closes_with(client: RawClient, reason: int) -> pb.Error:
    frames = client.until_closed()
    errors = [m for t, m in frames if t == FT.ERROR]
    assert errors, f"no Error frame before close; got {frames}"
    assert errors[-1].reason == reason, pb.Reason.Name(errors[-1].reason)
    return errors[-1]


@pytest.fixture
def bystander(node):
    """An authenticated member of room 'calm' that must keep working."""
    c = RawClient(node.host, node.port)
    assert isinstance(c.hello(token("bystander")), pb.AuthOk)
    c.join("calm")
    yield c
    # Everything it was sent while others misbehaved, then one more message.
    talker = RawClient(node.host, node.port)
    talker.hello(token("talker"))
    talker.join("calm")
    talker.chat("calm", b"still here")
    got = c.messages(1)
    assert got[0].payload == b"still here"
    talker.close()
    c.close()


@pytest.mark.parametrize("make_token,reason", [
    (lambda: token("mallory", secret="not-the-node-secret-but-long-enough-0123"), pb.AUTH_INVALID),
    (lambda: token("late", ttl=-60), pb.AUTH_EXPIRED),
    (lambda: "", pb.AUTH_MISSING),
    (lambda: "not.a.jwt", pb.AUTH_INVALID),
])
def test_bad_auth_is_refused_and_closed(node, bystander, make_token, reason):
    c = RawClient(node.host, node.port)
    c.send(FT.HELLO, pb.Hello(token=make_token(), device_id="x"))
    closes_with(c, reason)


BAD_FRAMES = {
    "oversize length": (header(FT.HELLO, 10_000_000), pb.FRAME_TOO_LARGE),
    "bad version": (header(FT.HELLO, 0, version=2), pb.UNSUPPORTED_VERSION),
    "reserved flag bits": (header(FT.HELLO, 0, flags=0x80), pb.BAD_FRAME),
    "reserved byte": (header(FT.HELLO, 0, reserved=1), pb.BAD_FRAME),
    "garbage protobuf": (header(FT.HELLO, 4) + b"\xff\xff\xff\xff", pb.BAD_PROTOBUF),
    "server frame type": (header(FT.BATCH, 0), pb.UNKNOWN_FRAME_TYPE),
    "unknown frame type": (header(0x7E, 0), pb.UNKNOWN_FRAME_TYPE),
    "corrupt lz4": (header(FT.HELLO, 8, flags=1) + struct.pack("<I", 100) + b"\xff" * 4,
                    pb.BAD_COMPRESSION),
    "lz4 bomb": (header(FT.HELLO, 4 + 10, flags=1) + struct.pack("<I", 1 << 30) + b"\x00" * 10,
                 pb.BAD_COMPRESSION),
    "chat before hello": (wire.encode_frame(FT.CHAT, pb.Chat(room="calm", payload=b"x")),
                          pb.AUTH_REQUIRED),
    "dictionary flag without lz4": (header(FT.HELLO, 0, flags=wire.FLAG_DICT), pb.BAD_FRAME),
    "unknown dictionary": (header(FT.HELLO, 9, flags=3) + struct.pack("<IB", 20, 77) + b"\0" * 4,
                           pb.BAD_COMPRESSION),
    "dictionary body without its id": (header(FT.HELLO, 4, flags=3) + struct.pack("<I", 20),
                                       pb.BAD_COMPRESSION),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_malformed_frames_close_only_the_sender(node, bystander, name):
    data, reason = BAD_FRAMES[name]
    c = RawClient(node.host, node.port)
    c.send_raw(data)
    closes_with(c, reason)


def test_malformed_frame_after_auth(node, bystander):
    c = RawClient(node.host, node.port)
    c.hello(token("bob"))
    c.join("calm")
    c.send_raw(header(FT.JOIN, 3) + b"\x12\x05a")    # length-delimited field cut short
    closes_with(c, pb.BAD_PROTOBUF)


def test_second_hello_is_refused(node, bystander):
    c = RawClient(node.host, node.port)
    c.hello(token("carol"))
    c.send(FT.HELLO, pb.Hello(token=token("carol")))
    closes_with(c, pb.ALREADY_AUTHENTICATED)


def test_compressed_client_frames_are_accepted(node):
    c = RawClient(node.host, node.port)
    hello = pb.Hello(token=token("dave"), device_id="d" * 600).SerializeToString()
    packed = lz4.block.compress(hello, store_size=True)
    c.send_raw(header(FT.HELLO, len(packed), flags=1) + packed)
    assert isinstance(c.expect(FT.AUTH_OK), pb.AuthOk)


def test_client_frames_with_the_dictionary_are_accepted(node):
    c = RawClient(node.host, node.port)
    frame = wire.encode_frame(FT.HELLO, pb.Hello(token=token("dora"), device_id="d" * 300),
                              dict_id=1)
    assert frame[2] == wire.FLAG_LZ4 | wire.FLAG_DICT
    c.send_raw(frame)
    auth = c.expect(FT.AUTH_OK)
    assert isinstance(auth, pb.AuthOk) and auth.compress_dict == 1


def test_frame_split_across_writes(node):
    c = RawClient(node.host, node.port)
    frame = wire.encode_frame(FT.HELLO, pb.Hello(token=token("erin")))
    for i in range(len(frame)):
        c.send_raw(frame[i:i + 1])
    assert isinstance(c.expect(FT.AUTH_OK), pb.AuthOk)


@pytest.mark.parametrize("request_msg,reason", [
    (lambda: (FT.JOIN, pb.Join(req_id=5, room="")), pb.BAD_REQUEST),
    (lambda: (FT.JOIN, pb.Join(req_id=5, room="x" * 200)), pb.BAD_REQUEST),
    (lambda: (FT.LEAVE, pb.Leave(req_id=5, room="never-joined")), pb.NOT_A_MEMBER),
    (lambda: (FT.CHAT, pb.Chat(req_id=5, room="never-joined", payload=b"hi")), pb.NOT_A_MEMBER),
])
def test_bad_requests_keep_the_connection(node, request_msg, reason):
    c = RawClient(node.host, node.port)
    c.hello(token("frank"))
    ftype, msg = request_msg()
    c.send(ftype, msg)
    err = c.expect(FT.ERROR)
    assert (err.reason, err.req_id) == (reason, 5)
    c.send(FT.PING, pb.Ping(nonce=9))
    assert c.expect(FT.PONG).nonce == 9


def test_room_forbidden_by_token(node):
    c = RawClient(node.host, node.port)
    c.hello(token("gina", rooms=["lobby"]))
    assert isinstance(c.join("lobby"), pb.Ack)
    err = c.join("vip", req_id=2)
    assert err.reason == pb.ROOM_FORBIDDEN and err.req_id == 2


def test_too_many_rooms(start_node):
    node = start_node("--max-rooms-per-conn", "2")
    c = RawClient(node.host, node.port)
    c.hello(token("hank"))
    assert isinstance(c.join("a", 1), pb.Ack)
    assert isinstance(c.join("b", 2), pb.Ack)
    assert c.join("c", 3).reason == pb.TOO_MANY_ROOMS
    again = c.join("a", 4)                      # a joined room is not joined again
    assert (again.reason, again.req_id, again.room) == (pb.ALREADY_JOINED, 4, "a")


def test_chat_too_large(start_node):
    node = start_node("--max-chat-bytes", "16")
    c = RawClient(node.host, node.port)
    c.hello(token("ivy"))
    c.join("r")
    c.chat("r", b"x" * 17, req_id=3)
    err = c.expect(FT.ERROR)
    assert err.reason == pb.MESSAGE_TOO_LARGE and err.req_id == 3
