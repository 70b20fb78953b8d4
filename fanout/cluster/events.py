"""``fanout events``: tail the cluster's event log (the FANOUT_EVENTS stream).

Each line is one JSON object. Connect, disconnect and kick events are the
JSON the nodes wrote (``event``, ``node``, ``ts``, ``user``, ``session``...);
a room message is shown as ``{"event": "message", "room", "epoch", "seq",
"kind", "sender", "payload" | "payload_b64", "server_ts_ms"}``, decoded
from the protobuf record the router stored.
"""

from __future__ import annotations

import asyncio
import json
import sys

from nats.js import api

from ..protocol.wire import record_json
from . import subjects as S
from .connect import connect


def describe(msg) -> dict:
    """One event-log message as a JSON-able dict."""
    if msg.subject.startswith("fanout.hist."):
        m, out = record_json(msg.data)
        return {"event": "message", "room": m.room,
                "epoch": (msg.headers or {}).get(S.H_EPOCH, ""), **out}
    try:
        return json.loads(msg.data)
    except ValueError:
        return {"event": "unreadable", "subject": msg.subject}


#: How long ``fanout events`` waits for NATS before saying it is waiting.
WAIT_NOTICE_S = 3.0


async def tail(servers: str, *, since_start: bool = False, count: int = 0,
               out=sys.stdout) -> int:
    # connect() waits for NATS for as long as it takes; say so rather than
    # sit silent when nothing answers.
    connecting = asyncio.ensure_future(connect(servers, "fanout-events"))
    done, _ = await asyncio.wait({connecting}, timeout=WAIT_NOTICE_S)
    if not done:
        print(f"fanout events: no NATS answers at {servers} yet; waiting for it "
              "(Ctrl-C to stop)", file=sys.stderr, flush=True)
    nc = await connecting
    js = nc.jetstream()
    policy = api.DeliverPolicy.ALL if since_start else api.DeliverPolicy.NEW
    sub = await js.subscribe(">", stream=S.EVENT_STREAM, ordered_consumer=True,
                             deliver_policy=policy)
    seen = 0
    try:
        async for msg in sub.messages:
            print(json.dumps(describe(msg), ensure_ascii=False), file=out, flush=True)
            seen += 1
            if count and seen >= count:
                break
    finally:
        await nc.close()
    return 0


def run(servers: str, *, since_start: bool, count: int) -> int:
    try:
        return asyncio.run(tail(servers, since_start=since_start, count=count))
    except KeyboardInterrupt:
        return 130
