"""A cluster of real processes: one NATS server, a router and three nodes.
Clients spread over the nodes in one room receive the same ordered,
gap-free sequence, whichever node each message was published on."""

from __future__ import annotations

import asyncio

from fanout.client import Client
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol.auth import mint

from clusterkit import admin, cluster  # noqa: F401  (fixture)
from conftest import SECRET


async def _collect(client: Client, room: str, want: int, timeout: float) -> list[tuple]:
    got = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(got) < want and loop.time() < deadline:
        event = await client.next_event(timeout=max(0.01, deadline - loop.time()))
        if isinstance(event, pb.RoomMessage) and event.room == room:
            got.append((event.seq, event.sender, bytes(event.payload)))
        elif isinstance(event, pb.Gap):
            got.append(("gap", event.from_seq, event.to_seq))
    return got


async def test_clients_on_every_node_get_one_sequence(cluster):
    cluster.start_nats()
    cluster.start_router()
    nodes = [cluster.start_node() for _ in range(3)]
    clients = []
    for i in range(30):
        node = nodes[i % 3]
        client = Client(node.host, node.port, mint(SECRET, f"viewer-{i}", rooms="*"))
        await client.connect()
        await client.join("show")
        clients.append(client)
    try:
        sent = 0
        for round_ in range(10):
            for n, node in enumerate(nodes):
                status, body = admin(node, "POST", "/v1/publish", {
                    "room": "show", "kind": "gift", "payload": f"gift {round_}-{n}"})
                assert status == 200, body
                sent += 1
            await clients[round_ % 30].say("show", f"chat {round_}")
            sent += 1
        results = await asyncio.gather(*(_collect(c, "show", sent, 15) for c in clients))
        first = results[0]
        assert [g[0] for g in first] == list(range(1, sent + 1))
        for got in results:
            assert got == first
    finally:
        for client in clients:
            await client.close()
