"""Unit tests of the client SDK's frame handling and cursor algorithm.

Decoded frames are fed straight into the client's handler, without a
network: these tests pin down the "no silent loss" bookkeeping
(docs/protocol.md, "Cursor algorithm"). End-to-end tests against a real node
live elsewhere. Async tests run under pytest-asyncio (asyncio_mode = auto):
the request futures need a running loop.
"""

from __future__ import annotations

import asyncio
import types

import pytest

from fanout.protocol import wire
from fanout.client import (
    AuthError,
    Client,
    ConnectionLostError,
    KickedError,
    RequestError,
)
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol.wire import FrameType

ROOM = "live:42"


def deliver(client: Client, ftype: FrameType, msg) -> object:
    """Hand one frame body to the client, as its read loop would."""
    return client._dispatch(ftype, msg.SerializeToString())


def authenticated() -> Client:
    client = Client("127.0.0.1", 9, "token")
    assert deliver(client, FrameType.AUTH_OK, pb.AuthOk(user="u1", ping_interval_ms=1000)) is None
    return client


def join(client: Client, room: str = ROOM, *, seq: int, epoch: str = "e1") -> pb.Ack:
    """Simulate a join request answered by the node's Ack."""
    req = pb.Join(room=room)
    future = client._register(FrameType.JOIN, req)
    deliver(client, FrameType.ACK, pb.Ack(req_id=req.req_id, room=room, seq=seq, epoch=epoch))
    return future.result()


def msg(seq: int, room: str = ROOM, kind: int = pb.CHAT) -> pb.RoomMessage:
    return pb.RoomMessage(room=room, seq=seq, kind=kind, sender="u9", payload=b"x%d" % seq)


def batch(*msgs: pb.RoomMessage) -> pb.Batch:
    return pb.Batch(messages=msgs)


def events(client: Client) -> list:
    out = []
    while not client._events.empty():
        out.append(client._events.get_nowait())
    return out


def summary(evs) -> list:
    """Events as compact tuples: ("m", room, seq) or ("gap", room, from, to)."""
    return [
        (
            ("m", e.room, e.seq)
            if isinstance(e, pb.RoomMessage)
            else ("gap", e.room, e.from_seq, e.to_seq)
        )
        for e in evs
    ]


# ------------------------------------------------------------------ join and live delivery


async def test_join_ack_sets_cursor_and_in_order_messages_are_yielded():
    client = authenticated()
    ack = join(client, seq=100, epoch="e7")
    assert (ack.seq, ack.epoch) == (100, "e7")
    assert client.cursor(ROOM) == ("e7", 100)
    deliver(client, FrameType.BATCH, batch(msg(101), msg(102, kind=pb.GIFT), msg(103)))
    assert summary(events(client)) == [("m", ROOM, 101), ("m", ROOM, 102), ("m", ROOM, 103)]
    assert client.cursor(ROOM) == ("e7", 103)
    assert client.stats["messages"] == 3 and client.stats["gaps"] == 0


async def test_duplicates_are_dropped_silently():
    client = authenticated()
    join(client, seq=10)
    deliver(client, FrameType.BATCH, batch(msg(9), msg(10), msg(11)))
    deliver(client, FrameType.BATCH, batch(msg(11), msg(12)))
    assert summary(events(client)) == [("m", ROOM, 11), ("m", ROOM, 12)]
    assert client.stats["duplicates"] == 3
    assert client.cursor(ROOM) == ("e1", 12)


async def test_unannounced_hole_yields_synthesized_gap_first(caplog):
    client = authenticated()
    join(client, seq=5, epoch="e2")
    deliver(client, FrameType.BATCH, batch(msg(6), msg(9), msg(10)))
    evs = events(client)
    assert summary(evs) == [("m", ROOM, 6), ("gap", ROOM, 7, 8), ("m", ROOM, 9), ("m", ROOM, 10)]
    assert evs[1].epoch == "e2"
    assert client.stats["gaps"] == 1
    assert "missing without a Gap" in caplog.text


