"""Issue 8 item 3: a connection flood is shed in the kernel.

An address the node keeps refusing (over its per-address caps) floods the
accept queue that every client shares. Past ``shed_after_refusals`` refusals
in a second its new connections are dropped by a BPF filter on the listening
socket (fanout/server/synshed.py) for ``shed_seconds``: its SYNs never reach
the queue, while other addresses connect at once, and what it already holds
is untouched. Then it is let back in, to explicit refusals again.
"""

from __future__ import annotations

import ipaddress
import socket
import time

from conftest import token
from fanout.protocol import fanout_pb2 as pb
from fanout.server.synshed import filter_program
from nodeprobe import metric
from rawclient import FT, RawClient

FLOODER, OTHER = "127.0.0.61", "127.0.0.62"


def _try_connect(node, source: str, timeout: float) -> str:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(timeout)
    try:
        s.connect((node.host, node.port))
        return "connected"
    except socket.timeout:
        return "timeout"
    except OSError as exc:
        return type(exc).__name__
    finally:
        s.close()


def test_filter_program_shape():
    addrs = [int(ipaddress.IPv4Address(f"10.0.0.{i}")) for i in range(1, 4)]
    prog = filter_program(addrs)
    assert len(prog) == 8 * (4 + len(addrs) + 2)
    assert filter_program([]) != prog


def test_a_flooding_address_is_shed_and_others_connect(start_node):
    node = start_node("--max-conns-per-ip", "4", "--max-unauthenticated-per-ip", "2",
                      "--shed-after-refusals", "10", "--shed-seconds", "1.5",
                      "--auth-timeout-ms", "30000")
    kept = RawClient(node.host, node.port, source=FLOODER)   # a client it already holds
    assert isinstance(kept.hello(token("kept")), pb.AuthOk)
    # The flood: connect over and over; past its caps each is refused at once.
    outcomes = {}
    t_end = time.monotonic() + 3.0
    while time.monotonic() < t_end:
        r = _try_connect(node, FLOODER, 0.2)
        outcomes[r] = outcomes.get(r, 0) + 1
        if r == "timeout":
            break
    print("flood outcomes:", outcomes)
    assert outcomes.get("timeout") == 1, outcomes          # shed: its SYN went unanswered
    assert metric(node, "fanout_shed_addresses") == 1
    # Everyone else connects at once, and what the flooder holds still works.
    for _ in range(5):
        assert _try_connect(node, OTHER, 0.5) == "connected"
    kept.send(FT.PING, pb.Ping(nonce=5))
    assert kept.expect(FT.PONG).nonce == 5
    # After shed_seconds it is let back in (to the explicit refusal it earned).
    time.sleep(1.7)
    assert metric(node, "fanout_shed_addresses") == 0
    assert _try_connect(node, FLOODER, 1.0) == "connected"
