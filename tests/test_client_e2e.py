"""The client SDK against real nodes: server-side publish, reconnect, resume."""

from __future__ import annotations

import asyncio
import signal

import pytest

from conftest import token
from inprocess import local_app
from fanout.client import Client, ConnectionLostError, KickedError
from fanout.logic import Rejected
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol import wire


@pytest.fixture
async def local_node():
    """A node in the test's own event loop, on real loopback sockets."""
    async with local_app() as app:
        yield app.node


async def next_message(client, timeout=10):
    event = await client.next_event(timeout=timeout)
    assert isinstance(event, pb.RoomMessage), event
    return event


async def test_server_side_publish_kinds_and_priority(local_node):
    node = local_node
    async with Client(*node.address, token("viewer")) as c:
        await c.join("show")
        assert await node.publish("show", "gift", b"rocket", sender="gift-svc", priority=9) == 1
        assert await node.publish("show", pb.SYSTEM, "stream starts") == 2
        gift, notice = await next_message(c), await next_message(c)
        assert (gift.kind, gift.priority, gift.sender, gift.payload) == (
            pb.GIFT, 9, "gift-svc", b"rocket")
        assert (notice.kind, notice.sender, notice.payload) == (
            pb.SYSTEM, "system", b"stream starts")
        assert (await node.room_info("show"))["online"] == 1
    with pytest.raises(Rejected):
        await node.publish("show", "confetti", b"x")
    with pytest.raises(Rejected):
        await node.publish("", "chat", b"x")
    with pytest.raises(Rejected):
        await node.publish("show", "chat", b"x" * 100_000)


async def test_auth_ok_announces_the_dictionary_its_frames_use(local_node):
    node = local_node
    async with Client(*node.address, token("viewer")) as c:
        assert c.auth.compress_dict == node.config.compress_dict == 1
        await c.join("quiet")
        text = "星星 sent rocket x10 lol 😂😂 from a quiet room"
        await node.publish("quiet", "gift", text, sender="gift-svc")
        assert (await next_message(c)).payload == text.encode()
    # the quiet room's one-message frame went out compressed with it
    # (bytes_out counts the core frame: 16 B of headroom, the header, the body)
    stats = node.hub.room("quiet", "", 0).stats()
    assert stats["frames"] == 1 and stats["bytes_out"] - 16 - 8 < stats["bytes_in"] * 0.8


async def test_client_without_the_announced_dictionary_says_so(local_node, monkeypatch):
    monkeypatch.setattr(wire, "DICTIONARIES", {})          # a client built without it
    c = Client(*local_node.address, token("viewer"))
    with pytest.raises(ConnectionLostError) as err:
        await c.connect()
    assert err.value.reason == pb.BAD_COMPRESSION
    assert "dictionary 1" in str(err.value)
    await c.close()


async def test_sdk_resumes_after_kick_without_loss(local_node):
    node = local_node
    async with Client(*node.address, token("viewer"), backoff_min=0.05, backoff_max=0.2) as c:
        await c.join("r")
        for i in range(5):
            await node.publish("r", "chat", f"before-{i}")
        assert [(await next_message(c)).seq for _ in range(5)] == [1, 2, 3, 4, 5]
        session = next(s for s in node.sessions.values() if s.user == "viewer")
        session.kick(pb.SLOW_CONSUMER, "test kick")
        for i in range(10):              # published while the client is away
            await node.publish("r", "chat", f"during-{i}")
            await asyncio.sleep(0.005)
        got = [await next_message(c) for _ in range(10)]
        assert [m.seq for m in got] == list(range(6, 16))
        assert c.stats["reconnects"] >= 1 and c.stats["gaps"] == 0


async def test_duplicate_login_ends_the_older_client(local_node):
    first = Client(*local_node.address, token("zoe"), device_class="mobile")
    await first.connect()
    async with Client(*local_node.address, token("zoe"), device_class="mobile"):
        with pytest.raises(KickedError) as err:
            await first.next_event(timeout=10)
        assert err.value.reason == pb.DUPLICATE_LOGIN
    await first.close()


def test_sdk_survives_node_restart(start_node):
    """SIGTERM: clients are told to come back later; the new node's rooms are
    a new epoch, so the client starts them from seq 1 and misses nothing."""
    node = start_node("--chat-rate", "1e6", "--chat-burst", "1e6")
    port = node.port

    async def main():
        async with Client(node.host, port, token("viewer"), backoff_min=0.05,
                          backoff_max=0.5) as c:
            first_ack = await c.join("r")
            async with Client(node.host, port, token("pub"), reconnect=False) as pub:
                await pub.join("r")
                await pub.say("r", b"old-1")
            old = await next_message(c)
            assert old.payload == b"old-1"
            node.stop(signal.SIGTERM)
            start_node(port=port)
            async with Client(node.host, port, token("pub"), reconnect=False) as pub:
                await pub.join("r")
                for i in range(3):
                    await pub.say("r", f"new-{i}".encode())
            got = [await next_message(c, timeout=20) for _ in range(3)]
            assert [m.payload for m in got] == [b"new-0", b"new-1", b"new-2"]
            assert [m.seq for m in got] == [1, 2, 3]
            epoch, _seq = c.cursor("r")
            assert epoch != first_ack.epoch

    asyncio.run(main())
