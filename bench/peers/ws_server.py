"""The websockets library's ``broadcast()`` as a fan-out server: the Python
WebSocket peer of bench/scenarios/.

    python -m bench.peers.ws_server --port 0 --viewers N --rate MSGS

Viewers open ``ws://HOST:PORT/ROOM``. Once ``--viewers`` are connected, the
server makes the same seeded message stream as ``naive_server.py``
(``stream.py``, ``--rate`` messages per second over the rooms) and calls
``websockets.broadcast(room_members, line)`` once per message, where
``line`` is the message's V1 JSON line (``stream.v1_json``, the same bytes
the naive server writes). ``broadcast()`` encodes the WebSocket frame once and
writes it to every connection without backpressure. Compression is off
(``compression=None``): with per-message deflate it could not share one frame
across connections. Keepalive pings are off, so the C reader need not answer
them.

The engine has no WebSocket transport, so the comparison is at the level of
deliveries/s and CPU on the same message stream: ``c_reader --mode ws``
counts the JSON lines inside the WebSocket messages. Prints
``ws listening on HOST:PORT`` and, after the stream, one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from bench.peers import stream  # noqa: E402


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def main_async(args) -> None:
    from websockets.asyncio.server import broadcast, serve

    rooms: dict[str, set] = {}
    started = asyncio.get_running_loop().create_future()
    joined = 0

    async def handler(ws):
        nonlocal joined
        room = ws.request.path.lstrip("/") or "room-0"
        members = rooms.setdefault(room, set())
        members.add(ws)
        joined += 1
        if joined >= args.viewers and not started.done():
            started.set_result(None)
        try:
            await ws.wait_closed()
        finally:
            members.discard(ws)
            joined -= 1

    async with serve(handler, args.host, args.port, compression=None, ping_interval=None,
                     max_queue=None, backlog=4096) as server:
        host, port = list(server.sockets)[0].getsockname()[:2]
        print(f"ws listening on {host}:{port}", flush=True)
        await started
        loop = asyncio.get_running_loop()
        source = stream.messages(args.seed)
        names = sorted(rooms)
        seqs = dict.fromkeys(names, 0)
        t0 = loop.time()
        wall0 = time.time()
        cpu0 = _cpu()
        deadline = t0 + args.duration
        i = sent = writes = nbytes = 0
        while loop.time() < deadline:
            due = t0 + i / args.rate if args.rate > 0 else loop.time()
            now = loop.time()
            if due > now:
                await asyncio.sleep(due - now)
                continue
            room = names[i % len(names)]
            seqs[room] += 1
            line = stream.v1_json(room, seqs[room], next(source),
                                  int((wall0 + (due - t0)) * 1000)).decode()
            members = rooms[room]
            broadcast(members, line)
            sent += 1
            writes += len(members)
            nbytes += len(line.encode()) * len(members)
            i += 1
            if i % 4 == 0 or len(members) > 100:
                await asyncio.sleep(0)
        secs = loop.time() - t0
        print(json.dumps({"peer": "websockets", "viewers": joined, "rooms": len(names),
                          "messages_published": sent, "writes": writes,
                          "payload_bytes_written": nbytes, "seconds": round(secs, 3),
                          "writes_per_s": round(writes / secs, 1),
                          "cpu_seconds": round(_cpu() - cpu0, 3),
                          "corpus": stream.SOURCE}), flush=True)
        await asyncio.sleep(args.linger)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--viewers", type=int, default=1)
    p.add_argument("--rate", type=float, default=2000.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--linger", type=float, default=30.0)
    args = p.parse_args(argv)
    import uvloop
    uvloop.install()
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
