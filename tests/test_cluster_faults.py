"""Cluster faults about nodes, with real processes (one NATS server, a
router, three nodes) and SDK clients in one room: one sequence for everyone
whichever node published; a node killed (-9) or drained under load, its
clients resuming on the others with nothing acknowledged lost, checked seq
by seq."""

from __future__ import annotations

import asyncio
import signal
import time

import nats
import pytest

from fanout._core import encode_room_message
from fanout.cluster import journal
from fanout.cluster import subjects as S
from fanout.protocol import fanout_pb2 as pb

from clusterkit import (Traffic, admin, check_delivery, close_viewers, cluster,  # noqa: F401
                        open_viewers, wait_delivered)

ROOM = "show"

# Faults run on one loop each side (CI time); test_cluster.py covers both.
pytestmark = [pytest.mark.parametrize("node_loop", ["uvloop"]),
              pytest.mark.asyncio(loop_factories=["uvloop"])]


def _start(cluster, *node_flags: str):
    cluster.start_nats()
    cluster.start_router()
    return [cluster.start_node(*node_flags) for _ in range(3)]


async def test_300_clients_on_three_nodes_get_one_sequence(cluster):
    nodes = _start(cluster)
    viewers = await open_viewers(nodes, 300, ROOM)
    try:
        traffic = Traffic(ROOM)
        for n, node in enumerate(nodes):
            traffic.gifts(node, f"n{n}", rate=40)
            for k in range(2):                        # two chatters on every node
                traffic.chats(viewers[n + 3 * k], f"n{n}c{k}", rate=4)
        await asyncio.sleep(3)
        await traffic.stop()
        assert not traffic.failed, traffic.failed
        top = max(traffic.acked)
        await wait_delivered(viewers, top, 20)
        check_delivery(viewers, traffic.acked)
        assert traffic.count("gift") >= 150 and traffic.count("chat") >= 40, traffic.acked
        assert len(traffic.acked) == top                  # nothing published but refused
    finally:
        await close_viewers(viewers)


async def _resume_after(nodes, on: list[int], victim: int, stop_victim) -> None:
    """150 clients on the nodes numbered ``on``, each knowing every node;
    gifts published on every node, chat from every node with members. Then
    ``stop_victim()`` takes node ``victim`` away under load and publishing
    goes on (its clients reconnect to the next node). Every acknowledged
    gift and chat reaches every client exactly once, in order; prints how
    long the victim's clients took to resume."""
    viewers = await open_viewers(nodes, 150, ROOM, on=on, everywhere=True,
                                 backoff_min=0.05, backoff_max=1.0)
    victims = [v for v in viewers if v.home == victim]
    try:
        traffic = Traffic(ROOM)
        for n, node in enumerate(nodes):
            traffic.gifts(node, f"n{n}", rate=30)
        for k in range(2 * len(on)):                      # two chatters on every node used
            traffic.chats(viewers[k], f"c{k}", rate=4)
        await asyncio.sleep(1.5)
        t0 = time.monotonic()
        stop_victim()
        # Resumed: every client of the victim has reconnected and received
        # the first message acknowledged after the fault.
        reconnected = resumed = None
        while time.monotonic() - t0 < 20 and resumed is None:
            if reconnected is None and all(v.client.stats["reconnects"] for v in victims):
                reconnected = time.monotonic() - t0
            after = [s for s, t in traffic.acked_at.items() if t > t0]
            if reconnected is not None and after and all(
                    v.last_seq >= min(after) for v in victims):
                resumed = time.monotonic() - t0
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.5)                          # publishing goes on after the fault
        await traffic.stop()
        top = max(traffic.acked)
        await wait_delivered(viewers, top, 20)
        check_delivery(viewers, traffic.acked)
        print(f"\n{len(victims)} clients of node {victim}: all reconnected after "
              f"{reconnected if reconnected is None else round(reconnected, 3)} s, all past the "
              f"first seq acknowledged after the fault after "
              f"{resumed if resumed is None else round(resumed, 3)} s; {len(traffic.acked)} "
              f"acknowledged ({traffic.count('gift')} gifts, {traffic.count('chat')} chat), "
              f"top seq {top}, failed {traffic.failed}")
        assert reconnected is not None and resumed is not None
        assert traffic.count("gift") > 100 and traffic.count("chat") > 30
        dups = sum(v.client.stats["duplicates"] for v in viewers)
        print(f"duplicates the SDK dropped: {dups}")
    finally:
        await close_viewers(viewers)


async def test_kill_9_node_under_load_clients_resume_elsewhere(cluster):
    nodes = _start(cluster)
    # Node 2 holds no member of the room: the killed node's clients all
    # resume there, on a room that opens (its ring loaded from the history)
    # while messages keep coming.
    await _resume_after(nodes, [0, 1], 1, lambda: nodes[1].stop(signal.SIGKILL))


async def test_drain_node_under_load_clients_resume_elsewhere(cluster):
    nodes = _start(cluster, "--drain-jitter-ms", "300", "--drain-grace-ms", "5000")

    def drain():
        status, body = admin(nodes[2], "POST", "/v1/drain")
        assert status == 202, body
    # Every node holds the room: the drained node's clients resume on node
    # 0, into a room that is open and live.
    await _resume_after(nodes, [0, 1, 2], 2, drain)
    # Exit status 0: every client took everything it was sent before leaving.
    assert nodes[2].proc.wait(10) == 0


async def test_a_hole_in_the_history_reaches_clients_as_a_gap_and_the_room_goes_on(cluster):
    """A seq that will never be stored (an append refused while later ones
    went through) is a hole no history read fills: the node's feed must
    skip it (its members get an explicit Gap) instead of holding the room's
    messages while it asks for it again and again. The test writes the
    room's history itself, as a router would, with seq 3 left out."""
    cluster.start_nats()
    cluster.start_router()
    nodes = [cluster.start_node() for _ in range(2)]
    viewers = await open_viewers(nodes, 4, "holes")
    epoch = viewers[0].client.cursor("holes")[0]
    nc = await nats.connect(cluster.nats.url)
    try:
        for seq in (1, 2, 4, 5):
            record = encode_room_message("holes", seq, pb.GIFT, 0, "test", b"g%d" % seq,
                                         int(time.time() * 1000))
            ack = await nc.request(S.history_subject("holes"), record, timeout=5,
                                   headers=journal.headers("holes", epoch, seq, False))
            assert b'"seq"' in ack.data, ack.data
        await wait_delivered(viewers, 5, 10)
        for v in viewers:
            assert v.got == [(1, b"g1"), (2, b"g2"), ("gap", 3, 3), (4, b"g4"), (5, b"g5")]
    finally:
        await nc.close()
        await close_viewers(viewers)
