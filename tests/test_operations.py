"""Operating a node: limits, presence, overload degradation, graceful drain."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import API_KEY, token
from fanout.client import Client
from fanout.server.logutil import ThrottledLog
from fanout.server.overload import CALM_SECONDS, OverloadControl
from inprocess import local_app
from fanout.protocol import fanout_pb2 as pb
from rawclient import FT, RawClient


def api_publish(node, messages: list[dict], timeout: float = 10) -> list[dict]:
    """POST /v1/publish in batch form; returns the per-message results."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{node.admin_port}/v1/publish",
        data=json.dumps({"messages": messages}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())["results"]


# ---------------------------------------------------------------- limits

def test_per_ip_connection_rate_limit(start_node):
    node = start_node("--conn-rate-per-ip", "0.5", "--conn-burst-per-ip", "5")
    outcomes = []
    for i in range(10):
        c = RawClient(node.host, node.port)
        reply = c.hello(token(f"u{i}"))
        outcomes.append(reply.reason if isinstance(reply, pb.Error) else "ok")
    assert outcomes[:5] == ["ok"] * 5
    assert outcomes[5:] == [pb.CONNECTION_RATE_LIMITED] * 5
    assert "refused connection from 127.0.0.1" in node.log()


def test_max_connections(start_node):
    node = start_node("--max-connections", "3")
    held = [RawClient(node.host, node.port) for _ in range(3)]
    for i, c in enumerate(held):
        assert isinstance(c.hello(token(f"h{i}")), pb.AuthOk)
    extra = RawClient(node.host, node.port)
    frames = extra.until_closed()
    assert [m.reason for t, m in frames if t == FT.ERROR] == [pb.CONNECTION_LIMIT]
    held[0].close()
    time.sleep(0.2)
    again = RawClient(node.host, node.port)
    assert isinstance(again.hello(token("again")), pb.AuthOk)


# ---------------------------------------------------------------- presence

def test_members_receive_online_count(start_node):
    node = start_node("--presence-interval-ms", "200")
    clients = [RawClient(node.host, node.port) for _ in range(3)]
    for i, c in enumerate(clients):
        c.hello(token(f"p{i}"))
        c.join("stage")
    presence = clients[0].expect(FT.PRESENCE, timeout=5)
    assert (presence.room, presence.online) == ("stage", 3)


# ---------------------------------------------------------------- overload

def test_hot_room_keeps_every_gift_while_chat_is_sampled(start_node):
    node = start_node("--room-budget", "100", "--chat-sample-every", "5",
                      "--max-delay-ms", "20")
    messages = []
    for i in range(1500):
        if i % 5 == 0:
            messages.append({"room": "hot", "kind": "gift", "payload": f"gift-{i}"})
        else:
            messages.append({"room": "hot", "kind": "chat", "payload": f"chat-{i}"})

    async def main():
        async with Client(node.host, node.port, token("viewer")) as viewer:
            await viewer.join("hot")
            results = []
            for start in range(0, len(messages), 500):
                results += await asyncio.to_thread(api_publish, node, messages[start:start + 500])
            accepted = [r["seq"] for r in results if "seq" in r]
            got = []
            while len(got) < len(accepted):
                event = await viewer.next_event(timeout=10)
                assert isinstance(event, pb.RoomMessage), event
                got.append(event)
            return results, got, viewer.stats["sampled_batches"]

    results, got, sampled_batches = asyncio.run(main())
    kinds = [m["kind"] for m in messages]
    gift_results = [r for r, k in zip(results, kinds) if k == "gift"]
    chat_results = [r for r, k in zip(results, kinds) if k == "chat"]
    assert all("seq" in r for r in gift_results)                     # 100% of gifts
    dropped = [r for r in chat_results if "error" in r]
    assert dropped and all(r["error"]["code"] == "ROOM_OVERLOADED" for r in dropped)
    assert len(dropped) < len(chat_results)                          # sampled, not cut off
    assert [m.seq for m in got] == list(range(1, len(got) + 1))      # no holes in seq
    assert sum(m.kind == pb.GIFT for m in got) == 300
    assert sampled_batches > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/metrics") as resp:
        text = resp.read().decode()
    assert f'fanout_degraded_messages_total{{kind="chat"}} {float(len(dropped))}' in text
    assert 'fanout_degraded_messages_total{kind="gift"} 0.0' in text


async def test_one_long_callback_is_not_overload():
    """A single long callback (like a 10k-member flush) is not overload."""
    async with local_app(grace=0.1) as app:
        await asyncio.sleep(0.15)
        time.sleep(0.12)
        await asyncio.sleep(2.2)
        assert app.node.degradation_level == 0


async def test_degradation_steps_up_at_once_and_recovers_slowly():
    async with local_app(grace=0.1, room_budget=1000, chat_sample_every=4) as app:
        node, overload = app.node, app.node.overload
        base = node.hub.max_delay
        assert overload.update(0.3, 0) == 2 and not node.ready
        assert node.hub.max_delay == pytest.approx(4 * base)
        # Overloaded: chat only within a quarter of the budget, none over it.
        outcomes = []
        for i in range(600):
            try:
                await node.publish("r", "chat", b"c")
                outcomes.append(True)
            except Exception as exc:
                assert exc.reason == pb.ROOM_OVERLOADED
                outcomes.append(False)
        assert 200 <= sum(outcomes) <= 300
        await node.publish("r", "gift", b"g")                # gifts still pass
        for _ in range(4):
            assert overload.update(0.0, 0) == 2              # not calm long enough
        assert overload.update(0.0, 0) == 1
        assert node.hub.max_delay == pytest.approx(2 * base)
        assert overload.update(0.0, 10**12) == 1             # write backlog keeps it degraded
        for _ in range(5):
            overload.update(0.0, 0)
        assert node.degradation_level == 0 and node.ready
        assert node.hub.max_delay == pytest.approx(base)


