"""The node's cost of a TLS connection against a plaintext one: CPU
(handshake, Hello, Join) and resident memory, measured on a real node
process; the clients run in this process.

    flock /tmp/fanout-bench.lock .venv/bin/python bench/tls_conn_cost.py [N]

Connects N clients (100 at a time) to the plaintext port, then N to the TLS
port, each sending Hello and Join and reading the replies; reports the
node's CPU per connection and its RSS growth per connection for each batch,
then repeats both. Only the first batches' RSS figures mean anything: the
repeats reuse what the allocator kept from the first ones.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fanout import devcert  # noqa: E402
from fanout._testbase import NodeProcess  # noqa: E402
from fanout._testbase.process import cpu_seconds  # noqa: E402
from fanout.protocol import fanout_pb2 as pb  # noqa: E402
from fanout.protocol import wire  # noqa: E402
from fanout.protocol.auth import mint  # noqa: E402

SECRET = "x" * 40
OPEN = ["--max-conns-per-ip", "100000", "--max-unauthenticated", "100000",
        "--max-unauthenticated-per-ip", "100000", "--conn-rate-per-ip", "100000",
        "--conn-burst-per-ip", "100000", "--shed-after-refusals", "0",
        "--presence-interval-ms", "0", "--write-threads", "0"]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


async def connect(port: int, ctx, i: int):
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                         server_hostname="localhost" if ctx else None)
    w.write(wire.encode_frame(wire.FrameType.HELLO,
                              pb.Hello(token=mint(SECRET, f"u{i}"), device_id="d")))
    w.write(wire.encode_frame(wire.FrameType.JOIN, pb.Join(req_id=1, room="r")))
    decoder, frames = wire.FrameDecoder(), 0
    while frames < 2:                          # AuthOk, Ack
        data = await r.read(65536)
        if not data:
            raise RuntimeError("node closed a client")
        frames += len(list(decoder.feed(data)))
    return r, w


async def main(n: int) -> None:
    certs = devcert.make(tempfile.mkdtemp(prefix="fanout-tls-cost-"))
    node = NodeProcess(["--tls-port", "0", "--tls-cert", str(certs.cert),
                        "--tls-key", str(certs.key), *OPEN],
                       api_key="k" * 40, env={**os.environ, "FANOUT_SECRET": SECRET})
    try:
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        for name, port, c in (("plain", node.port, None), ("tls", node.tls_port, ctx),
                              ("plain (again)", node.port, None),
                              ("tls (again)", node.tls_port, ctx)):
            await asyncio.sleep(0.5)
            pid = node.proc.pid
            cpu0, rss0 = cpu_seconds(pid), rss_kib(pid)
            conns = []
            for start in range(0, n, 100):
                conns += await asyncio.gather(*(connect(port, c, start + i)
                                                for i in range(min(100, n - start))))
            await asyncio.sleep(0.5)
            cpu = (cpu_seconds(pid) - cpu0) / n * 1e6
            rss = (rss_kib(pid) - rss0) / n
            print(f"{name:14s} node CPU {cpu:4.0f} us/connection, RSS {rss:+5.1f} KiB/connection",
                  flush=True)
            for _, w in conns:
                w.close()
            await asyncio.sleep(1.0)
    finally:
        node.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
