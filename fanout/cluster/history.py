"""Reading a room's history from JetStream: batched direct gets on the
history stream (one request, up to ``batch`` messages of one subject, served
by any replica), for a node filling a hole in what it received, for resumes
older than a node's ring, and for the admin API's history endpoint.
"""

from __future__ import annotations

import asyncio
import json
from typing import NamedTuple

from . import subjects as S

#: Messages per direct-get request.
BATCH = 256


class Stored(NamedTuple):
    """One room message as JetStream holds it."""
    stream_seq: int
    epoch: str
    seq: int
    record: bytes
    sampled: bool


def stored(msg, stream_seq: int | None = None) -> Stored | None:
    """The :class:`Stored` of a NATS message carrying a room message (a
    republished one or a direct-get reply); None if it is not one."""
    headers = msg.headers
    if not headers or S.H_SEQ not in headers:
        return None
    if stream_seq is None:
        stream_seq = int(headers.get(S.H_STREAM_SEQ, 0))
    return Stored(stream_seq, headers.get(S.H_EPOCH, ""), int(headers[S.H_SEQ]),
                  msg.data or b"", headers.get(S.H_SAMPLED) == "1")


async def read(nc, room: str, *, from_stream_seq: int = 1, after_seq: int = 0,
               until_seq: int | None = None, timeout: float = 2.0) -> list[Stored]:
    """The room's stored messages from stream sequence ``from_stream_seq``
    on with ``after_seq < seq <= until_seq``, in order. A room keeps at most
    ``history_per_room`` messages, which bounds the answer. Raises on a NATS
    failure: the caller decides what unavailable history means."""
    subject = S.history_subject(room)
    out: list[Stored] = []
    start = max(1, from_stream_seq)
    while True:
        batch = await _direct_batch(nc, subject, start, BATCH, timeout)
        out.extend(item for item in batch
                   if item.seq > after_seq and (until_seq is None or item.seq <= until_seq))
        if len(batch) < BATCH or (until_seq is not None and batch[-1].seq >= until_seq):
            return out
        start = batch[-1].stream_seq + 1


async def last(nc, room: str, timeout: float = 2.0) -> Stored | None:
    """The room's last stored message, or None (no history)."""
    subject = S.history_subject(room)
    msg = await nc.request(f"$JS.API.DIRECT.GET.{S.HISTORY_STREAM}.{subject}", b"",
                           timeout=timeout)
    status = (msg.headers or {}).get("Status")
    if status == "404":
        return None
    if status:
        raise RuntimeError(f"direct get of {subject}: status {status} "
                           f"{(msg.headers or {}).get('Description', '')}")
    return stored(msg)


async def _direct_batch(nc, subject: str, start: int, batch: int,
                        timeout: float) -> list[Stored]:
    inbox = nc.new_inbox()
    got: list[Stored] = []
    done = asyncio.get_running_loop().create_future()

    async def on_msg(msg):
        headers = msg.headers or {}
        status = headers.get("Status")
        if status:
            if not done.done():
                if status in ("204", "404"):          # end of batch / nothing there
                    done.set_result(None)
                else:
                    done.set_exception(RuntimeError(
                        f"direct get of {subject}: status {status} "
                        f"{headers.get('Description', '')}"))
            return
        item = stored(msg)
        if item is not None:
            got.append(item)
        if len(got) >= batch and not done.done():
            done.set_result(None)

    sub = await nc.subscribe(inbox, cb=on_msg)
    try:
        request = json.dumps({"seq": start, "next_by_subj": subject, "batch": batch})
        await nc.publish(f"$JS.API.DIRECT.GET.{S.HISTORY_STREAM}", request.encode(),
                         reply=inbox)
        await asyncio.wait_for(done, timeout)
    finally:
        await sub.unsubscribe()
    return got
