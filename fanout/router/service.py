"""The router service: answers nodes' calls for the partitions it owns.

Per call (subject ``fanout.rpc.<partition>.<op>``, a ``cluster.v1.Call``,
answered with a ``cluster.v1.Answer``):

* ``head``, ``join``, ``release``, ``stats``: the room's state, loaded from
  the last message JetStream holds for it when the router first touches the
  room (after a takeover, the epoch and seq continue from there);
* ``publish``, ``chat``: admission and seq assignment in the
  :class:`~fanout.logic.sequencer.Sequencer` (encoded once), then an append
  to the journal; the answer goes back when JetStream has stored it. A
  message refused by JetStream or unanswered in time is answered
  ``UNAVAILABLE`` and the room's state is read again from the stream before
  its next message, so no seq is given twice and none is skipped. The first
  append after reading a room's head goes alone, and JetStream stores it
  only if the room's last message is still the one read; the room's next
  messages wait for its outcome, then follow each other without waiting;
* ``login``, ``logout``: the one-login-per-device-class rule, kept in a KV
  bucket so a takeover keeps it;
* ``revoke``, ``revoked`` (any router, a queue group): revocations, kept in a
  KV bucket that every router watches.

Calls of one partition are handled in arrival order; the partitions a router
owns run side by side.

Losing the NATS connection (docs/cluster.md, failure semantics): the router
keeps nothing to send later, fails every append in flight (outcome unknown),
stops serving its partitions and forgets every room's state. When NATS is
back it renews its leases (or another router has them), reads each room's
head again on first use, and restarts its watch of the revocations.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

from ..cluster import history
from ..cluster import subjects as S
from ..cluster.connect import ClusterSettings, close_quietly, connect, provision
from ..cluster.journal import Ack, Journal, JournalError
from ..logic.admission import ChatAdmission
from ..logic.base import Rejected, check_room_name
from ..logic.revocations import Revocations
from ..logic.sequencer import Sequencer
from ..protocol import cluster_pb2 as cpb
from ..protocol import fanout_pb2 as pb
from .leases import Leases

log = logging.getLogger("fanout.router")

#: Seconds a node's overload level counts after it was last reported.
DEGRADATION_TTL = 60.0


def _login_key(user: str, device_class: str) -> str:
    return f"{S.token(user)}.{S.token(device_class) or '_'}"


class Router:
    """:param servers: NATS URL(s).
    :param sequencer, admission: the limits (see ``fanout router --help``).
    """

    def __init__(self, servers: str, *, router_id: str = "",
                 settings: ClusterSettings | None = None,
                 partitions: int = S.PARTITIONS, sequencer: Sequencer | None = None,
                 admission: ChatAdmission | None = None,
                 max_token_lifetime_s: float = 86_400.0,
                 ack_timeout: float = 2.0) -> None:
        self.servers = servers
        self.router_id = router_id or f"router-{os.getpid()}-{os.urandom(2).hex()}"
        self.settings = settings or ClusterSettings()
        self.partitions = partitions
        self.sequencer = sequencer if sequencer is not None else Sequencer()
        self.admission = admission if admission is not None else ChatAdmission()
        self.revocations = Revocations(max_token_lifetime_s)
        self.ack_timeout = ack_timeout
        self.nc = None
        self.journal: Journal | None = None
        self.leases: Leases | None = None
        self._subs: dict[int, object] = {}
        self._logins: dict[str, str] = {}
        self._levels: dict[str, tuple[int, float]] = {}
        self._tasks: list[asyncio.Task] = []
        self._watch: asyncio.Task | None = None
        #: Rooms whose head was just read: their next append goes alone,
        #: expecting the stream sequence read (None: the room had no history).
        self._unproven: dict[str, int | None] = {}
        #: Rooms whose first append after a head read is in flight: its outcome.
        self._probes: dict[str, asyncio.Future] = {}

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.nc = await connect(self.servers, self.router_id, on_state=self._connection,
                                buffer_offline=False)
        js = self.nc.jetstream(timeout=self.ack_timeout)
        await provision(js, self.settings)
        self.journal = Journal(self.nc, ack_timeout=self.ack_timeout)
        await self.journal.start()
        self._login_kv = await js.key_value(S.LOGIN_BUCKET)
        self._revocation_kv = await js.key_value(S.REVOCATION_BUCKET)
        self._watch = asyncio.ensure_future(self._watch_revocations(self._revocation_kv))
        await self.nc.subscribe(S.RPC_ANY.format("*"), queue=S.ROUTER_QUEUE, cb=self._call)
        await self.nc.subscribe(S.DEGRADATION, cb=self._degradation)
        self.leases = Leases(self.nc, await js.key_value(S.LEASE_BUCKET), self.router_id,
                             self.partitions, self.settings.lease_ttl_s,
                             on_gain=self._gain, on_loss=self._loss)
        await self.leases.start()
        self._tasks.append(asyncio.ensure_future(self._sweep()))
        log.info("router %s serving partitions %s", self.router_id, sorted(self.leases.owned))

    async def close(self) -> None:
        for task in [*self._tasks, self._watch]:
            if task is not None:
                task.cancel()
        if self.leases is not None:
            await self.leases.close()
        if self.journal is not None:
            await self.journal.close()
        await close_quietly(self.nc)

    async def _connection(self, connected: bool) -> None:
        if self.leases is None:
            return                       # still starting: start() fails or goes on
        if not connected:
            await self.journal.connection_lost()
            await self.leases.suspend()
            for room in list(self.sequencer.rooms):
                self.sequencer.forget(room)
            return
        # The consumer behind the watch may be gone with the server: a new
        # watch reads every revocation again (the bucket keeps the latest).
        if self._watch is not None:
            self._watch.cancel()
        self._watch = asyncio.ensure_future(self._watch_revocations(self._revocation_kv))
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.ensure_future(self.leases.resume()))

    async def _gain(self, p: int) -> None:
        self._subs[p] = await self.nc.subscribe(S.RPC.format(p, "*"), cb=self._call,
                                                pending_msgs_limit=1_000_000)

    async def _loss(self, p: int) -> None:
        sub = self._subs.pop(p, None)
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        for room in [r for r in self.sequencer.rooms if S.partition(r, self.partitions) == p]:
            self.sequencer.forget(room)
        for key in [k for k, _ in self._logins.items()
                    if S.partition(S.untoken(k.split(".")[0]), self.partitions) == p]:
            del self._logins[key]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, max(self.sequencer.idle_ttl / 2, 0.05)))
            try:
                self.sequencer.sweep()
                self.revocations.sweep()
            except Exception:
                log.exception("router sweep failed")

    # ------------------------------------------------------------ calls

    async def _call(self, msg) -> None:
        op = msg.subject.rpartition(".")[2]
        try:
            call = cpb.Call.FromString(msg.data)
            handler = self._ops.get(op)
            if handler is None:
                raise Rejected(pb.BAD_REQUEST, f"unknown call {op!r}")
            answer = await handler(self, call, msg.reply)
        except Rejected as exc:
            answer = cpb.Answer(reason=exc.reason, message=exc.message)
        except Exception as exc:
            log.exception("call %s failed", op)
            answer = cpb.Answer(reason=pb.UNAVAILABLE, message=f"router error: {exc!r}")
        if answer is not None and msg.reply:
            await self._answer(msg.reply, answer)

    async def _answer(self, reply: str, answer: cpb.Answer) -> None:
        try:
            await self.nc.publish(reply, answer.SerializeToString())
        except Exception:
            pass                         # the node times out and says UNAVAILABLE

    async def _room(self, room: str):
        """The room's state, loaded from the stream on first touch."""
        state = self.sequencer.rooms.get(room)
        if state is not None:
            return state
        try:
            last = await history.last(self.nc, room, timeout=self.ack_timeout)
        except Exception as exc:
            raise Rejected(pb.UNAVAILABLE, f"room history unreachable: {exc!r}") from None
        state = self.sequencer.rooms.get(room)      # loaded meanwhile
        if state is not None:
            return state
        if last is not None:
            self.sequencer.restore(room, last.epoch, last.seq)
            self._unproven[room] = last.stream_seq or None
        else:
            self.sequencer.ensure(room)              # no history: a new epoch
            self._unproven[room] = None
        return self.sequencer.rooms[room]

    async def _head(self, call, reply):
        state = self.sequencer.rooms.get(call.room)
        if state is None:
            last = await history.last(self.nc, call.room, timeout=self.ack_timeout)
            if last is None:
                return cpb.Answer(found=False)
            return cpb.Answer(found=True, epoch=last.epoch, seq=last.seq)
        return cpb.Answer(found=True, epoch=state.epoch, seq=state.seq)

    async def _join(self, call, reply):
        state = await self._room(call.room)
        state.holders += 1
        return cpb.Answer(epoch=state.epoch, seq=state.seq)

    async def _release(self, call, reply):
        self.sequencer.release(call.room)
        return cpb.Answer()

    async def _stats(self, call, reply):
        stats = self.sequencer.stats(call.room)
        if stats is None:
            return cpb.Answer(found=False)
        return cpb.Answer(found=True, stats_json=json.dumps(stats))

    async def _publish(self, call, reply, *, chat: bool = False):
        kind = pb.CHAT if chat else call.kind
        if chat:
            self.admission.check(call.sender, call.payload)
        self.sequencer.check(kind, call.payload, call.priority)
        room = call.room
        check_room_name(room)
        while (probe := self._probes.get(room)) is not None:
            await probe              # the room's first append after its head was read
        await self._room(room)
        if not self.nc.is_connected:
            raise Rejected(pb.UNAVAILABLE, "the router lost its NATS connection")
        epoch, seq, record, sampled = self.sequencer.assign(
            room, kind, call.payload, sender=call.sender,
            priority=call.priority)
        # After a head read (a takeover, a failure, a reconnect) the head may
        # be stale, or appends of before may still land: this one goes alone
        # and is stored only on the head read, so a later message cannot be
        # stored while this seq is not (a hole).
        first = room in self._unproven
        expect_last = self._unproven.pop(room, None)
        if first:
            probe = self._probes[room] = asyncio.get_running_loop().create_future()

        async def done(result):
            if first:
                if self._probes.get(room) is probe:
                    del self._probes[room]
                probe.set_result(None)
            if isinstance(result, Ack) and not result.duplicate:
                answer = cpb.Answer(epoch=epoch, seq=seq)
            else:
                # Not stored (or unknown): the next message of the room
                # must start from what the stream holds.
                self.sequencer.forget(room)
                why = ("another router stored this seq (ownership moved)"
                       if isinstance(result, Ack) else str(result))
                answer = cpb.Answer(reason=pb.UNAVAILABLE, message=f"not stored: {why}")
            if reply:
                await self._answer(reply, answer)
        try:
            await self.journal.append(room, epoch, seq, record, sampled, done,
                                      expect_last=expect_last)
        except JournalError as exc:
            self.sequencer.forget(room)
            if first:
                self._probes.pop(room, None)
                probe.set_result(None)
            raise Rejected(pb.UNAVAILABLE, str(exc)) from None
        return None                      # answered by ``done``

    async def _chat(self, call, reply):
        return await self._publish(call, reply, chat=True)

    async def _login(self, call, reply):
        issued_at = call.issued_at if call.has_issued_at else None
        if self.revocations.revoked(call.user, issued_at):
            raise Rejected(pb.TOKEN_REVOKED, f"this token of user {call.user} was revoked")
        key = _login_key(call.user, call.device_class)
        previous = self._logins.get(key)
        if previous is None:
            try:
                previous = (await self._login_kv.get(key)).value.decode() or None
            except Exception:
                previous = None
        await self._login_kv.put(key, call.session.encode())
        self._logins[key] = call.session
        return cpb.Answer(session=previous if previous and previous != call.session else "")

    async def _logout(self, call, reply):
        key = _login_key(call.user, call.device_class)
        holder = self._logins.get(key)
        if holder is None:
            try:
                holder = (await self._login_kv.get(key)).value.decode()
            except Exception:
                holder = None
        if holder == call.session:
            self._logins.pop(key, None)
            try:
                await self._login_kv.delete(key)
            except Exception:
                pass
        return cpb.Answer()

    async def _revoke(self, call, reply):
        self.revocations.revoke(call.user, call.before)
        before = self.revocations.before(call.user)
        if before is not None:
            await self._revocation_kv.put(S.token(call.user), repr(before).encode())
        return cpb.Answer()

    async def _revoked(self, call, reply):
        issued_at = call.issued_at if call.has_issued_at else None
        return cpb.Answer(revoked=self.revocations.revoked(call.user, issued_at))

    _ops = {"head": _head, "join": _join, "release": _release, "stats": _stats,
            "publish": _publish, "chat": _chat, "login": _login, "logout": _logout,
            "revoke": _revoke, "revoked": _revoked}

    # ------------------------------------------------------------ cluster state

    async def _watch_revocations(self, kv) -> None:
        while True:
            watcher = None
            try:
                watcher = await kv.watchall()
                async for entry in watcher:
                    if entry is None or entry.value is None or entry.operation:
                        continue
                    try:
                        self.revocations.revoke(S.untoken(entry.key), float(entry.value))
                    except ValueError:
                        pass
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("revocation watch failed; restarting it", exc_info=True)
                await asyncio.sleep(1.0)
            finally:
                if watcher is not None:
                    try:
                        await watcher.stop()
                    except Exception:
                        pass

    async def _degradation(self, msg) -> None:
        try:
            call = cpb.Call.FromString(msg.data)
        except Exception:
            return
        now = time.monotonic()
        self._levels[call.node] = (call.level, now + DEGRADATION_TTL)
        level = max((lv for lv, until in self._levels.values() if until > now), default=0)
        self.sequencer.set_degradation(min(level, 2))


def router_from_config(config, *, router_id: str = "", partitions: int = S.PARTITIONS) -> Router:
    """A router with the limits of a :class:`~fanout.server.config.NodeConfig`
    (the same settings a single node's embedded logic takes)."""
    return Router(
        config.nats, router_id=router_id, partitions=partitions,
        settings=ClusterSettings(history_per_room=config.history_per_room,
                                 replicas=config.cluster_replicas,
                                 revocation_ttl_s=config.max_token_lifetime_s),
        sequencer=Sequencer(max_publish_bytes=config.max_publish_bytes,
                            room_budget=config.room_budget,
                            chat_sample_every=config.chat_sample_every,
                            idle_ttl=config.room_idle_ttl_s),
        admission=ChatAdmission(max_chat_bytes=config.max_chat_bytes,
                                chat_rate=config.chat_rate, chat_burst=config.chat_burst),
        max_token_lifetime_s=config.max_token_lifetime_s,
        ack_timeout=config.rpc_timeout_ms / 1000)
