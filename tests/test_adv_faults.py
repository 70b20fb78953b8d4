"""Issue 8 item 9 (the Python half), by fault injection in an in-process
node on real loopback sockets: every node-wide timer reschedules whatever
its callback does, and a handler that raises costs one connection an
Error(INTERNAL_ERROR), with a throttled log line, and nobody else anything.
"""

from __future__ import annotations

import asyncio
import logging

from conftest import token
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol.wire import FrameType as FT
from fanout.server import session as session_mod
from inprocess import local_app
from test_room_state import StreamClient


class FailsOnce:
    """Wraps ``inner``: the first call raises, every call is counted."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("injected fault")
        return self.inner(*args)


async def wait_for(predicate, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate() and loop.time() < deadline:
        await asyncio.sleep(0.02)
    return predicate()


async def test_logic_sweep_that_raises_runs_again(caplog):
    """The room-state sweep (every 0.1 s here) raises once, then runs again:
    at least 3 calls within 1 s, and one ERROR line with the traceback."""
    async with local_app(room_idle_ttl_s=0.2, grace=0.1) as app:
        sweep = app.logic.sequencer.sweep = FailsOnce(app.logic.sequencer.sweep)
        assert await wait_for(lambda: sweep.calls >= 3, 1.0), sweep.calls
    failures = [r for r in caplog.records if "sweep failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


async def test_node_sweep_and_lag_probe_survive_an_exception(caplog):
    """The node's once-a-second sweep (timeouts, overload) and the lag probe
    each hit an exception once and keep running: the overload tick runs
    again a second later and the probe keeps feeding samples."""
    async with local_app(grace=0.1) as app:
        overload = app.node.overload
        tick = overload.tick = FailsOnce(overload.tick)
        add_lag = overload.add_lag = FailsOnce(overload.add_lag)
        assert await wait_for(lambda: tick.calls >= 2 and add_lag.calls >= 5, 3.0), \
            (tick.calls, add_lag.calls)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "timer _sweep failed" in lines and "lag probe sink failed" in lines


async def test_handler_that_raises_costs_one_connection(caplog, monkeypatch):
    """A Ping handler that raises for one nonce: each of 12 connections that
    sends it gets Error(INTERNAL_ERROR) and is closed; at most 5 ERROR lines
    are logged for all 12 (throttled); a bystander's pings and joins keep
    being answered throughout."""
    ping, message_type = session_mod._HANDLERS[FT.PING]

    def buggy_ping(session, msg):
        if msg.nonce == 666:
            raise RuntimeError("injected handler bug")
        return ping(session, msg)
    monkeypatch.setitem(session_mod._HANDLERS, FT.PING, (buggy_ping, message_type))

    async with local_app(grace=0.1) as app:
        address = app.node.address
        bystander = await StreamClient.connect(address)
        bystander.send((FT.HELLO, pb.Hello(token=token("bystander"))))
        await bystander.until(1, FT.AUTH_OK)
        victims = []
        for i in range(12):
            victim = await StreamClient.connect(address)
            victim.send((FT.HELLO, pb.Hello(token=token(f"victim{i}"))),
                        (FT.PING, pb.Ping(nonce=666)))
            victims.append(victim)
            bystander.send((FT.PING, pb.Ping(nonce=i)))
        for victim in victims:
            frames = await victim.until(1, FT.ERROR, timeout=5)
            assert frames[-1][1].reason == pb.INTERNAL_ERROR
            assert await victim.reader.read() == b""            # closed
        bystander.send((FT.JOIN, pb.Join(req_id=1, room="still-fine")))
        frames = await bystander.until(1, FT.ACK, timeout=5)
        assert [m.nonce for t, m in frames if t == FT.PONG] == list(range(12))
        bystander.close()
    internal = [r for r in caplog.records if "internal error handling Ping" in r.getMessage()]
    assert 1 <= len(internal) <= 5, len(internal)
