"""The router-throughput benchmark's client (a process of its own):

    python -m bench.scenarios.router_driver --nats URL --rooms R --inflight W \
        --seconds D --payload-bytes B --result FILE

Sends ``publish`` calls (cluster.v1.Call, as a node does) to the routers for
D seconds, keeping W in flight, spread round-robin over R rooms, and writes
how many were answered, how many were stored (answer without a reason) and
the call latency percentiles (numpy) to FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import numpy as np

from fanout.cluster import subjects as S
from fanout.cluster.connect import connect
from fanout.protocol import cluster_pb2 as cpb
from fanout.protocol import fanout_pb2 as pb


async def main(args) -> int:
    nc = await connect(args.nats, "router-driver")
    rooms = [f"bench-{i}" for i in range(args.rooms)]
    bodies = [(S.RPC.format(S.partition(r), "publish"),
               cpb.Call(room=r, kind=pb.GIFT, payload=b"x" * args.payload_bytes,
                        sender="bench").SerializeToString()) for r in rooms]
    latencies: list[float] = []
    counts = {"answered": 0, "stored": 0, "refused": 0, "timeouts": 0}
    stop_at = time.monotonic() + args.warmup + args.seconds
    measure_from = time.monotonic() + args.warmup
    measured = {"answered": 0, "stored": 0}

    async def worker(k: int) -> None:
        i = k
        while time.monotonic() < stop_at:
            subject, body = bodies[i % len(bodies)]
            i += args.inflight
            began = time.monotonic()
            try:
                msg = await nc.request(subject, body, timeout=5)
            except Exception:
                counts["timeouts"] += 1
                continue
            now = time.monotonic()
            answer = cpb.Answer.FromString(msg.data)
            counts["answered"] += 1
            ok = not answer.reason
            counts["stored" if ok else "refused"] += 1
            if now >= measure_from:
                measured["answered"] += 1
                measured["stored"] += ok
                latencies.append(now - began)
    await asyncio.gather(*(worker(k) for k in range(args.inflight)))
    await nc.close()
    lat = np.asarray(latencies) * 1000
    result = {**counts, "measured_seconds": args.seconds, "measured": measured,
              "latency_ms": {p: round(float(np.percentile(lat, q)), 3) for p, q in
                             (("p50", 50), ("p99", 99), ("p999", 99.9))} if len(lat) else {}}
    with open(args.result, "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--nats", required=True)
    p.add_argument("--rooms", type=int, default=100)
    p.add_argument("--inflight", type=int, default=256)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--payload-bytes", type=int, default=50)
    p.add_argument("--result", required=True)
    args = p.parse_args()
    import uvloop
    uvloop.install()
    sys.exit(asyncio.run(main(args)))
