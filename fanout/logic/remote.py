"""The logic of a cluster node: every :class:`~fanout.logic.base.Logic` call
is a NATS request to the router that owns the room's (or user's) partition
(:mod:`fanout.router`), on the node's bus connection.

When no router answers (the bus is down, the partition's router died and
none has taken it over yet, a timeout), the call fails with
``Rejected(UNAVAILABLE)``: the client is told to retry, nothing is lost
silently. A publish that timed out may still have been stored; the client
cannot tell, which docs/cluster.md says.

After a failure the node is not ready (``/readyz``) until a router answers
again: a call that succeeds, or the probe this class sends meanwhile every
:data:`PROBE_INTERVAL` seconds to the partition that failed, so readiness
comes back with the routers even when no client calls.
"""

from __future__ import annotations

import asyncio
import json
import time

from ..cluster import subjects as S
from ..protocol import cluster_pb2 as cpb
from ..protocol import fanout_pb2 as pb
from .base import Rejected, RoomHead, check_room_name

#: Seconds between probes of the routers while they are unreachable.
PROBE_INTERVAL = 0.5


class RouterLogic:
    """:param bus: the node's :class:`~fanout.bus.nats.NatsBus` (its
        connection carries the calls).
    :param timeout: seconds a call waits for its router.
    """

    def __init__(self, bus, *, node_id: str = "", partitions: int = S.PARTITIONS,
                 timeout: float = 2.0) -> None:
        self.bus = bus
        self.node_id = node_id or bus.node_id
        self.partitions = partitions
        self.timeout = timeout
        #: When the last call failed for want of a router (monotonic), for readiness.
        self.unavailable_since: float | None = None
        #: Calls refused UNAVAILABLE so far (the node's metrics).
        self.unavailable_calls = 0
        self._probe: asyncio.Task | None = None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()

    @property
    def reachable(self) -> bool:
        """Whether the routers answered the last call (and the bus is up)."""
        return self.bus.connected and self.unavailable_since is None

    async def _call(self, subject: str, call: cpb.Call) -> cpb.Answer:
        nc = self.bus.nc
        if nc is None or not nc.is_connected:
            self._unavailable(subject)
            raise Rejected(pb.UNAVAILABLE, "the cluster bus is unreachable; retry later")
        try:
            msg = await nc.request(subject, call.SerializeToString(), timeout=self.timeout)
        except Exception as exc:               # no responders, timeout, connection lost
            self._unavailable(subject)
            why = type(exc).__name__
            raise Rejected(pb.UNAVAILABLE, f"no router answered ({why}); retry later") from None
        self.unavailable_since = None
        answer = cpb.Answer.FromString(msg.data)
        if answer.reason:
            raise Rejected(answer.reason, answer.message)
        return answer

    def _unavailable(self, subject: str) -> None:
        self.unavailable_calls += 1
        if self.unavailable_since is None:
            self.unavailable_since = time.monotonic()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._probe_until_back(subject))

    async def _probe_until_back(self, subject: str) -> None:
        """Ask the router of the failed call's partition (or any router) for
        something harmless until it answers."""
        prefix = subject.rpartition(".")[0]
        probe = (f"{prefix}.revoked" if subject.startswith(S.RPC_ANY.format(""))
                 else f"{prefix}.stats")
        while self.unavailable_since is not None:
            await asyncio.sleep(PROBE_INTERVAL)
            nc = self.bus.nc
            if nc is None or not nc.is_connected:
                continue
            try:
                await nc.request(probe, cpb.Call().SerializeToString(), timeout=self.timeout)
            except Exception:
                continue
            self.unavailable_since = None

    def _room_call(self, room: str, op: str, call: cpb.Call):
        return self._call(S.RPC.format(S.partition(room, self.partitions), op), call)

    def _user_call(self, user: str, op: str, call: cpb.Call):
        return self._call(S.RPC.format(S.partition(user, self.partitions), op), call)

    async def head(self, room: str) -> RoomHead | None:
        try:
            check_room_name(room)
        except Rejected:
            return None                  # no such room can exist
        answer = await self._room_call(room, "head", cpb.Call(room=room))
        return RoomHead(answer.epoch, answer.seq) if answer.found else None

    async def join(self, room: str) -> RoomHead:
        check_room_name(room)
        answer = await self._room_call(room, "join", cpb.Call(room=room))
        return RoomHead(answer.epoch, answer.seq)

    async def release(self, room: str) -> None:
        try:
            await self._room_call(room, "release", cpb.Call(room=room))
        except Rejected:
            pass            # the router forgets idle rooms by itself

    async def publish(self, room: str, kind: int, payload: bytes, *, sender: str,
                      priority: int = 0) -> int:
        check_room_name(room)
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise Rejected(pb.BAD_REQUEST, "payload must be bytes")
        if not 0 <= priority <= 0xFFFFFFFF:
            raise Rejected(pb.BAD_REQUEST, "priority must fit in uint32")
        answer = await self._room_call(room, "publish", cpb.Call(
            room=room, kind=kind, payload=bytes(payload), sender=sender, priority=priority))
        return answer.seq

    async def chat(self, user: str, room: str, payload: bytes) -> int:
        answer = await self._room_call(room, "chat", cpb.Call(
            room=room, payload=bytes(payload), sender=user))
        return answer.seq

    async def login(self, user: str, device_class: str, session: str, *,
                    issued_at: int | None) -> str | None:
        answer = await self._user_call(user, "login", cpb.Call(
            user=user, device_class=device_class, session=session,
            has_issued_at=issued_at is not None, issued_at=issued_at or 0))
        return answer.session or None

    async def logout(self, user: str, device_class: str, session: str) -> None:
        try:
            await self._user_call(user, "logout", cpb.Call(
                user=user, device_class=device_class, session=session))
        except Rejected:
            pass            # the login stays until replaced; harmless

    async def revoke(self, user: str, before: float) -> None:
        await self._call(S.RPC_ANY.format("revoke"), cpb.Call(user=user, before=before))

    async def revoked(self, user: str, issued_at: int | None) -> bool:
        answer = await self._call(S.RPC_ANY.format("revoked"), cpb.Call(
            user=user, has_issued_at=issued_at is not None, issued_at=issued_at or 0))
        return answer.revoked

    async def room_stats(self, room: str) -> dict | None:
        answer = await self._room_call(room, "stats", cpb.Call(room=room))
        return json.loads(answer.stats_json) if answer.found else None

    def set_degradation(self, level: int) -> None:
        """Tell the routers this node's overload level (they tighten chat by
        the highest level any node reports)."""
        nc = self.bus.nc
        if nc is not None and nc.is_connected:
            asyncio.ensure_future(nc.publish(S.DEGRADATION, cpb.Call(
                node=self.node_id, level=level).SerializeToString()))