async def test_messages_of_rooms_not_joined_are_dropped():
    client = authenticated()
    join(client, seq=0)
    deliver(client, FrameType.BATCH, batch(msg(1, room="other"), msg(1), msg(2, room="other")))
    deliver(client, FrameType.GAP, pb.Gap(room="other", from_seq=3, to_seq=9))
    assert summary(events(client)) == [("m", ROOM, 1)]
    assert client.cursor("other") is None
    assert client.rooms == [ROOM]


async def test_rooms_are_tracked_independently_within_one_batch():
    client = authenticated()
    join(client, "a", seq=0)
    join(client, "b", seq=50)
    deliver(
        client,
        FrameType.BATCH,
        batch(msg(1, "a"), msg(51, "b"), msg(2, "a"), msg(53, "b"), msg(51, "b")),
    )
    assert summary(events(client)) == [
        ("m", "a", 1),
        ("m", "b", 51),
        ("m", "a", 2),
        ("gap", "b", 52, 52),
        ("m", "b", 53),
    ]
    assert client.cursor("a") == ("e1", 2) and client.cursor("b") == ("e1", 53)


# ------------------------------------------------------------------ gaps


async def test_server_gap_is_yielded_and_advances_cursor():
    client = authenticated()
    join(client, seq=10)
    deliver(client, FrameType.GAP, pb.Gap(room=ROOM, from_seq=11, to_seq=40, epoch="e1"))
    deliver(client, FrameType.BATCH, batch(msg(40), msg(41)))
    assert summary(events(client)) == [("gap", ROOM, 11, 40), ("m", ROOM, 41)]
    assert client.cursor(ROOM) == ("e1", 41)
    assert client.stats["gaps"] == 1 and client.stats["duplicates"] == 1


async def test_stale_gap_is_ignored_and_misaligned_gap_is_realigned():
    client = authenticated()
    join(client, seq=10)
    deliver(
        client, FrameType.GAP, pb.Gap(room=ROOM, from_seq=3, to_seq=10)
    )  # already accounted for
    assert events(client) == []
    deliver(client, FrameType.GAP, pb.Gap(room=ROOM, from_seq=5, to_seq=20))  # overlaps the cursor
    deliver(client, FrameType.GAP, pb.Gap(room=ROOM, from_seq=25, to_seq=30))  # leaves 21..24 out
    assert summary(events(client)) == [("gap", ROOM, 11, 20), ("gap", ROOM, 21, 30)]
    assert client.cursor(ROOM) == ("e1", 30)


# ------------------------------------------------------------------ resume


async def test_hello_carries_resume_points_and_resume_acks_match_by_room():
    client = authenticated()
    join(client, "a", seq=7, epoch="ea")
    join(client, "b", seq=0, epoch="eb")
    deliver(client, FrameType.BATCH, batch(msg(8, "a"), msg(9, "a")))
    events(client)
    hello = client._hello()
    assert (
        hello.token == "token" and hello.client == "fanout-py" and hello.device_class == "default"
    )
    assert [(r.room, r.last_seq, r.epoch) for r in hello.resume] == [("a", 9, "ea"), ("b", 0, "eb")]

    # Reconnected: "a" resumes in the same epoch, "b" (history reset) in a new one.
    client._auth = None
    deliver(client, FrameType.AUTH_OK, pb.AuthOk(user="u1"))
    deliver(client, FrameType.ACK, pb.Ack(req_id=0, room="a", seq=9, epoch="ea"))
    deliver(client, FrameType.ACK, pb.Ack(req_id=0, room="b", seq=0, epoch="eb2"))
    deliver(client, FrameType.ACK, pb.Ack(req_id=0, room="never-joined", seq=3, epoch="x"))
    assert client.cursor("a") == ("ea", 9)
    assert client.cursor("b") == ("eb2", 0)
    assert client.cursor("never-joined") is None
    deliver(client, FrameType.BATCH, batch(msg(9, "a"), msg(10, "a"), msg(1, "b")))
    assert summary(events(client)) == [("m", "a", 10), ("m", "b", 1)]


