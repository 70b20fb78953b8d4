"""Conformance of every Logic and Bus implementation to the interfaces a node
uses (fanout/logic/base.py, fanout/bus/base.py).

Each test runs against every entry of IMPLEMENTATIONS; a new implementation
(a network bus, a router-backed logic) adds an entry and must pass them all.
Only what the interfaces promise is checked, through the interfaces alone,
with delivery awaited rather than assumed synchronous.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from fanout.bus.local import LocalBus
from fanout.logic.base import Rejected, RoomHead
from fanout.protocol import fanout_pb2 as pb
from fanout.server import config
from fanout.server.app import local_logic


class LocalImplementation:
    """The embedded pair: one in-process bus shared by every endpoint."""

    #: Rooms outlive the logic's memory of them (a stream keeps them).
    durable_history = False

    def __init__(self) -> None:
        self._bus = LocalBus()

    async def bus(self) -> LocalBus:
        """A bus endpoint on the shared medium (one per node)."""
        return self._bus

    async def logic(self, bus, **settings):
        cfg = config.load(None, env={}, overrides=settings)
        return local_logic(cfg, bus)

    async def close(self) -> None:
        await self._bus.close()


class NatsImplementation:
    """The cluster's pair: a real nats-server; each bus endpoint is its own
    connection (a node); the logic is a router reached over NATS."""

    durable_history = True

    def __init__(self) -> None:
        from fanout.cluster.natsproc import NatsServer
        self.server = NatsServer().start()
        self._routers = []

    async def bus(self):
        from fanout.bus.nats import NatsBus
        return NatsBus(self.server.url, node_id=f"n{len(self._routers)}-{id(self)}")

    async def logic(self, bus, **settings):
        from fanout.logic.remote import RouterLogic
        from fanout.router.service import router_from_config
        cfg = config.load(None, env={}, overrides={"nats": self.server.url, **settings})
        router = router_from_config(cfg)
        await router.start()
        self._routers.append(router)
        return RouterLogic(bus)

    async def close(self) -> None:
        for router in self._routers:
            await router.close()
        self.server.stop()


IMPLEMENTATIONS = {"local": LocalImplementation, "nats": NatsImplementation}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
async def impl(request):
    implementation = IMPLEMENTATIONS[request.param]()
    yield implementation
    await implementation.close()


@contextlib.asynccontextmanager
async def started(part):
    await part.start()
    try:
        yield part
    finally:
        await part.close()


class Inbox:
    """A subscriber that records what it is handed."""

    def __init__(self) -> None:
        self.got: list[tuple] = []

    def __call__(self, room, epoch, seq, record, sampled) -> None:
        self.got.append((room, epoch, seq, record, sampled))

    async def wait(self, count: int, timeout: float = 5.0) -> list[tuple]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.got) < count and loop.time() < deadline:
            await asyncio.sleep(0.005)
        return self.got

    async def quiet(self, seconds: float = 0.1) -> list[tuple]:
        """What arrived after waiting ``seconds`` for anything more."""
        await asyncio.sleep(seconds)
        return self.got


# ---------------------------------------------------------------- Bus

async def test_bus_delivers_a_room_to_its_subscribers_only_in_order(impl):
    async with started(await impl.bus()) as bus:
        inbox = Inbox()
        await bus.subscribe("a", inbox)
        for seq in range(1, 101):
            await bus.publish("a", "e1", seq, b"rec%d" % seq, seq == 7)
            await bus.publish("b", "e1", seq, b"other", False)
        got = await inbox.wait(100)
        assert [g[2] for g in got] == list(range(1, 101))
        assert all(g[0] == "a" and g[1] == "e1" for g in got)
        assert got[6] == ("a", "e1", 7, b"rec7", True) and not got[7][4]
        assert len(await inbox.quiet()) == 100
        await bus.unsubscribe("a", inbox)


async def test_bus_unsubscribe_ends_delivery(impl):
    async with started(await impl.bus()) as bus:
        inbox = Inbox()
        await bus.subscribe("a", inbox)
        await bus.publish("a", "e", 1, b"x")
        await inbox.wait(1)
        await bus.unsubscribe("a", inbox)
        await bus.publish("a", "e", 2, b"y")
        assert [g[2] for g in await inbox.quiet()] == [1]
        await bus.unsubscribe("a", inbox)          # a second time is harmless


async def test_bus_two_endpoints_hear_the_same_room(impl):
    first, second = await impl.bus(), await impl.bus()
    async with started(first), started(second):
        one, two = Inbox(), Inbox()
        await first.subscribe("live", one)
        await second.subscribe("live", two)
        for seq in range(1, 11):
            await first.publish("live", "e", seq, b"m")
        assert [g[2] for g in await one.wait(10)] == list(range(1, 11))
        assert [g[2] for g in await two.wait(10)] == list(range(1, 11))
        await second.unsubscribe("live", two)
        await first.publish("live", "e", 11, b"m")
        assert len(await one.wait(11)) == 11
        assert len(await two.quiet()) == 10
        await first.unsubscribe("live", one)


async def test_bus_publish_without_subscribers(impl):
    async with started(await impl.bus()) as bus:
        await bus.publish("nobody", "e", 1, b"x")


# ---------------------------------------------------------------- Logic

async def test_looking_creates_nothing(impl):
    bus = await impl.bus()
    async with started(bus), started(await impl.logic(bus)) as logic:
        for i in range(100):
            assert await logic.head(f"unknown-{i}") is None
            assert await logic.room_stats(f"unknown-{i}") is None
        assert await logic.head("unknown-0") is None


async def test_publish_assigns_consecutive_seqs_and_encodes_once(impl):
    bus = await impl.bus()
    async with started(bus), started(await impl.logic(bus)) as logic:
        inbox = Inbox()
        await bus.subscribe("show", inbox)
        head = await logic.join("show")
        assert isinstance(head, RoomHead) and head.epoch and head.seq == 0
        seqs = [await logic.publish("show", pb.GIFT, b"rocket", sender="gift-svc", priority=7)
                for _ in range(3)]
        seqs.append(await logic.chat("alice", "show", b"hi"))
        assert seqs == [1, 2, 3, 4]
        assert await logic.head("show") == (head.epoch, 4)
        got = await inbox.wait(4)
        assert [(g[1], g[2]) for g in got] == [(head.epoch, s) for s in seqs]
        batch = pb.Batch.FromString(b"".join(g[3] for g in got))
        assert [(m.seq, m.kind, m.sender, m.payload) for m in batch.messages] == [
            (1, pb.GIFT, "gift-svc", b"rocket"), (2, pb.GIFT, "gift-svc", b"rocket"),
            (3, pb.GIFT, "gift-svc", b"rocket"), (4, pb.CHAT, "alice", b"hi")]
        assert batch.messages[0].priority == 7 and batch.messages[0].server_ts_ms > 0
        await bus.unsubscribe("show", inbox)
        await logic.release("show")


@pytest.mark.parametrize("args, reason", [
    (("r", 9, b"x"), pb.BAD_REQUEST),                      # unknown kind
    (("r", pb.CHAT, "text"), pb.BAD_REQUEST),              # payload not bytes
    (("", pb.CHAT, b"x"), pb.BAD_REQUEST),                 # empty room name
    (("r" * 129, pb.CHAT, b"x"), pb.BAD_REQUEST),          # room name too long
    (("r", pb.GIFT, b"x" * 101), pb.MESSAGE_TOO_LARGE),
])
async def test_publish_refusals(impl, args, reason):
    bus = await impl.bus()
    async with started(bus), started(await impl.logic(bus, max_publish_bytes=100)) as logic:
        with pytest.raises(Rejected) as err:
            await logic.publish(*args, sender="svc")
        assert err.value.reason == reason
        with pytest.raises(Rejected) as err:
            await logic.publish("r", pb.GIFT, b"x", sender="svc", priority=2**32)
        assert err.value.reason == pb.BAD_REQUEST
        assert await logic.head(args[0]) is None           # a refusal creates nothing


async def test_chat_size_and_rate_limits(impl):
    bus = await impl.bus()
    async with started(bus), started(await impl.logic(
            bus, max_chat_bytes=10, chat_rate=1, chat_burst=3)) as logic:
        await logic.join("r")
        with pytest.raises(Rejected) as err:
            await logic.chat("bob", "r", b"x" * 11)
        assert err.value.reason == pb.MESSAGE_TOO_LARGE
        assert [await logic.chat("bob", "r", b"hi") for _ in range(3)] == [1, 2, 3]
        with pytest.raises(Rejected) as err:
            await logic.chat("bob", "r", b"hi")
        assert err.value.reason == pb.RATE_LIMITED
        assert await logic.chat("carol", "r", b"hi") == 4   # per user
        await logic.release("r")


async def test_one_login_per_user_and_device_class(impl):
    bus = await impl.bus()
    async with started(bus), started(await impl.logic(bus)) as logic:
        assert await logic.login("zoe", "mobile", "s1", issued_at=None) is None
        assert await logic.login("zoe", "web", "s2", issued_at=None) is None
        assert await logic.login("zoe", "mobile", "s3", issued_at=None) == "s1"
        await logic.logout("zoe", "mobile", "s1")           # not the holder: no effect
        assert await logic.login("zoe", "mobile", "s4", issued_at=None) == "s3"
        await logic.logout("zoe", "mobile", "s4")
        assert await logic.login("zoe", "mobile", "s5", issued_at=None) is None


async def test_revoke_refuses_older_tokens_at_login_and_refresh(impl):
    # Issue 8 item 5: tokens of a user issued before T (or without iat) are
    # refused at Hello (login) and at Refresh (revoked); later tokens and
    # other users are not.
    import time
    bus = await impl.bus()
    async with started(bus), started(await impl.logic(bus)) as logic:
        now = int(time.time())
        assert await logic.login("max", "web", "s1", issued_at=now - 100) is None
        assert not await logic.revoked("max", now - 100)
        await logic.revoke("max", now - 50)
        for issued_at in (now - 100, now - 51, None):
            assert await logic.revoked("max", issued_at)
            with pytest.raises(Rejected) as err:
                await logic.login("max", "mobile", "s2", issued_at=issued_at)
            assert err.value.reason == pb.TOKEN_REVOKED
        assert not await logic.revoked("max", now - 50)           # issued at T: not before it
        assert not await logic.revoked("other", None)
        # a refused login records nothing: the next good one replaces s1 only
        assert await logic.login("max", "web", "s3", issued_at=now) == "s1"
        # an earlier T never narrows a later one; a later one widens it
        await logic.revoke("max", now - 80)
        assert await logic.revoked("max", now - 60)
        await logic.revoke("max", now + 10)
        assert await logic.revoked("max", now)
        assert not await logic.revoked("max", now + 10)


async def test_revocations_end_when_every_covered_token_has(impl):
    # Bounded memory: a revocation is kept for max_token_lifetime_s after its
    # T; by then every token issued before T has expired (the node refuses
    # longer-lived ones), so it may go. A token without iat shows it went.
    import time
    bus = await impl.bus()
    async with started(bus), started(await impl.logic(bus, max_token_lifetime_s=1)) as logic:
        await logic.revoke("old", time.time() - 5)         # already moot: nothing to keep
        assert not await logic.revoked("old", None)
        await logic.revoke("kim", time.time())
        assert await logic.revoked("kim", None)
        await asyncio.sleep(1.2)
        assert not await logic.revoked("kim", None)


async def test_room_budget_samples_chat_never_gifts(impl):
    bus = await impl.bus()
    async with started(bus), started(await impl.logic(
            bus, room_budget=20, chat_sample_every=5)) as logic:
        inbox = Inbox()
        await bus.subscribe("hot", inbox)
        await logic.join("hot")
        outcomes = []
        for i in range(100):
            try:
                await logic.publish("hot", pb.CHAT, b"c", sender="u")
                outcomes.append("chat")
            except Rejected as exc:
                assert exc.reason == pb.ROOM_OVERLOADED
                outcomes.append("dropped")
        gift_seq = await logic.publish("hot", pb.GIFT, b"g", sender="svc")
        kept = outcomes.count("chat")
        assert 20 <= kept <= 20 + 80 // 5 + 1 and "dropped" in outcomes
        assert gift_seq == kept + 1                         # dropped chat got no seq
        got = await inbox.wait(kept + 1)
        assert [g[2] for g in got] == list(range(1, kept + 2))
        # each message after dropped chat says so, and only those
        after_drop = [outcomes[i - 1] == "dropped" for i in range(1, len(outcomes))
                      if outcomes[i] == "chat"] + [outcomes[-1] == "dropped"]
        assert [g[4] for g in got][-len(after_drop):] == after_drop and any(after_drop)
        stats = await logic.room_stats("hot")
        assert stats["degraded"]["chat"] == outcomes.count("dropped")
        assert stats["degraded"]["gift"] == 0
        await bus.unsubscribe("hot", inbox)
        await logic.release("hot")


async def test_degradation_tightens_chat_only(impl):
    bus = await impl.bus()
    async with started(bus), started(await impl.logic(bus, room_budget=100)) as logic:
        await logic.join("r")
        loop = asyncio.get_running_loop()
        # The budget refills from the moment the level changes, which for a
        # router is when the hint arrives: count the refill from before it.
        began = loop.time()
        logic.set_degradation(2)
        await asyncio.sleep(0.1)          # a hint: a router hears it over the bus
        kept = 0
        for _ in range(200):
            try:
                await logic.publish("r", pb.CHAT, b"c", sender="u")
                kept += 1
            except Rejected:
                pass
        refill = 25 * (loop.time() - began)   # a quarter of the budget per second, meanwhile
        assert 20 <= kept <= 30 + refill                   # a quarter of the budget, none over
        for _ in range(50):
            await logic.publish("r", pb.SYSTEM, b"s", sender="svc")
        logic.set_degradation(0)
        await logic.release("r")


async def test_state_lives_while_held_and_is_forgotten_when_idle(impl):
    bus = await impl.bus()
    async with started(bus), started(await impl.logic(bus, room_idle_ttl_s=0.2)) as logic:
        # joined and released, never published: nothing to keep
        await logic.join("passing")
        await logic.release("passing")
        assert await logic.head("passing") is None
        # held: kept however idle, so a room's seqs never restart under its members
        head = await logic.join("held")
        await logic.publish("held", pb.GIFT, b"g", sender="svc")
        await asyncio.sleep(0.6)
        assert await logic.head("held") == (head.epoch, 1)
        # published to, no one holds it: kept for resumes, then forgotten when idle
        await logic.publish("orphan", pb.SYSTEM, b"s", sender="svc")
        assert (await logic.head("orphan")).seq == 1
        await logic.release("held")
        assert (await logic.head("held")).seq == 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not impl.durable_history and loop.time() < deadline and (
                await logic.head("orphan") is not None or await logic.head("held") is not None):
            await asyncio.sleep(0.05)
        if impl.durable_history:
            # The cluster's logic forgets idle rooms too, but their history
            # stays in JetStream: the room continues where it was.
            assert await logic.head("held") == (head.epoch, 1)
            assert (await logic.join("held")) == (head.epoch, 1)
            await logic.release("held")
            return
        assert await logic.head("orphan") is None and await logic.head("held") is None
        # made again: a new epoch, so old seqs are not mistaken for new ones
        assert (await logic.join("held")).epoch != head.epoch
        await logic.release("held")
