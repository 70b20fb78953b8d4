"""Issue 8 item 3: connection slots and descriptors cannot be run out
without a token, scaled down from the full-size attack (bench/).

Source addresses are loopback aliases (Linux routes all of 127/8 to lo):
127.0.0.2-51 are the flood's 50 addresses, 127.0.0.200+ the healthy clients.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import sys
import threading
import time
import urllib.request

import pytest

from conftest import API_KEY, SECRET, token
from fanout._testbase import NodeProcess
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol import wire
from nodeprobe import metric
from rawclient import FT

FLOOD_ADDRS = [f"127.0.0.{i}" for i in range(2, 52)]

# max_connections 600 against 50 addresses x 10 = 500: the flood can never
# hold every slot, which is the point of the per-address cap (full size:
# 19,000 against 50 x 256 = 12,800). 50 x 3 unauthenticated = 150 < 200.
SCALED = ("--max-connections", "600", "--max-conns-per-ip", "10",
          "--max-unauthenticated", "200", "--max-unauthenticated-per-ip", "3",
          "--auth-timeout-ms", "1000")


def _connect(node, source: str, timeout: float = 5.0) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(timeout)
    try:
        s.connect((node.host, node.port))
    except ConnectionResetError:
        pass    # refused: on loopback the RST can beat connect(); the Error is still readable
    return s


def _hello_bytes(user: str) -> bytes:
    return wire.encode_frame(FT.HELLO, pb.Hello(token=token(user), device_id="t"))


def _read_frames(s: socket.socket, until=None, timeout: float = 5.0):
    """Frames until EOF/reset (or until ``until(frames)``): (frames, closed)."""
    decoder = wire.FrameDecoder()
    frames = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return frames, False
        s.settimeout(left)
        try:
            data = s.recv(65536)
        except socket.timeout:
            return frames, False
        except ConnectionResetError:
            data = b""
        if not data:
            return frames, True
        frames += [(t, wire.decode_message(t, b)) for t, _f, b in decoder.feed(data)]
        if until is not None and until(frames):
            return frames, False


def _authenticate(node, source: str, user: str, timeout: float = 5.0):
    """Connect from ``source`` and Hello; (socket, reply frame type, message)."""
    s = _connect(node, source, timeout)
    try:
        s.sendall(_hello_bytes(user))
    except (ConnectionResetError, BrokenPipeError):
        pass                                    # refused: the Error is still readable
    frames, _ = _read_frames(s, until=lambda f: bool(f), timeout=timeout)
    if not frames:
        return s, None, None
    return s, frames[0][0], frames[0][1]



class Flood(threading.Thread):
    """From each address, keep trying to hold more connections than its cap:
    silent sockets, partial Hellos (a header promising 60 KB, 1 KB sent) and
    valid-token Hellos in turn, reopening whatever the node closes."""

    def __init__(self, node, addrs: list[str], per_address: int) -> None:
        super().__init__(daemon=True)
        self.node, self.addrs, self.per_address = node, addrs, per_address
        self.stop = threading.Event()
        self.attempts = self.closed = 0
        partial = wire.encode_frame(FT.HELLO, pb.Hello(token="x" * 60000))[:1024]
        self.payloads = [b"", partial, None]              # None: a valid Hello
        self.users = 0

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        held = {a: 0 for a in self.addrs}
        kind = 0
        while not self.stop.is_set():
            for a in self.addrs:
                if held[a] >= self.per_address:
                    continue
                s = socket.socket()
                s.setblocking(False)
                try:
                    s.bind((a, 0))
                    s.connect_ex((self.node.host, self.node.port))
                    payload = self.payloads[kind % 3]
                    kind += 1
                    if payload is None:
                        self.users += 1
                        payload = _hello_bytes(f"flood-{self.users}")
                    if payload:
                        s.send(payload)
                except OSError:
                    pass
                self.attempts += 1
                sel.register(s, selectors.EVENT_READ, a)
                held[a] += 1
            for key, _ in sel.select(timeout=0.002):
                s = key.fileobj
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(s)
                    s.close()
                    held[key.data] -= 1
                    self.closed += 1
        for key in list(sel.get_map().values()):
            key.fileobj.close()


def test_valid_client_connects_within_1s_under_the_worst_flood(start_node):
    """Item 3, the worst-flood figure, scaled: while 50 addresses try to
    hold 3x their cap each (silent, partial Hello, valid token), a client
    with a valid token from another address connects and authenticates 100
    times; at least 99 must take under 1 s."""
    node = start_node(*SCALED)
    flood = Flood(node, FLOOD_ADDRS, per_address=30)
    flood.start()
    try:
        time.sleep(1.5)                                   # let the flood fill what it can
        took = []
        for i in range(100):
            t0 = time.monotonic()
            s, ftype, msg = _authenticate(node, "127.0.0.200", "healthy", timeout=3.0)
            took.append(time.monotonic() - t0 if ftype == FT.AUTH_OK else float("inf"))
            s.close()
            time.sleep(0.02)
        held = metric(node, "fanout_connections")
        unauth = metric(node, "fanout_connections_unauthenticated")
    finally:
        flood.stop.set()
        flood.join(10)
    took.sort()
    ok = sum(t < 1.0 for t in took)
    print(f"\nflood: {flood.attempts} connection attempts, {flood.closed} closed by the node; "
          f"node held {held:.0f} connections ({unauth:.0f} without a Hello) at the end")
    print("healthy connect+auth, ms: " + ", ".join(
        f"p{q} {took[min(99, q)] * 1000:.1f}" for q in (0, 50, 90, 99)) +
        f", max {took[-1] * 1000:.1f}; {ok}/100 under 1 s")
    assert ok >= 99
    assert flood.attempts > 2000, "the flood did not press hard enough to prove anything"
    assert held <= 600 and unauth <= 200


def test_one_address_holds_no_more_than_its_caps_and_refusals_are_immediate(start_node):
    """Item 3: one address gets exactly max_conns_per_ip (10) authenticated
    connections and max_unauthenticated_per_ip (3) silent ones; the rest are
    refused with ADDRESS_LIMIT and closed at once with an RST (well under
    the 2 s close grace refused sockets used to get)."""
    node = start_node(*SCALED)
    src = "127.0.0.60"
    authed = []
    for i in range(10):
        s, ftype, _ = _authenticate(node, src, f"a{i}")
        assert ftype == FT.AUTH_OK
        authed.append(s)
    s, ftype, msg = _authenticate(node, src, "a10")
    assert (ftype, msg.reason) == (FT.ERROR, pb.ADDRESS_LIMIT)

    other = "127.0.0.61"
    silent = [_connect(node, other) for _ in range(3)]
    refused_after = []
    for _ in range(20):
        t0 = time.monotonic()
        s = _connect(node, other)
        frames, closed = _read_frames(s, timeout=3.0)
        refused_after.append(time.monotonic() - t0)
        assert closed and [m.reason for _t, m in frames] == [pb.ADDRESS_LIMIT]
    print(f"\nrefused connection closed after at most {max(refused_after) * 1000:.1f} ms")
    assert max(refused_after) < 0.2
    # A refused client that writes first sees ECONNRESET (EPIPE once connect()
    # itself saw the reset); the Error is still readable.
    s = _connect(node, other)
    time.sleep(0.1)
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        s.sendall(_hello_bytes("late"))
        s.sendall(_hello_bytes("late"))
    frames, closed = _read_frames(s, timeout=1.0)
    assert closed and [m.reason for _t, m in frames] == [pb.ADDRESS_LIMIT]
    for s in authed + silent:
        s.close()


def test_silent_sockets_are_closed_at_the_handshake_deadline(start_node):
    """Item 3: auth_timeout_ms 1000: a socket that sends nothing, and one
    that sends part of a Hello, get Error(AUTH_TIMEOUT) and are reset between
    1.0 and 1.3 s after connecting (the deadline has the loop's timer
    precision, not the once-a-second sweep's)."""
    node = start_node(*SCALED)
    quiet = _connect(node, "127.0.0.70")
    partial = _connect(node, "127.0.0.70")
    t0 = time.monotonic()
    partial.sendall(_hello_bytes("p")[:20])
    for s in (quiet, partial):
        frames, closed = _read_frames(s, timeout=3.0)
        elapsed = time.monotonic() - t0
        assert closed and [m.reason for _t, m in frames] == [pb.AUTH_TIMEOUT]
        assert 0.95 < elapsed < 1.3, elapsed


def test_a_full_unauthenticated_budget_closes_its_oldest(start_node):
    """Item 3: max_unauthenticated 4: the 5th silent connection (from a
    third address) closes the oldest with CONNECTION_LIMIT, and a valid
    client still gets in."""
    node = start_node("--max-unauthenticated", "4", "--max-unauthenticated-per-ip", "2",
                      "--max-conns-per-ip", "10")
    oldest = _connect(node, "127.0.0.80")
    time.sleep(0.05)
    rest = [_connect(node, "127.0.0.80"), _connect(node, "127.0.0.81"), _connect(node, "127.0.0.81")]
    time.sleep(0.1)
    s, ftype, _ = _authenticate(node, "127.0.0.82", "valid")
    assert ftype == FT.AUTH_OK
    frames, closed = _read_frames(oldest, timeout=1.0)
    assert closed and [m.reason for _t, m in frames] == [pb.CONNECTION_LIMIT]
    for r in rest:
        r.settimeout(0.05)
        with pytest.raises(socket.timeout):            # the younger ones are untouched
            r.recv(1)
    assert "closing the oldest" in node.log()


def test_every_way_a_session_ends_gives_its_slot_back(start_node):
    """Item 3: an address at its cap (2) gets a slot back whichever way a
    connection ends: the client closes, a protocol error (fail), an admin
    disconnect (kick), the handshake deadline (reset); at the end the node
    counts no connection and no address."""
    node = start_node("--max-conns-per-ip", "2", "--max-unauthenticated-per-ip", "2",
                      "--auth-timeout-ms", "500")
    src = "127.0.0.90"

    def fill():
        pair = [_authenticate(node, src, f"u{i}")[0] for i in range(2)]
        s, ftype, msg = _authenticate(node, src, "over")
        assert (ftype, msg.reason) == (FT.ERROR, pb.ADDRESS_LIMIT)
        return pair

    a, b = fill()
    a.close()                                             # peer close
    time.sleep(0.2)
    c, ftype, _ = _authenticate(node, src, "u0")
    assert ftype == FT.AUTH_OK
    c.sendall(b"\xff" * 8)                                # bad frame: fail
    _read_frames(c, timeout=3.0)
    c.close()
    time.sleep(0.2)
    d, ftype, _ = _authenticate(node, src, "u2")
    assert ftype == FT.AUTH_OK
    req = urllib.request.Request(f"http://127.0.0.1:{node.admin_port}/v1/disconnect",
                                 data=b'{"user": "u2"}', method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {API_KEY}"})
    urllib.request.urlopen(req, timeout=5).read()         # kick
    frames, _ = _read_frames(d, timeout=3.0)
    assert [t for t, _m in frames] == [FT.KICK]
    d.close()
    time.sleep(0.2)
    e = _connect(node, src)                               # silent: deadline, reset
    frames, closed = _read_frames(e, timeout=3.0)
    assert closed
    f, ftype, _ = _authenticate(node, src, "u3")
    assert ftype == FT.AUTH_OK
    for s in (b, f):
        s.close()
    time.sleep(0.3)
    assert metric(node, "fanout_connections") == 0
    assert metric(node, "fanout_connections_unauthenticated") == 0
    assert metric(node, "fanout_client_addresses") == 0


@pytest.mark.parametrize("node_loop", ["uvloop"])
def test_healthz_answers_while_the_client_port_is_full(tmp_path, node_loop):
    """Item 3: a node with RLIMIT_NOFILE 300 and fd_reserve 100 lowers its
    max_connections to what fits and keeps 100 descriptors for the admin
    API: with the client port full (clients from 30 addresses refused with
    CONNECTION_LIMIT), 20 /healthz probes and 40 concurrent admin
    connections are answered."""
    env = {**os.environ, "FANOUT_SECRET": SECRET, "FANOUT_MAX_CONNS_PER_IP": "20",
           "FANOUT_MAX_UNAUTHENTICATED_PER_IP": "20"}
    node = NodeProcess(["--loop", node_loop, "--fd-reserve", "100",
                        "--admin-max-connections", "60"], api_key=API_KEY, env=env,
                       log_path=tmp_path / "node.log",
                       command=["prlimit", "--nofile=300:300", sys.executable, "-m", "fanout"])
    held = []
    try:
        assert "max_connections 19000 lowered to" in node.log()
        refused = 0
        for i in range(300):
            src = f"127.0.1.{i // 15 + 1}"
            try:
                s, ftype, msg = _authenticate(node, src, f"fill-{i}", timeout=3.0)
            except OSError as exc:
                assert exc.errno in (errno.ECONNRESET, errno.ECONNREFUSED), exc
                refused += 1
                continue
            if ftype == FT.AUTH_OK:
                held.append(s)
            else:
                assert msg is None or msg.reason == pb.CONNECTION_LIMIT
                refused += 1
                s.close()
        assert refused > 50 and len(held) < 200
        admin = [socket.create_connection(("127.0.0.1", node.admin_port)) for _ in range(40)]
        for s in admin:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: n\r\n\r\n")
        for s in admin:
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            s.close()
        for _ in range(20):
            with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/healthz",
                                        timeout=2) as r:
                assert r.status == 200
        print(f"\nclient port full at {len(held)} connections ({refused} refused); "
              "admin API answered 60 requests")
    finally:
        for s in held:
            s.close()
        node.stop()
