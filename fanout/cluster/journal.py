"""Where a room message is stored in the cluster: an append to the history
stream, pipelined.

Each append is a NATS publish with a reply subject under one inbox of the
journal, so any number are in flight at once on the one connection and
JetStream stores them in the order they were sent. The ack (or refusal)
comes back on that inbox and runs the append's callback; an append with no
answer within ``ack_timeout`` fails with :class:`JournalError`.

Every message carries ``Nats-Msg-Id: <room token>:<epoch>:<seq>``, so
within the stream's duplicate window a (room, epoch, seq) is stored at most
once: if two routers ever assign one seq (a lease handed over while its old
holder still ran), the second append is answered ``duplicate`` and is not
stored, nor republished to any node.

An append may also carry the stream sequence the room's last message must
have (``Nats-Expected-Last-Subject-Sequence``): JetStream refuses it if
anything else is there. A router sends the first message of a room after
reading the room's head this way, so a stale head (a lagging replica, an
append of the old owner landing late) is refused instead of overwritten.

When the connection breaks, every append in flight fails at once
(:meth:`Journal.connection_lost`): their outcome is unknown, and the owner
must read the room's head again before its next message.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Awaitable, Callable, NamedTuple

from . import subjects as S


class Ack(NamedTuple):
    stream_seq: int
    duplicate: bool


class JournalError(Exception):
    """The append was not stored (or its outcome is unknown: a timeout)."""


#: ``done(result)``: an :class:`Ack` or a :class:`JournalError`; may return
#: an awaitable, which the journal awaits.
Done = Callable[[object], Awaitable[None] | None]


#: JetStream's check of the subject's last stream sequence.
H_EXPECT_LAST = "Nats-Expected-Last-Subject-Sequence"


def headers(room: str, epoch: str, seq: int, sampled: bool,
            expect_last: int | None = None) -> dict:
    h = {S.H_EPOCH: epoch, S.H_SEQ: str(seq), S.H_MSG_ID: f"{S.token(room)}:{epoch}:{seq}"}
    if sampled:
        h[S.H_SAMPLED] = "1"
    if expect_last is not None:
        h[H_EXPECT_LAST] = str(expect_last)
    return h


class Journal:
    def __init__(self, nc, *, ack_timeout: float = 2.0) -> None:
        self.nc = nc
        self.ack_timeout = ack_timeout
        self._prefix = ""
        self._ids = itertools.count(1)
        self._waiting: dict[str, tuple[float, Done]] = {}
        self._sub = None
        self._timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        self._prefix = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._prefix + ".*", cb=self._on_ack)
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(self.ack_timeout / 4, self._expire)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._fail_all("the journal closed")

    async def append(self, room: str, epoch: str, seq: int, record: bytes, sampled: bool,
                     done: Done, *, expect_last: int | None = None) -> None:
        """Send one message to the history stream; ``done`` gets the outcome.
        Raises :class:`JournalError` at once when not connected (nothing sent).

        :param expect_last: the stream sequence of the room's last stored
            message; JetStream refuses the append if it is not that."""
        if not self.nc.is_connected:
            raise JournalError("not connected to NATS")
        token = str(next(self._ids))
        self._waiting[token] = (self._loop.time() + self.ack_timeout, done)
        try:
            await self.nc.publish(S.history_subject(room), record,
                                  reply=f"{self._prefix}.{token}",
                                  headers=headers(room, epoch, seq, sampled, expect_last))
        except Exception as exc:
            self._waiting.pop(token, None)
            raise JournalError(f"publish failed: {exc!r}") from exc

    async def store(self, room: str, epoch: str, seq: int, record: bytes,
                    sampled: bool = False) -> Ack:
        """:meth:`append` and wait for the outcome."""
        future = asyncio.get_running_loop().create_future()

        def done(result):
            if not future.done():
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        await self.append(room, epoch, seq, record, sampled, done)
        return await future

    async def _on_ack(self, msg) -> None:
        entry = self._waiting.pop(msg.subject.rpartition(".")[2], None)
        if entry is None:
            return                                   # expired already
        status = (msg.headers or {}).get("Status") if msg.headers else None
        if status:
            result: object = JournalError(f"JetStream answered status {status} "
                                          "(no stream: JetStream unavailable)")
        else:
            try:
                answer = json.loads(msg.data)
            except ValueError:
                answer = {"error": {"description": "unreadable ack"}}
            error = answer.get("error")
            if error:
                result = JournalError(f"JetStream refused the message: "
                                      f"{error.get('description', error)}")
            else:
                result = Ack(int(answer.get("seq", 0)), bool(answer.get("duplicate")))
        await self._run(entry[1], result)

    @staticmethod
    async def _run(done: Done, result) -> None:
        outcome = done(result)
        if outcome is not None:
            await outcome

    def _expire(self) -> None:
        self._timer = self._loop.call_later(self.ack_timeout / 4, self._expire)
        now = self._loop.time()
        late = [t for t, (deadline, _) in self._waiting.items() if deadline <= now]
        if late:
            asyncio.ensure_future(self._fail(late, "no answer from JetStream in time "
                                             "(the message may or may not be stored)"))

    async def _fail(self, tokens, why: str) -> None:
        for token in tokens:
            entry = self._waiting.pop(token, None)
            if entry is not None:
                await self._run(entry[1], JournalError(why))

    async def connection_lost(self) -> None:
        """The connection broke: fail every append in flight now rather than
        at its timeout (stored or not, nobody can tell yet)."""
        await self._fail_all("the NATS connection was lost "
                             "(the message may or may not be stored)")

    async def _fail_all(self, why: str) -> None:
        await self._fail(list(self._waiting), why)
