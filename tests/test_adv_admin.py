"""Issue 8 item 11: the admin API's header timeout and its own connection
cap, so ``/healthz`` keeps answering during a slowloris on the admin port."""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytestmark = pytest.mark.parametrize("node_loop", ["uvloop", "asyncio"])


def _healthz(port: int, timeout: float = 2.0) -> float:
    """Seconds one fresh-connection ``GET /healthz`` takes; raises if it fails."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:80]
    return time.monotonic() - t0


def _closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer closes (EOF or reset), None if it does not."""
    sock.settimeout(timeout)
    t0 = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except socket.timeout:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def test_incomplete_headers_are_closed_at_the_header_timeout(start_node):
    """A connection that dribbles a request line and headers, one byte every
    0.2 s, never finishing them, is closed 1 s (the configured timeout) after
    it connected, give or take the loop's timer precision; one that sends
    nothing is too."""
    node = start_node("--admin-header-timeout-ms", "1000")
    drip = socket.create_connection(("127.0.0.1", node.admin_port))
    silent = socket.create_connection(("127.0.0.1", node.admin_port))
    t0 = time.monotonic()
    stop = threading.Event()

    def dribble():
        for b in b"GET /healthz HTTP/1.1\r\nHost: node\r\nX-Slow: " + b"a" * 100:
            if stop.wait(0.2):
                return
            try:
                drip.send(bytes([b]))
            except OSError:
                return
    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    waited = _closed_within(drip, 4.0)
    stop.set()
    assert waited is not None, "a dribbling connection outlived the header timeout"
    assert 0.8 < time.monotonic() - t0 < 1.6
    assert _closed_within(silent, 1.0) is not None
    assert 0.8 < time.monotonic() - t0 < 1.8
    # A normal request is unaffected.
    assert _healthz(node.admin_port) < 0.5
    assert "no complete request headers" in node.log()


def test_healthz_answers_during_a_slowloris(start_node):
    """The cap is 20 admin connections. 100 slow connections, each holding
    a half-sent request, keep arriving; meanwhile 20 probes on fresh
    connections each answer within 0.5 s (the cap closes the oldest slow
    connection instead of refusing the probe), and the node never holds
    more than 20 admin connections."""
    node = start_node("--admin-max-connections", "20", "--admin-header-timeout-ms", "10000")
    slow = []
    for _ in range(100):
        s = socket.create_connection(("127.0.0.1", node.admin_port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: node\r\n")     # never the blank line
        slow.append(s)
    time.sleep(0.3)
    took = [_healthz(node.admin_port) for _ in range(20)]
    print(f"healthz during slowloris: max {max(took) * 1000:.1f} ms, "
          f"median {sorted(took)[10] * 1000:.1f} ms")
    assert max(took) < 0.5
    # The oldest 80 slow connections were closed to make room; at most 20 remain.
    still_open = 0
    for s in slow:
        if _closed_within(s, 0.01) is None:
            still_open += 1
        s.close()
    assert still_open <= 20, still_open
    assert "admin API holds 20 connections, its limit" in node.log()
