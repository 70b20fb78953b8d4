"""Overload control of one node: how busy the event loop is, and the
degradation level that follows from it.

:class:`LagProbe` measures event-loop lag: a timer due every
:data:`LAG_PROBE_INTERVAL` that runs late tells how long the loop was busy
with other work. :class:`OverloadControl` turns the mean lag over the last
second and the total write backlog into a level, 0 normal, 1 degraded,
2 overloaded (not ready), with no sockets or loop of its own, so it is
tested directly. The node applies each change (wider flush window, a
smaller chat share, readiness).
"""

from __future__ import annotations

import asyncio
import logging
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
    """

    def __init__(self, *, lag_degraded_ms: float, lag_overloaded_ms: float,
                 backlog_degraded_bytes: int, on_change: Callable[[int], object]) -> None:
        self.lag_degraded = lag_degraded_ms / 1000
        self.lag_overloaded = lag_overloaded_ms / 1000
        self.backlog_degraded = backlog_degraded_bytes
        self.level = 0
        #: Mean event-loop lag over the last second, seconds.
        self.loop_lag = 0.0
        self._on_change = on_change
        self._calm = 0
        self._lag_sum = 0.0
        self._lag_samples = 0

    def add_lag(self, lag: float) -> None:
        """One lag probe's sample, in seconds."""
        self._lag_sum += lag
        self._lag_samples += 1

    def tick(self, backlog: int) -> int:
        """Once a second: decide from the samples since the last tick.

        The mean lag, not the worst: a hot room's flush to 10k sockets blocks
        the loop for tens of ms by design, and that is no overload. A loop
        that is saturated is late for most probes."""
        self.loop_lag = self._lag_sum / self._lag_samples if self._lag_samples else 0.0
        self._lag_sum, self._lag_samples = 0.0, 0
        return self.update(self.loop_lag, backlog)

    def update(self, lag: float, backlog: int) -> int:
        """Set the level from a second's mean loop lag and the total write
        backlog. Steps up at once, down one level after CALM_SECONDS calm
        seconds. Returns the level."""
        if lag >= self.lag_overloaded:
            target = 2
        elif lag >= self.lag_degraded or backlog >= self.backlog_degraded:
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
        log.warning("load %s -> %s (loop lag %.0f ms, write backlog %d bytes)",
                    LEVEL_NAMES[self.level], LEVEL_NAMES[level], lag * 1000, backlog)
        self.level = level
        self._on_change(level)


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