def test_delivery_delay_degrades_and_recovers():
    """When the writers fall behind, messages wait longer for their write
    round: that mean delay degrades the node, without any loop lag."""
    levels = []
    control = OverloadControl(lag_degraded_ms=20, lag_overloaded_ms=100,
                              backlog_degraded_bytes=1 << 30, on_change=levels.append,
                              delay_degraded_ms=500, delay_overloaded_ms=3000)
    assert control.tick(0, 0.15) == 0            # a hot room's planned rounds
    assert control.tick(0, 0.8) == 1
    assert control.tick(0, 3.5) == 2
    for _ in range(CALM_SECONDS):
        control.tick(0, 0.1)
    assert control.level == 1 and levels == [1, 2, 1]


def test_throttled_log_bounds_a_flood(caplog):
    logger = logging.getLogger("fanout.test.throttle")
    throttled = ThrottledLog(logger, interval=0.2, burst=3)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for i in range(100):
            throttled.warning("k", "bad client %d", i)
        time.sleep(0.25)
        throttled.warning("k", "bad client again")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["bad client 0", "bad client 1", "bad client 2"]
    assert lines[3] == "bad client again (97 similar lines suppressed)"
    assert len(lines) == 4


# ---------------------------------------------------------------- drain

def test_drain_under_load_loses_nothing(start_node):
    node = start_node("--drain-grace-ms", "5000", "--drain-jitter-ms", "300",
                      "--max-delay-ms", "20")
    port = node.port
    viewers = 50
    accepted: list[int] = []
    refused: list[str] = []
    stop = threading.Event()

    def publisher():
        # Publishes until the node is gone; every publish either gets a seq
        # or an error the publisher sees.
        i = 0
        while not stop.is_set():
            batch = [{"room": "live", "kind": "gift", "payload": f"g{i + k}"} for k in range(20)]
            i += 20
            try:
                for r in api_publish(node, batch, timeout=5):
                    if "seq" in r:
                        accepted.append(r["seq"])
                    else:
                        refused.append(r["error"]["code"])
            except urllib.error.HTTPError as exc:
                refused.append(json.loads(exc.read())["error"]["code"])
            except OSError:
                refused.append("unreachable")
                return
            time.sleep(0.005)

    async def main():
        clients = [Client(node.host, port, token(f"v{i}"), backoff_min=0.05, backoff_max=0.3)
                   for i in range(viewers)]
        await asyncio.gather(*(c.connect() for c in clients))
        acks = await asyncio.gather(*(c.join("live") for c in clients))
        epoch = acks[0].epoch
        thread = threading.Thread(target=publisher)
        thread.start()
        await asyncio.sleep(1.0)
        node.proc.send_signal(signal.SIGTERM)               # drain under load
        exit_code = await asyncio.to_thread(node.proc.wait, 15)
        stop.set()
        await asyncio.to_thread(thread.join, 10)
        # Every accepted message reached every viewer before it was kicked.
        streams = []
        for c in clients:
            seqs = []
            while len(seqs) < len(accepted):
                event = await c.next_event(timeout=10)
                assert isinstance(event, pb.RoomMessage), event
                seqs.append(event.seq)
            streams.append(seqs)
        # The SDK reconnects: to a fresh node on the same port, in a new epoch.
        replacement = start_node(port=port)
        await asyncio.sleep(1.0)
        for c in clients:
            for _ in range(100):
                if c.connected and c.cursor("live")[0] != epoch:
                    break
                await asyncio.sleep(0.05)
            assert c.connected and c.cursor("live")[0] != epoch
        await asyncio.gather(*(c.close() for c in clients))
        return exit_code, streams, replacement

    exit_code, streams, _ = asyncio.run(main())
    assert exit_code == 0
    assert accepted == list(range(1, len(accepted) + 1)) and len(accepted) >= 100
    for seqs in streams:
        assert seqs == accepted
    assert refused and set(refused) <= {"DRAINING", "unreachable"}


async def test_real_event_loop_lag_degrades_the_node():
    async with local_app(grace=0.1) as app:
        node = app.node
        assert node.ready
        loop = asyncio.get_running_loop()
        busy_until = loop.time() + 2.5

        def hog():
            # A saturated loop: long callbacks back to back, as under a
            # CPU-bound burst, so most lag probes run very late.
            time.sleep(0.3)
            if loop.time() < busy_until:
                loop.call_soon(hog)
        loop.call_soon(hog)
        for _ in range(40):
            await asyncio.sleep(0.1)
            if node.degradation_level == 2:
                break
        assert node.degradation_level == 2 and not node.ready
        assert node.loop_lag >= 0.1
        lag = node.metrics.registry.get_sample_value("fanout_event_loop_lag_seconds_count")
        assert lag > 0
