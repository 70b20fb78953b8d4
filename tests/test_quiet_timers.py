"""The node's periodic work in slices (issue 10, quiet rooms): the timeout
sweep visits a slice of the sessions per timer run yet checks each one
within its bound, and presence frames are spread over the period instead of
written to every room in one loop turn."""

from __future__ import annotations

import math
import random
import threading
import time

from conftest import token
from fanout.bus.local import LocalBus
from fanout.protocol import fanout_pb2 as pb
from fanout.server import config
from fanout.server.app import local_logic
from fanout.server.metrics import NodeMetrics
from fanout.server.node import PASS_SLICES, SWEEP_INTERVAL, SWEEP_SLICES, Node
from rawclient import FT, RawClient


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now


class Checked:
    """The part of a core connection the sweep reads; records each check
    (the sweep reads ``last_recv`` once per visit of an authenticated session)."""

    def __init__(self, log: list, clock: Clock) -> None:
        self.backlog_bytes = 0
        self.bytes_sent = 0
        self.closing = False
        self._log = log
        self._clock = clock

    @property
    def last_recv(self) -> float:
        self._log.append(self._clock.now)
        return self._clock.now            # never idle: only the visits are counted


class Claims:
    expires_at = 1 << 40


class Member:
    """A session as the sweep sees it (no socket: the sweep's bookkeeping is
    what is tested here; the real timeouts are tested against a node below)."""

    def __init__(self, clock: Clock, born: float) -> None:
        self.checks: list[float] = []
        self.conn = Checked(self.checks, clock)
        self.user = "u"
        self.claims = Claims()
        self.sent_mark = 0
        self.idle_s = 0.0                  # the node's idle_timeout_ms
        self.born = born

    @property
    def closing(self) -> bool:
        return self.conn.closing


def _sweep_node() -> tuple[Node, Clock]:
    cfg = config.load(None, env={}, overrides={"port": 0, "admin_port": -1})
    bus = LocalBus()
    node = Node(cfg, metrics=NodeMetrics(), bus=bus, logic=local_logic(cfg, bus))
    clock = node.loop = Clock()
    return node, clock


