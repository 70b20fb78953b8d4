"""The embedded logic: a :class:`~fanout.logic.base.Logic` in the node's own
process, made of the parts a cluster deploys differently: the
:class:`~.sequencer.Sequencer` (seqs, budgets, encoding), the
:class:`~.admission.ChatAdmission` (per-user limits), the
:class:`~.logins.LoginRegistry` and the :class:`~.revocations.Revocations`.
Messages leave through the bus it is given.

Every coroutine here completes without suspending (until the bus does), so
an in-process node pays no task switch for its logic.
"""

from __future__ import annotations

import asyncio
import logging

from ..bus.base import Bus
from ..protocol import fanout_pb2 as pb
from .admission import ChatAdmission
from .base import Rejected, RoomHead
from .logins import LoginRegistry
from .revocations import Revocations
from .sequencer import Sequencer

log = logging.getLogger("fanout.logic")

#: Shortest time between two logged sweep failures, seconds.
SWEEP_FAILURE_LOG_INTERVAL = 60.0

#: Longest time between sweeps of idle room state, seconds; a short
#: ``idle_ttl`` sweeps more often (twice per ttl).
SWEEP_INTERVAL = 10.0


class LocalLogic:
    """:param bus: where published messages go.
    :param sequencer, admission, logins, revocations: the parts (defaults:
        default limits; revocations kept a day).
    """

    reachable = True           # in process: always

    def __init__(self, bus: Bus, *, sequencer: Sequencer | None = None,
                 admission: ChatAdmission | None = None,
                 logins: LoginRegistry | None = None,
                 revocations: Revocations | None = None) -> None:
        self.bus = bus
        self.sequencer = sequencer if sequencer is not None else Sequencer()
        self.admission = admission if admission is not None else ChatAdmission()
        self.logins = logins if logins is not None else LoginRegistry()
        self.revocations = revocations if revocations is not None else Revocations(86_400.0)
        self._timer: asyncio.TimerHandle | None = None
        self._sweep_failures = 0
        self._failure_logged_at = float("-inf")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        every = min(SWEEP_INTERVAL, max(self.sequencer.idle_ttl / 2, 0.05))

        def sweep() -> None:
            # Rescheduled whatever the sweep does: one exception must not
            # leave idle room state to pile up for the process's life.
            try:
                self.sequencer.sweep()
                self.revocations.sweep()
            except Exception:
                self._sweep_failed(loop.time())
            finally:
                if self._timer is not None:       # not closed meanwhile
                    self._timer = loop.call_later(every, sweep)
        self._timer = loop.call_later(every, sweep)

    def _sweep_failed(self, now: float) -> None:
        # Throttled by hand: the logic layer sits below the server's logutil.
        self._sweep_failures += 1
        if now - self._failure_logged_at >= SWEEP_FAILURE_LOG_INTERVAL:
            self._failure_logged_at = now
            log.error("room state sweep failed (%d failures since the last line)",
                      self._sweep_failures, exc_info=True)
            self._sweep_failures = 0

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def head(self, room: str) -> RoomHead | None:
        return self.sequencer.head(room)

    async def join(self, room: str) -> RoomHead:
        return self.sequencer.hold(room)

    async def release(self, room: str) -> None:
        self.sequencer.release(room)

    async def publish(self, room: str, kind: int, payload: bytes, *, sender: str,
                      priority: int = 0) -> int:
        epoch, seq, record, sampled = self.sequencer.assign(
            room, kind, payload, sender=sender, priority=priority)
        await self.bus.publish(room, epoch, seq, record, sampled)
        return seq

    async def chat(self, user: str, room: str, payload: bytes) -> int:
        self.admission.check(user, payload)
        return await self.publish(room, pb.CHAT, payload, sender=user)

    async def login(self, user: str, device_class: str, session: str, *,
                    issued_at: int | None) -> str | None:
        if self.revocations.revoked(user, issued_at):
            raise Rejected(pb.TOKEN_REVOKED, f"this token of user {user} was revoked")
        return self.logins.login(user, device_class, session)

    async def logout(self, user: str, device_class: str, session: str) -> None:
        self.logins.logout(user, device_class, session)

    async def revoke(self, user: str, before: float) -> None:
        self.revocations.revoke(user, before)

    async def revoked(self, user: str, issued_at: int | None) -> bool:
        return self.revocations.revoked(user, issued_at)

    async def room_stats(self, room: str) -> dict | None:
        return self.sequencer.stats(room)

    def set_degradation(self, level: int) -> None:
        self.sequencer.set_degradation(level)
