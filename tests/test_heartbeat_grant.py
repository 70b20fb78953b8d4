"""The adaptive heartbeat, node side: a Hello asks for a ping interval, the
node grants it within its bounds, and the idle timeout follows the grant."""

from __future__ import annotations

import time

from conftest import token
from fanout.protocol import fanout_pb2 as pb
from fanout.server.config import NodeConfig
from rawclient import FT, RawClient


def hello(node, user: str, ping_ms: int) -> tuple[RawClient, pb.AuthOk]:
    c = RawClient(node.host, node.port)
    c.send(FT.HELLO, pb.Hello(token=token(user), device_id="t", ping_interval_ms=ping_ms))
    ok = c.expect(FT.AUTH_OK)
    return c, ok


def test_grant_clamps_to_the_bounds_and_scales_the_idle_timeout():
    cfg = NodeConfig(ping_interval_ms=20_000, idle_timeout_ms=45_000,
                     ping_interval_min_ms=5_000, ping_interval_max_ms=300_000)
    assert cfg.grant_ping(0) == (20_000, 45_000)
    assert cfg.grant_ping(60_000) == (60_000, 135_000)
    assert cfg.grant_ping(1_000) == (5_000, 11_250)
    assert cfg.grant_ping(10**9) == (300_000, 675_000)
    # A default outside the bounds widens them rather than being refused.
    low = NodeConfig(ping_interval_ms=200, idle_timeout_ms=600)
    assert low.ping_bounds() == (200, 300_000)


def test_authok_announces_the_grant_and_the_bounds(start_node):
    node = start_node("--ping-interval-ms", "300", "--idle-timeout-ms", "900",
                      "--ping-interval-min-ms", "200", "--ping-interval-max-ms", "1000")
    _, ok = hello(node, "default", 0)
    assert (ok.ping_interval_ms, ok.idle_timeout_ms) == (300, 900)
    assert (ok.ping_interval_min_ms, ok.ping_interval_max_ms) == (200, 1000)
    _, ok = hello(node, "long", 600)
    assert (ok.ping_interval_ms, ok.idle_timeout_ms) == (600, 1800)
    _, ok = hello(node, "too-long", 50_000)
    assert (ok.ping_interval_ms, ok.idle_timeout_ms) == (1000, 3000)
    _, ok = hello(node, "too-short", 1)
    assert (ok.ping_interval_ms, ok.idle_timeout_ms) == (200, 600)


def test_each_connection_is_cut_after_its_own_idle_timeout(start_node):
    """Silent connections granted 600 ms (idle 1.2 s) and 2000 ms (idle 4 s)
    pings: each is cut between its idle timeout and one second after it
    (the sweep's promise, docs/protocol.md section 5.1)."""
    node = start_node("--ping-interval-ms", "300", "--idle-timeout-ms", "600",
                      "--ping-interval-min-ms", "200", "--ping-interval-max-ms", "5000")
    short, ok_short = hello(node, "short", 600)
    long, ok_long = hello(node, "long", 2000)
    start = time.monotonic()
    assert (ok_short.idle_timeout_ms, ok_long.idle_timeout_ms) == (1200, 4000)
    frames = short.until_closed(timeout=10)
    short_after = time.monotonic() - start
    assert [m.reason for t, m in frames if t == FT.KICK] == [pb.HEARTBEAT_TIMEOUT]
    assert 1.1 <= short_after <= 1.2 + 1.2
    frames = long.until_closed(timeout=10)
    long_after = time.monotonic() - start
    assert [m.reason for t, m in frames if t == FT.KICK] == [pb.HEARTBEAT_TIMEOUT]
    assert 3.9 <= long_after <= 4.0 + 1.2