async def test_resume_on_a_node_behind_keeps_the_cursor():
    """In a cluster the node resumed on may not have received yet what the
    client got from the node it left: its Ack names an older seq of the same
    epoch, and the seqs up to the cursor that follow are duplicates."""
    client = authenticated()
    join(client, seq=0, epoch="e1")
    deliver(client, FrameType.BATCH, batch(*[msg(s) for s in range(1, 11)]))
    events(client)
    deliver(client, FrameType.ACK, pb.Ack(req_id=0, room=ROOM, seq=7, epoch="e1"))
    assert client.cursor(ROOM) == ("e1", 10)
    deliver(client, FrameType.BATCH, batch(*[msg(s) for s in range(8, 13)]))
    assert summary(events(client)) == [("m", ROOM, 11), ("m", ROOM, 12)]
    assert client.stats["duplicates"] == 3


async def test_ack_gap_and_replay_in_one_read():
    """The Ack that sets the cursor, the Gap and the replay may arrive in a
    single read; each frame must see the state the previous one left."""
    client = authenticated()
    req = pb.Join(room=ROOM, last_seq=10, epoch="e1")
    future = client._register(FrameType.JOIN, req)
    data = b"".join(
        wire.encode_frame(t, m)
        for t, m in [
            (FrameType.ACK, pb.Ack(req_id=req.req_id, room=ROOM, seq=10, epoch="e1")),
            (FrameType.GAP, pb.Gap(room=ROOM, from_seq=11, to_seq=19, epoch="e1")),
            (FrameType.BATCH, batch(*[msg(s) for s in range(20, 60)])),  # big enough for lz4
            (FrameType.PONG, pb.Pong(nonce=1)),
        ]
    )
    conn = types.SimpleNamespace(decoder=wire.FrameDecoder(), last_recv=0.0)
    assert client._receive(conn, data) is None
    assert conn.last_recv > 0
    assert future.result().seq == 10
    evs = summary(events(client))
    assert evs[0] == ("gap", ROOM, 11, 19)
    assert evs[1:] == [("m", ROOM, s) for s in range(20, 60)]
    assert client.stats["frames"] == 5  # AuthOk + the four above


async def test_refused_resume_is_reported_and_room_dropped():
    client = authenticated()
    join(client, seq=3)
    err = pb.Error(reason=pb.ROOM_FORBIDDEN, message="revoked", room=ROOM)
    assert deliver(client, FrameType.ERROR, err) is None
    assert events(client) == [err]
    assert client.cursor(ROOM) is None
    assert client._hello().resume == []


# ------------------------------------------------------------------ requests


async def test_request_error_fails_the_request_only():
    client = authenticated()
    req = pb.Chat(room=ROOM, payload=b"hi")
    future = client._register(FrameType.CHAT, req)
    err = pb.Error(reason=pb.RATE_LIMITED, message="slow down", req_id=req.req_id, room=ROOM)
    assert deliver(client, FrameType.ERROR, err) is None
    with pytest.raises(RequestError) as exc:
        future.result()
    assert exc.value.reason == pb.RATE_LIMITED and exc.value.room == ROOM
    assert str(exc.value) == "RATE_LIMITED: slow down"


async def test_chat_ack_does_not_touch_cursor():
    client = authenticated()
    join(client, seq=4)
    req = pb.Chat(room=ROOM, payload=b"hi")
    future = client._register(FrameType.CHAT, req)
    deliver(client, FrameType.ACK, pb.Ack(req_id=req.req_id, room=ROOM, seq=5))
    assert future.result().seq == 5
    assert client.cursor(ROOM) == ("e1", 4)  # seq 5 still arrives in a Batch
    deliver(client, FrameType.BATCH, batch(msg(5)))
    assert summary(events(client)) == [("m", ROOM, 5)]


async def test_req_ids_are_unique_nonzero_and_wrap():
    client = authenticated()
    client._last_req_id = 0xFFFFFFFE
    ids = []
    for _ in range(3):
        req = pb.Leave(room=ROOM)
        client._register(FrameType.LEAVE, req)
        ids.append(req.req_id)
    assert ids == [0xFFFFFFFF, 1, 2]