def test_sweep_slices_check_every_session_within_its_bound_under_churn():
    """6,000 slices (300 s) of a node whose sessions come and go: bursts of
    hundreds of new ones, 90% of them leaving at once, steady trickles. No
    slice visits more than the step of its pass (a pass's size over
    PASS_SLICES), each session is checked again within PASS_SLICES + 1 slices
    and a new one first within 2 * PASS_SLICES slices: inside one
    SWEEP_INTERVAL, the bound of the single scan a second it replaces."""
    node, clock = _sweep_node()
    slice_s = SWEEP_INTERVAL / SWEEP_SLICES
    rng = random.Random(7)
    live: list[Member] = []
    gone: list[Member] = []
    serial = 0
    biggest = 0
    for i in range(6000):
        phase = (i // 300) % 4
        if phase == 0 and i % 300 < 20:
            adds = rng.randint(100, 400)          # a connect burst
        elif phase == 1:
            adds = rng.randint(0, 3)
        else:
            adds = rng.randint(0, 30)
        for _ in range(adds):
            serial += 1
            member = Member(clock, clock.now)
            node.sessions[str(serial)] = member
            live.append(member)
        if phase == 2 and i % 300 == 150 and live:
            keep = len(live) // 10                # 90% leave, the oldest stay
            leaving, live = live[keep:], live[:keep]
        else:
            leaving = [m for m in live if rng.random() < 0.01]
            live = [m for m in live if m not in set(leaving)]
        for member in leaving:
            member.conn.closing = True
            gone.append(member)
        node.sessions = {k: m for k, m in node.sessions.items() if not m.closing}
        biggest = max(biggest, len(node.sessions))
        visits_before = sum(len(m.checks) for m in live)
        node._sweep_slice()
        visited = sum(len(m.checks) for m in live) - visits_before
        assert visited <= math.ceil(biggest / PASS_SLICES), (i, visited, biggest)
        clock.now += slice_s
    assert biggest > 2000 and len(gone) > 1000
    end = clock.now
    for member in live + gone:
        stops = member.checks + ([] if member.closing else [end])
        first = member.born
        for at in stops:
            limit = (2 * PASS_SLICES if first == member.born else PASS_SLICES + 1) * slice_s
            assert at - first <= limit + 1e-6, (member.born, first, at)
            first = at
    assert (PASS_SLICES + 1) * slice_s <= SWEEP_INTERVAL and 2 * PASS_SLICES * slice_s <= SWEEP_INTERVAL


def test_sweep_slice_sums_the_draining_backlog_of_a_whole_pass():
    """The overload tick reads the backlog of the last complete pass: the
    backlogs of connections that sent something since their last check."""
    node, clock = _sweep_node()
    members = [Member(clock, clock.now) for _ in range(50)]
    for n, member in enumerate(members):
        node.sessions[str(n)] = member
        member.conn.backlog_bytes = 100
        member.conn.bytes_sent = 10            # sent since the (zero) mark: draining
    members[0].conn.bytes_sent = 0             # stuck: its own problem, not load
    for _ in range(PASS_SLICES + 1):
        node._sweep_slice()
    assert node._backlog == 49 * 100


def _collect(client: RawClient, until: float, out: list) -> None:
    while time.monotonic() < until:
        item = client.next(timeout=max(0.01, until - time.monotonic()))
        if item is None:
            if client.closed:
                return
            continue
        out.append((time.monotonic(), *item))


def test_presence_frames_are_spread_over_the_period(start_node):
    """Four rooms, presence every 800 ms: each member gets its room's count,
    and the rooms' frames leave at different moments of the period (about
    0.8 * 800 / 4 = 160 ms apart), not all in one loop turn."""
    node = start_node("--presence-interval-ms", "800")
    clients = []
    for room, n in (("p0", 2), ("p1", 1), ("p2", 1), ("p3", 1)):
        for k in range(n):
            c = RawClient(node.host, node.port)
            c.hello(token(f"{room}-{k}"))
            assert c.join(room).room == room
            clients.append((room, c))
    until = time.monotonic() + 2.0
    frames: dict[int, list] = {i: [] for i in range(len(clients))}
    threads = [threading.Thread(target=_collect, args=(c, until, frames[i]))
               for i, (_, c) in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first: dict[str, float] = {}
    for i, (room, _) in enumerate(clients):
        presence = [(at, msg) for at, ftype, msg in frames[i] if ftype == FT.PRESENCE]
        assert presence, f"no Presence for a member of {room}"
        at, msg = presence[0]
        assert isinstance(msg, pb.Presence) and msg.room == room
        assert msg.online == (2 if room == "p0" else 1)
        first[room] = min(first.get(room, at), at)
    # The first period's frames: within one period, and spread across it.
    times = sorted(first.values())
    assert times[-1] - times[0] >= 0.2, times
    assert times[-1] - times[0] <= 0.8, times


def test_idle_timeouts_fire_within_one_second_of_their_deadline(start_node):
    """Silent connections opened at different moments of the sweep's passes
    are each cut between idle_timeout_ms and one second after it."""
    node = start_node("--ping-interval-ms", "200", "--idle-timeout-ms", "700")
    results: list[tuple[float, list]] = [None] * 6

    def one(i: int) -> None:
        time.sleep(i * 0.17)
        c = RawClient(node.host, node.port)
        assert isinstance(c.hello(token(f"quiet-{i}")), pb.AuthOk)
        start = time.monotonic()
        frames = c.until_closed(timeout=10)
        results[i] = (time.monotonic() - start, frames)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for elapsed, frames in results:
        kicks = [m for t, m in frames if t == FT.KICK]
        assert kicks and kicks[0].reason == pb.HEARTBEAT_TIMEOUT
        # 0.7 s idle, then at most one second; 0.25 s for a loaded machine.
        assert 0.65 <= elapsed <= 0.7 + 1.0 + 0.25, elapsed
