"""Overload control of one node: how busy the event loop is with the work
the node chooses to do, and the degradation level that follows from it.

:class:`LagProbe` measures event-loop lag: a timer due every
:data:`LAG_PROBE_INTERVAL` that runs late tells how long the loop was busy
with other work. :class:`TimedInput` wraps each connection's read callback
and adds the time spent handling client input to the controller.
:class:`OverloadControl` discounts that input time from each lag sample, and
turns the mean of what is left over the last second, with the total write
backlog, into a level, 0 normal, 1 degraded, 2 overloaded (not ready), with
no sockets or loop of its own, so it is tested directly. The node applies
each change (wider flush window, a smaller chat share, readiness).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from .logutil import ThrottledLog

log = logging.getLogger("fanout.overload")
_throttled = ThrottledLog(log)

LAG_PROBE_INTERVAL = 0.1    # seconds between event-loop lag probes
CALM_SECONDS = 5            # calm seconds before the level steps down one
LEVEL_NAMES = ("normal", "degraded", "overloaded")


class OverloadControl:
    """:param lag_degraded_ms, lag_overloaded_ms: mean lag over a second
        that makes the node degraded, overloaded.
    :param backlog_degraded_bytes: total write backlog that makes it degraded.
    :param on_change: ``on_change(level)`` after each change.

    The level follows the work the node chooses to do (flushes, replays,
    timers), not the input clients send it. Degrading is a node-wide answer
    (every room's chat share shrinks, the node stops being ready), so it
    must not be something one client can buy: 1,032,000 pings from one
    connection once made the loop lag and the node "overloaded" for all.
    Each lag sample is therefore reduced by the time the loop spent in
    client read callbacks since the previous sample (:meth:`add_input`,
    fed by :class:`TimedInput`): a probe late because the loop was parsing
    and answering client frames is not late because of the node's own
    work. An input flood is bounded per connection by the session's
    request budget instead. What is left is the lateness of everything
    else, which is where genuine fan-out overload shows (10k-member flushes
    back to back), and a write backlog keeps its own signal. The raw lag is
    still reported (:attr:`loop_lag`): it is what clients feel.
    """

    def __init__(self, *, lag_degraded_ms: float, lag_overloaded_ms: float,
                 backlog_degraded_bytes: int, on_change: Callable[[int], object],
                 delay_degraded_ms: float = 1e12, delay_overloaded_ms: float = 1e12) -> None:
        self.lag_degraded = lag_degraded_ms / 1000
        self.lag_overloaded = lag_overloaded_ms / 1000
        self.delay_degraded = delay_degraded_ms / 1000
        self.delay_overloaded = delay_overloaded_ms / 1000
        #: Mean time a delivered message waited in its room's batch and
        #: write round over the last second, seconds (the node's writers).
        self.delivery_delay = 0.0
        self.backlog_degraded = backlog_degraded_bytes
        self.level = 0
        #: time.monotonic() at which the next lag probe is due.
        self.probe_due = 0.0
        #: The node's own work done inside client callbacks, as a clock of
        #: seconds (the hub's flush time: a chat that fills a batch flushes
        #: it from the read callback); None when there is none.
        self.work_clock: Callable[[], float] | None = None
        #: Mean event-loop lag over the last second, seconds.
        self.loop_lag = 0.0
        self._on_change = on_change
        self._calm = 0
        self._lag_sum = 0.0
        self._work_lag_sum = 0.0
        self._lag_samples = 0
        #: Mean lag over the last second left after client input, seconds:
        #: what the level follows.
        self.work_lag = 0.0
        #: Loop seconds spent handling client input since the last sample.
        self.input_time = 0.0

    def add_input(self, seconds: float) -> None:
        """Loop time spent in one client read callback that delayed the
        next probe (see :class:`TimedInput`)."""
        self.input_time += seconds

    def add_lag(self, lag: float) -> None:
        """One lag probe's sample, in seconds: counted less the client input
        handled since the previous sample."""
        self._lag_sum += lag
        self._work_lag_sum += max(0.0, lag - self.input_time)
        self.input_time = 0.0
        self._lag_samples += 1
        # The probe runs again this long from now (LagProbe); input handled
        # before then does not make it late, so it is not discounted.
        self.probe_due = time.monotonic() + LAG_PROBE_INTERVAL

    def tick(self, backlog: int, delay: float = 0.0) -> int:
        """Once a second: decide from the samples since the last tick, the
        write backlog, and ``delay``, the mean time a message delivered in
        that second waited from its batch's start to its write round's end.

        The mean lag, not the worst: a saturated loop is late for most
        probes. Large rooms are written by the writer threads, so their
        rounds no longer make the loop late; when the threads cannot keep
        up, the messages wait longer instead, which ``delay`` shows."""
        samples = self._lag_samples
        self.loop_lag = self._lag_sum / samples if samples else 0.0
        self.work_lag = self._work_lag_sum / samples if samples else 0.0
        self._lag_sum, self._work_lag_sum, self._lag_samples = 0.0, 0.0, 0
        return self.update(self.work_lag, backlog, delay)

    def update(self, lag: float, backlog: int, delay: float = 0.0) -> int:
        """Set the level from a second's mean loop lag, the total write
        backlog and the mean delivery delay. Steps up at once, down one
        level after CALM_SECONDS calm seconds. Returns the level."""
        self.delivery_delay = delay
        if lag >= self.lag_overloaded or delay >= self.delay_overloaded:
            target = 2
        elif (lag >= self.lag_degraded or backlog >= self.backlog_degraded
              or delay >= self.delay_degraded):
            target = 1
        else:
            target = 0
        level = self.level
        if target > level:
            self._calm = 0
            self._set(target, lag, backlog)
        elif target < level:
            self._calm += 1
            if self._calm >= CALM_SECONDS:
                self._calm = 0
                self._set(level - 1, lag, backlog)
        else:
            self._calm = 0
        return self.level

    def _set(self, level: int, lag: float, backlog: int) -> None:
        log.warning("load %s -> %s (loop lag from the node's own work %.0f ms, "
                    "all loop lag %.0f ms, write backlog %d bytes, delivery delay %.0f ms)",
                    LEVEL_NAMES[self.level], LEVEL_NAMES[level], lag * 1000,
                    self.loop_lag * 1000, backlog, self.delivery_delay * 1000)
        self.level = level
        self._on_change(level)


class TimedInput:
    """A connection's read callback that adds the loop time it takes to
    ``control`` (:meth:`OverloadControl.add_input`). It replaces the bound
    method it wraps, so it costs a connection no more memory than that."""

    __slots__ = ("_callback", "_control")

    def __init__(self, callback: Callable[[], object], control: OverloadControl) -> None:
        self._callback = callback
        self._control = control

    def __call__(self) -> None:
        control = self._control
        clock = control.work_clock
        own = clock() if clock is not None else 0.0
        started = time.monotonic()
        try:
            self._callback()
        finally:
            ended = time.monotonic()
            if clock is not None:
                own = clock() - own
            # Only what delayed the next probe (time after it was due), and
            # not the node's own work done inside the callback (flushes).
            late = ended - max(started, control.probe_due) - own
            if late > 0.0:
                control.add_input(late)


class LagProbe:
    """Samples event-loop lag every :data:`LAG_PROBE_INTERVAL` into
    ``sink(lag)`` until :meth:`stop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sink: Callable[[float], object]) -> None:
        self._loop = loop
        self._sink = sink
        self._due = loop.time() + LAG_PROBE_INTERVAL
        self._timer = loop.call_at(self._due, self._probe)

    def _probe(self) -> None:
        now = self._loop.time()
        try:
            self._sink(max(0.0, now - self._due))
        except Exception:
            _throttled.log(logging.ERROR, "probe", "lag probe sink failed", exc_info=True)
        finally:
            if self._timer is not None:           # not stopped by the sink
                self._due = now + LAG_PROBE_INTERVAL
                self._timer = self._loop.call_at(self._due, self._probe)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
