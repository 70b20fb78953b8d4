"""User-space memory per connection in the worst case, against a real node
(issue 8, item 4).

Found: 1,500 unauthenticated connections each holding 64 KiB of a partial
Hello cost 65 KiB each, and an authenticated read buffer grew to about twice
max_frame. Now a frame before authentication is at most max_hello_bytes, and
the read buffer holds at most the one incomplete frame, so the worst case
per connection is

    carry (header + the frame limit) + Connection + Session + the kernel-facing
    bookkeeping of the loop (uvloop handle, dict entries)

The test fills N connections with the largest partial frame each may hold
and measures the node's RSS delta per connection.
"""

from __future__ import annotations

import socket
import time

import pytest

from conftest import token
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol import wire
from fanout.server.config import NodeConfig

FT = wire.FrameType
N = 500
HELLO_LIMIT = NodeConfig().max_hello_bytes
MAX_FRAME = 65536
# Objects and bookkeeping per connection besides the carry: Session (slots),
# TcpConnection, the loop's reader handle, the session registry entry, the
# interned claims of an authenticated session. Measured at 2-5 KiB; the
# bound leaves room for allocator rounding.
OVERHEAD = 8 * 1024


def _connect(node, i):
    # spread over loopback source addresses, as many clients would be
    sock = socket.socket()
    sock.bind((f"127.0.{1 + i // 200}.{1 + i % 200}", 0))
    sock.connect((node.host, node.port))
    return sock


def _partial(limit):
    """A frame header declaring ``limit`` body bytes and all but the last of
    them: the most a connection can make the node carry."""
    return (bytes([wire.VERSION, FT.PING, 0, 0]) + limit.to_bytes(4, "big")
            + b"\x00" * (limit - 1))


def _settle(node, seconds=1.0):
    time.sleep(seconds)
    return node.rss_kib()


def _per_connection(node, socks_before, make):
    base = _settle(node)
    socks = [make(i) for i in range(socks_before, socks_before + N)]
    after = _settle(node)
    return socks, (after - base) * 1024 / N


@pytest.mark.parametrize("node_loop", ["uvloop"])
def test_worst_case_bytes_per_connection(start_node):
    node = start_node("--max-connections", "5000", "--auth-timeout-ms", "120000",
                      "--idle-timeout-ms", "120000", "--max-hello-bytes", str(HELLO_LIMIT),
                      "--max-frame", str(MAX_FRAME))
    # warm up: allocator arenas and the first-connection costs out of the way
    warm = [_connect(node, 4000 + i) for i in range(50)]
    for s in warm:
        s.sendall(_partial(HELLO_LIMIT))

    def unauthenticated(i):
        s = _connect(node, i)
        s.sendall(_partial(HELLO_LIMIT))
        return s

    unauth, unauth_cost = _per_connection(node, 0, unauthenticated)

    def authenticated(i):
        s = _connect(node, i)
        s.sendall(wire.encode_frame(FT.HELLO, pb.Hello(token=token(f"user-{i}"))))
        s.settimeout(10)
        decoder, got = wire.FrameDecoder(), []
        while not got:
            got = list(decoder.feed(s.recv(4096)))
        assert got[0][0] == FT.AUTH_OK
        s.sendall(_partial(MAX_FRAME))
        return s

    auth, auth_cost = _per_connection(node, N, authenticated)
    assert node.alive()
    # every connection is still held, none was refused or cut
    for s in unauth[:5] + auth[:5]:
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.recv(1)
    print(f"\nnode RSS per connection, worst case: unauthenticated (partial {HELLO_LIMIT}-byte "
          f"Hello) {unauth_cost / 1024:.1f} KiB; authenticated (partial {MAX_FRAME}-byte frame) "
          f"{auth_cost / 1024:.1f} KiB; N={N} each")
    assert unauth_cost <= 8 + HELLO_LIMIT + OVERHEAD, unauth_cost
    assert auth_cost <= 8 + MAX_FRAME + OVERHEAD, auth_cost
    # ... and a frame over the limit before authentication is refused outright
    s = _connect(node, 3000)
    s.sendall(bytes([wire.VERSION, FT.HELLO, 0, 0]) + (HELLO_LIMIT + 1).to_bytes(4, "big"))
    s.settimeout(10)
    [(ftype, _f, body)] = list(wire.FrameDecoder().feed(s.recv(4096)))
    assert ftype == FT.ERROR and pb.Error.FromString(body).reason == pb.FRAME_TOO_LARGE
    for s in warm + unauth + auth + [s]:
        s.close()
