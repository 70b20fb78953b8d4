"""V1-style naive fan-out server: uvloop, one ``transport.write`` per message
per viewer. The peer the engine is measured against in bench/scenarios/.

    python -m bench.peers.naive_server --port 0 --viewers N --rate MSGS [--format json|frame]

``--format json`` (default, V1 style): viewers send one line
``{"op":"join","room":R}`` and then get every message of their room as one
JSON object per line (``stream.v1_json``), one ``transport.write`` per
message per viewer. ``bench/peers/c_reader.c`` reads it.

``--format frame``: the same one-write-per-message-per-viewer server, but
it speaks wire protocol v1 just far enough for ``fanout load`` and the SDK:
Hello -> AuthOk, Join -> Ack, Ping -> Pong, Chat -> Ack (and the chat is
published). Each message goes out as its own Batch frame of one record,
encoded once per message (the naive part is the writes, not the encoding).

The server makes its own message stream (``--rate`` messages per second in
total, spread round-robin over the rooms viewers joined), from the seeded
corpus in ``stream.py``, starting once ``--viewers`` viewers have joined.
Each message carries the time it was due (its "arrival"), so latency
includes the time it waited behind earlier messages. It prints
``naive listening on HOST:PORT`` when ready and, after ``--duration``
seconds of stream, one JSON line with what it sent and its CPU time.
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


class Server:
    def __init__(self, args) -> None:
        self.args = args
        self.rooms: dict[str, list[asyncio.Transport]] = {}
        self.joined = 0
        self.started = asyncio.get_event_loop().create_future()
        self.seq: dict[str, int] = {}
        self.sent_messages = 0
        self.writes = 0
        self.bytes = 0
        self.frame = args.format == "frame"
        if self.frame:
            from fanout import _core
            from fanout.protocol import fanout_pb2 as pb
            self._core, self.pb = _core, pb

    def join(self, room: str, transport) -> None:
        self.rooms.setdefault(room, []).append(transport)
        self.seq.setdefault(room, 0)
        self.joined += 1
        if self.joined >= self.args.viewers and not self.started.done():
            self.started.set_result(None)

    def leave(self, room: str | None, transport) -> None:
        if room is not None and transport in self.rooms.get(room, ()):
            self.rooms[room].remove(transport)
            self.joined -= 1

    def encode(self, room: str, seq: int, m: stream.Msg, ts_ms: int) -> bytes:
        if not self.frame:
            return stream.v1_json(room, seq, m, ts_ms)
        record = self._core.encode_room_message(room, seq, m.kind, m.priority, m.sender,
                                                m.payload, ts_ms)
        return self._core.pack_frame(0x43, record, 0)

    def publish(self, room: str, m: stream.Msg, ts_ms: int) -> int:
        seq = self.seq[room] = self.seq.get(room, 0) + 1
        data = self.encode(room, seq, m, ts_ms)
        members = self.rooms.get(room, ())
        for t in members:                    # the V1 way: one write per viewer
            t.write(data)
        self.sent_messages += 1
        self.writes += len(members)
        self.bytes += len(data) * len(members)
        return seq

    async def run_stream(self) -> dict:
        args = self.args
        await self.started
        loop = asyncio.get_running_loop()
        source = stream.messages(args.seed)
        names = sorted(self.rooms)
        t0 = loop.time()
        wall0 = time.time()
        cpu0 = _cpu()
        i = 0
        deadline = t0 + args.duration
        while loop.time() < deadline:
            due = t0 + i / args.rate if args.rate > 0 else loop.time()
            now = loop.time()
            if due > now:
                await asyncio.sleep(due - now)
                continue
            room = names[i % len(names)]
            self.publish(room, next(source), int((wall0 + (due - t0)) * 1000))
            i += 1
            if i % 4 == 0 or len(self.rooms[room]) > 100:
                await asyncio.sleep(0)   # let pings and reads through
        secs = loop.time() - t0
        return {"peer": "naive", "format": args.format, "viewers": self.joined,
                "rooms": len(names), "messages_published": self.sent_messages,
                "messages_due": int(args.rate * args.duration) if args.rate > 0 else None,
                "writes": self.writes, "bytes_written": self.bytes, "seconds": round(secs, 3),
                "writes_per_s": round(self.writes / secs, 1),
                "cpu_seconds": round(_cpu() - cpu0, 3), "corpus": stream.SOURCE}


class JsonLines(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.buf = b""
        self.room: str | None = None
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            try:
                req = json.loads(line)
            except ValueError:
                self.transport.close()
                return
            if req.get("op") == "join" and self.room is None:
                self.room = str(req.get("room", "room-0"))
                self.server.join(self.room, self.transport)

    def connection_lost(self, exc) -> None:
        self.server.leave(self.room, self.transport)


class Frames(asyncio.Protocol):
    """Just enough of wire protocol v1 for `fanout load` viewers."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.pb = server.pb
        self.core = server._core
        self.buf = b""
        self.room: str | None = None
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, ftype: int, msg) -> None:
        self.transport.write(self.core.pack_frame(ftype, msg.SerializeToString(), 0))

    def data_received(self, data: bytes) -> None:
        pb = self.pb
        try:
            frames, used = self.core.parse_frames(self.buf + data, 65536)
        except Exception:
            self.transport.close()
            return
        self.buf = (self.buf + data)[used:]
        for ftype, _flags, body in frames:
            if ftype == 0x01:
                self.send(0x41, pb.AuthOk(user="naive", session=str(id(self)),
                                          ping_interval_ms=20000, idle_timeout_ms=45000,
                                          server_time_ms=stream.now_ms()))
            elif ftype == 0x02:
                j = pb.Join.FromString(body)
                if self.room is None:
                    self.room = j.room
                    self.server.join(j.room, self.transport)
                self.send(0x47, pb.Ack(req_id=j.req_id, room=j.room,
                                       seq=self.server.seq.get(j.room, 0), epoch="naive"))
            elif ftype == 0x04:
                c = pb.Chat.FromString(body)
                seq = self.server.publish(c.room, stream.Msg(stream.CHAT, "viewer", c.payload, 0),
                                          stream.now_ms())
                self.send(0x47, pb.Ack(req_id=c.req_id, room=c.room, seq=seq, epoch="naive"))
            elif ftype == 0x05:
                p = pb.Ping.FromString(body)
                self.send(0x45, pb.Pong(nonce=p.nonce, server_time_ms=stream.now_ms()))

    def connection_lost(self, exc) -> None:
        self.server.leave(self.room, self.transport)


async def main_async(args) -> None:
    server = Server(args)
    loop = asyncio.get_running_loop()
    proto = Frames if args.format == "frame" else JsonLines
    srv = await loop.create_server(lambda: proto(server), args.host, args.port, backlog=4096)
    host, port = srv.sockets[0].getsockname()[:2]
    print(f"naive listening on {host}:{port}", flush=True)
    result = await server.run_stream()
    print(json.dumps(result), flush=True)
    await asyncio.sleep(args.linger)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--viewers", type=int, default=1, help="start the stream once this many joined")
    p.add_argument("--rate", type=float, default=2000.0, help="messages per second in total (0: flat out)")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--format", choices=("json", "frame"), default="json")
    p.add_argument("--linger", type=float, default=30.0, help="seconds to stay up after the stream")
    args = p.parse_args(argv)
    import uvloop
    uvloop.install()
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