async def test_connection_loss_fails_pending_requests():
    client = authenticated()
    req = pb.Join(room=ROOM)
    future = client._register(FrameType.JOIN, req)
    client._disconnected(ConnectionLostError(0, "gone"))
    with pytest.raises(ConnectionLostError):
        future.result()
    assert client._pending == {}


# ------------------------------------------------------------------ session end


def test_errors_during_handshake():
    client = Client("127.0.0.1", 9, "token")
    error = deliver(client, FrameType.ERROR, pb.Error(reason=pb.AUTH_EXPIRED, message="expired"))
    assert isinstance(error, AuthError) and error.reason == pb.AUTH_EXPIRED
    error = deliver(client, FrameType.ERROR, pb.Error(reason=pb.UNSUPPORTED_VERSION))
    assert type(error) is ConnectionLostError


@pytest.mark.parametrize(
    "reason, fatal",
    [
        (pb.DUPLICATE_LOGIN, True),
        (pb.AUTH_EXPIRED, True),
        (pb.SLOW_CONSUMER, False),
        (pb.HEARTBEAT_TIMEOUT, False),
        (pb.SERVER_SHUTDOWN, False),
    ],
)
def test_kick_classification(reason, fatal):
    client = authenticated()
    error = deliver(
        client, FrameType.KICK, pb.Kick(reason=reason, message="bye", reconnect_after_ms=2500)
    )
    assert isinstance(error, KickedError) is fatal
    assert client._retryable(error) is not fatal
    assert error.reason == reason
    if not fatal:
        assert isinstance(error, ConnectionLostError) and error.reconnect_after == 2.5


def test_unsolicited_closing_errors():
    client = authenticated()
    assert isinstance(
        deliver(client, FrameType.ERROR, pb.Error(reason=pb.AUTH_INVALID)), KickedError
    )
    assert (
        type(deliver(client, FrameType.ERROR, pb.Error(reason=pb.BAD_FRAME))) is ConnectionLostError
    )
    # A late reply to a request that already timed out changes nothing.
    assert deliver(client, FrameType.ERROR, pb.Error(reason=pb.RATE_LIMITED, req_id=77)) is None
    assert deliver(client, FrameType.ACK, pb.Ack(req_id=78, room=ROOM, seq=1)) is None


def test_bad_body_and_unknown_frame_type():
    client = authenticated()
    assert client._dispatch(0x7E, b"whatever") is None  # ignored: may be a newer frame type
    assert (
        client._dispatch(FrameType.PING, b"") is None
    )  # client->server type from the node: ignored
    error = client._dispatch(FrameType.BATCH, b"\x0a\x09abc")
    assert isinstance(error, ConnectionLostError) and error.reason == pb.BAD_PROTOBUF


async def test_fatal_end_delivers_queued_events_first():
    client = authenticated()
    join(client, seq=0)
    deliver(client, FrameType.BATCH, batch(msg(1), msg(2)))
    client._finish(KickedError(pb.DUPLICATE_LOGIN, "elsewhere"))
    got = []
    with pytest.raises(KickedError):
        async for event in client:
            got.append(event.seq)
    assert got == [1, 2]
    with pytest.raises(KickedError):  # and keeps raising
        await client.next_event(timeout=1)


async def test_close_ends_iteration_and_discards_queue():
    client = authenticated()
    join(client, seq=0)
    deliver(client, FrameType.BATCH, batch(msg(1)))
    await client.close()
    assert [e async for e in client] == []
    assert await client.next_event(timeout=1) is None
    with pytest.raises(ConnectionLostError):
        await client.say(ROOM, "too late")
    with pytest.raises(RuntimeError):
        await client.connect()
    await client.close()  # idempotent


async def test_next_event_timeout():
    client = authenticated()
    with pytest.raises(asyncio.TimeoutError):
        await client.next_event(timeout=0.01)
