"""Clients of the reconnect-storm benchmark (one process of many):

    python -m bench.scenarios.storm_client --first PORT --then PORT --clients N \
        --room R --secret S --result FILE

Each client connects to ``--first``, joins the room (a Hello with a resume
point) and waits. The process prints ``ready`` when all have joined. When a
client's connection breaks (the benchmark kills that node), it reconnects
to ``--then`` after the SDK's full-jitter backoff (uniform in 0..0.2 s, then
doubling) and resumes with its last seq and epoch; the wall time of each
resume's Ack is recorded. After ``--wait`` seconds the process writes the
times (unix seconds) to ``--result`` as JSON and exits.

Thin asyncio protocols rather than SDK clients: 5,000 of them per process
must cost the client side little, so the figure is the node's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

from fanout.protocol import fanout_pb2 as pb
from fanout.protocol.auth import mint
from fanout.protocol.wire import FrameDecoder, FrameType, encode_frame


class StormClient(asyncio.Protocol):
    def __init__(self, owner: "Storm", token: str) -> None:
        self.owner = owner
        self.token = token
        self.epoch = ""
        self.seq = 0
        self.joined = asyncio.get_running_loop().create_future()
        self.resumed_at: float | None = None
        self.transport = None
        self.decoder = FrameDecoder()
        self.attempt = 0

    def hello(self) -> bytes:
        return encode_frame(FrameType.HELLO, pb.Hello(
            token=self.token, device_class="storm", client="storm",
            resume=[pb.ResumePoint(room=self.owner.room, last_seq=self.seq, epoch=self.epoch)]))

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.decoder = FrameDecoder()
        transport.write(self.hello())

    def data_received(self, data: bytes) -> None:
        for ftype, _flags, body in self.decoder.feed(data):
            if ftype == FrameType.ACK:
                ack = pb.Ack.FromString(body)
                if ack.epoch:
                    self.epoch = ack.epoch
                self.seq = max(self.seq, ack.seq)
                if not self.joined.done():
                    self.joined.set_result(None)
                elif self.owner.killed and self.resumed_at is None:
                    self.resumed_at = time.time()
                    self.owner.resumed += 1

    def connection_lost(self, exc) -> None:
        self.transport = None
        if self.owner.killed is False:
            self.owner.killed = True
        asyncio.get_running_loop().create_task(self.reconnect())

    async def reconnect(self) -> None:
        loop = asyncio.get_running_loop()
        while self.resumed_at is None and not self.owner.done:
            await asyncio.sleep(random.uniform(0.0, min(10.0, 0.2 * 2.0 ** self.attempt)))
            self.attempt += 1
            try:
                await loop.create_connection(lambda: self, "127.0.0.1", self.owner.then)
                return
            except OSError:
                continue


class Storm:
    def __init__(self, args) -> None:
        self.room = args.room
        self.then = args.then
        self.killed = False
        self.done = False
        self.resumed = 0


async def main(args) -> int:
    storm = Storm(args)
    loop = asyncio.get_running_loop()
    clients = [StormClient(storm, mint(args.secret, f"storm-{args.tag}-{i}", rooms="*",
                                       ttl=3600))
               for i in range(args.clients)]
    window = asyncio.Semaphore(256)

    async def first(c):
        async with window:
            await loop.create_connection(lambda: c, "127.0.0.1", args.first)
            await asyncio.wait_for(c.joined, 60)
    await asyncio.gather(*(first(c) for c in clients))
    print("ready", flush=True)
    end = time.monotonic() + args.wait
    while time.monotonic() < end and not (storm.killed and storm.resumed == len(clients)):
        await asyncio.sleep(0.05)
    storm.done = True
    with open(args.result, "w") as fh:
        json.dump({"resumed_at": [c.resumed_at for c in clients]}, fh)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--first", type=int, required=True)
    p.add_argument("--then", type=int, required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--room", required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--tag", default="0")
    p.add_argument("--wait", type=float, default=60.0)
    args = p.parse_args()
    import uvloop
    uvloop.install()
    sys.exit(asyncio.run(main(args)))
