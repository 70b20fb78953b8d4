"""Issue 8 item 7: a drain delivers everything it accepted to every client
that reads within ``drain_grace_ms``, and says so when it could not.

Both tests run a real node process: 3,000 gifts are accepted (admin API) and
queued for a viewer that has stopped reading, then the node gets SIGTERM.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from conftest import token
from fanout.protocol import fanout_pb2 as pb
from rawclient import FT, RawClient
from test_operations import api_publish

GIFTS = 3000
PAYLOAD = "g" * 60                   # 3,000 gifts: about 250 KB queued for the viewer

# One loop is enough: the drain is the node's Python, the same on both.
pytestmark = pytest.mark.parametrize("node_loop", ["uvloop"])


def _stalled_viewer(node) -> tuple[RawClient, str]:
    """A viewer in room "live" that then stops reading, with every one of
    GIFTS gifts accepted for it. Returns it and its session id."""
    viewer = RawClient(node.host, node.port, rcvbuf=4096)
    ok = viewer.hello(token("viewer"))
    assert isinstance(ok, pb.AuthOk), ok
    assert isinstance(viewer.join("live"), pb.Ack)
    accepted = []
    for start in range(0, GIFTS, 500):
        batch = [{"room": "live", "kind": "gift", "payload": f"{PAYLOAD}-{i}"}
                 for i in range(start, start + 500)]
        accepted += [r["seq"] for r in api_publish(node, batch)]
    assert accepted == list(range(1, GIFTS + 1))
    return viewer, ok.session


def test_slow_reader_gets_every_accepted_message_then_its_kick(start_node):
    """Item 7: a viewer that resumes reading 3 s after SIGTERM (past the old
    2 s close grace, within drain_grace_ms = 8 s) gets all 3,000 gifts, then
    Kick(SERVER_SHUTDOWN); the node exits 0 (a clean drain)."""
    node = start_node("--drain-grace-ms", "8000", "--drain-jitter-ms", "100",
                      "--presence-interval-ms", "0", "--close-grace-ms", "2000")
    viewer, _ = _stalled_viewer(node)
    time.sleep(0.3)                                # the last flush is queued
    node.proc.send_signal(signal.SIGTERM)
    time.sleep(3.0)                                # the viewer is not reading
    assert node.alive(), "the drain ended before its deadline"
    frames = viewer.until_closed(timeout=10)
    seqs = [m.seq for ftype, batch in frames if ftype == FT.BATCH for m in batch.messages]
    assert seqs == list(range(1, GIFTS + 1)), f"got {len(seqs)} of {GIFTS}"
    ftype, kick = frames[-1]
    assert ftype == FT.KICK and kick.reason == pb.SERVER_SHUTDOWN, frames[-1]
    viewer.close()
    assert node.proc.wait(timeout=10) == 0
    assert "undelivered" not in node.log()


def test_reader_that_never_reads_is_named_and_the_exit_status_says_so(start_node):
    """Item 7: a viewer that never reads again holds undelivered gifts at the
    drain deadline: the node logs it by session id, user and peer, and
    ``fanout node`` exits 3 (not 0)."""
    node = start_node("--drain-grace-ms", "1500", "--drain-jitter-ms", "100",
                      "--presence-interval-ms", "0")
    viewer, session = _stalled_viewer(node)
    time.sleep(0.3)
    started = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    status = node.proc.wait(timeout=15)
    took = time.monotonic() - started
    log = node.log()
    print(f"exit {status} after {took:.2f} s")
    assert status == 3, log[-2000:]
    assert 1.4 < took < 8, took                    # the drain deadline, not a close grace
    line = re.search(rf"drain: closing session {re.escape(session)} \(user 'viewer', "
                     rf"peer 127\.0\.0\.1:\d+\) with undelivered data: backlog (\d+) bytes, "
                     rf"(\d+) more in the kernel", log)
    assert line, log[-2000:]
    assert int(line.group(1)) + int(line.group(2)) > 0
    assert "drain not clean: 1 connections" in log
    viewer.close()
