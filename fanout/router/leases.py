"""Which router owns which partition: leases in a JetStream KV bucket.

Partition ``p`` belongs to the router whose id is the value of key ``p<p>``.
The owner renews the key every ``ttl / 3`` seconds with an expected-revision
update; the bucket's max age is ``ttl``, so a router that dies (or loses
NATS) stops renewing and its keys vanish after at most ``ttl``. Any router
then creates the key (create fails if it exists) and owns the partition.

Routers announce themselves on a heartbeat subject; each takes at most its
fair share (partitions / live routers) and gives back what is over it, so a
router that joins gets partitions without a restart. A partition nobody took
for two rounds is taken by anyone, whatever the shares.

A router that loses its NATS connection stops serving every partition at
once (:meth:`Leases.suspend`): while it is away its leases may expire and
another router may take them, and it must not answer for them when it is
back until it has renewed them. When the connection returns
(:meth:`Leases.resume`) a round runs at once; a key that still names this
router (its lease did not expire, or a renewal of it landed late) is taken
back at its current revision.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Awaitable, Callable

from nats.js.errors import KeyValueError

log = logging.getLogger("fanout.router.leases")

HEARTBEAT = "fanout.router.heartbeat"


class Leases:
    def __init__(self, nc, kv, router_id: str, partitions: int, ttl: float, *,
                 on_gain: Callable[[int], Awaitable[None]],
                 on_loss: Callable[[int], Awaitable[None]]) -> None:
        self.nc = nc
        self.kv = kv
        self.router_id = router_id
        self.partitions = partitions
        self.ttl = ttl
        self.on_gain = on_gain
        self.on_loss = on_loss
        self.owned: dict[int, int] = {}        # partition -> KV revision
        self._routers: dict[str, float] = {}   # router id -> last heartbeat
        self._free_rounds: dict[int, int] = {}
        self._task: asyncio.Task | None = None
        self._sub = None
        self._lock = asyncio.Lock()             # one round at a time
        self._suspended_at: float | None = None
        self._wanting = False                   # below the fair share at the last round

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(HEARTBEAT, cb=self._heartbeat)
        await self._beat()
        await self.round()
        self._task = asyncio.ensure_future(self._run())

    async def _heartbeat(self, msg) -> None:
        self._routers[msg.data.decode()] = time.monotonic()

    async def _beat(self) -> None:
        self._routers[self.router_id] = time.monotonic()
        if self.nc.is_connected:
            await self.nc.publish(HEARTBEAT, self.router_id.encode())

    def live_routers(self) -> int:
        horizon = time.monotonic() - self.ttl
        return sum(1 for seen in self._routers.values() if seen > horizon)

    async def _run(self) -> None:
        while True:
            # Below its share (a router joined, or one gave partitions
            # back), a router looks again soon: a partition given back has
            # no server until someone takes it.
            await asyncio.sleep(self.ttl / 3 if not self._wanting else min(self.ttl / 3, 0.2))
            try:
                await self._beat()
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("lease round failed", exc_info=True)

    async def suspend(self) -> None:
        """The connection is lost: serve nothing until the leases are renewed."""
        if self._suspended_at is None:
            self._suspended_at = time.monotonic()
        for p in list(self.owned):
            await self._lose(p)

    async def resume(self) -> None:
        """The connection is back: renew or take partitions now."""
        if self._suspended_at is not None:
            # Heartbeats went unheard while this router was away, not
            # unsent: the routers it knew count as live for another ttl, or
            # it would take every partition (a share of all) and give most
            # back a round later, each without a server meanwhile.
            away = time.monotonic() - self._suspended_at
            self._suspended_at = None
            for router in self._routers:
                self._routers[router] += away
        self._routers[self.router_id] = time.monotonic()
        try:
            await self._beat()
            await self.round()
        except Exception:
            log.warning("lease round after reconnecting failed", exc_info=True)

    async def round(self) -> None:
        """Renew what is owned, give back what is over the share, take what
        is free."""
        if not self.nc.is_connected:
            return                               # suspended; resume() runs one
        async with self._lock:
            await self._round()

    async def _round(self) -> None:
        for p, revision in list(self.owned.items()):
            try:
                self.owned[p] = await self.kv.update(f"p{p}", self.router_id.encode(),
                                                     last=revision)
            except Exception as exc:
                log.warning("router %s lost partition %d (%r)", self.router_id, p, exc)
                await self._lose(p)
        share = math.ceil(self.partitions / max(1, self.live_routers()))
        while len(self.owned) > share:
            p = max(self.owned)
            revision = self.owned[p]
            await self._lose(p)
            try:
                await self.kv.delete(f"p{p}", last=revision)
            except Exception:
                pass
        for p in range(self.partitions):
            if p in self.owned:
                continue
            try:
                entry = await self.kv.get(f"p{p}")
                holder = entry.value
            except KeyValueError:
                entry = holder = None
            if holder == self.router_id.encode():
                # This router's own lease, from before a disconnect: take it
                # back at its current revision, or give it back now.
                if len(self.owned) >= share:
                    try:
                        await self.kv.delete(f"p{p}", last=entry.revision)
                    except Exception:
                        pass
                    continue
                try:
                    self.owned[p] = await self.kv.update(f"p{p}", holder, last=entry.revision)
                except KeyValueError:
                    continue
                self._free_rounds.pop(p, None)
                log.info("router %s owns partition %d again", self.router_id, p)
                await self.on_gain(p)
                continue
            if holder:
                self._free_rounds.pop(p, None)
                continue
            rounds = self._free_rounds[p] = self._free_rounds.get(p, 0) + 1
            if len(self.owned) >= share and rounds < 3:
                continue
            try:
                revision = await self.kv.create(f"p{p}", self.router_id.encode())
            except KeyValueError:
                continue                         # someone else was quicker
            self.owned[p] = revision
            self._free_rounds.pop(p, None)
            log.info("router %s owns partition %d", self.router_id, p)
            await self.on_gain(p)
        self._wanting = len(self.owned) < share

    async def _lose(self, p: int) -> None:
        if self.owned.pop(p, None) is not None:
            await self.on_loss(p)

    async def close(self) -> None:
        """Give every partition back at once, so others take them now rather
        than after the ttl."""
        if self._task is not None:
            self._task.cancel()
        for p, revision in list(self.owned.items()):
            await self._lose(p)
            try:
                await self.kv.delete(f"p{p}", last=revision)
            except Exception:
                pass
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
