"""Log lines that a flood of bad clients cannot turn into a flood of logs."""

from __future__ import annotations

import logging
import time


class ThrottledLog:
    """At most ``burst`` lines per key per ``interval`` seconds; the next
    line after a quiet spell says how many were suppressed."""

    def __init__(self, logger: logging.Logger, *, interval: float = 10.0, burst: int = 5) -> None:
        self._logger = logger
        self._interval = interval
        self._burst = burst
        self._windows: dict[str, list] = {}      # key -> [window start, lines, suppressed]

    def log(self, level: int, key: str, msg: str, *args, exc_info=None) -> None:
        if not self._logger.isEnabledFor(level):
            return
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self._interval:
            suppressed = window[2] if window else 0
            window = self._windows[key] = [now, 0, 0]
            if len(self._windows) > 1024:          # keys are few; stay bounded anyway
                self._windows = {key: window}
            if suppressed:
                msg += f" ({suppressed} similar lines suppressed)"
        if window[1] >= self._burst:
            window[2] += 1
            return
        window[1] += 1
        self._logger.log(level, msg, *args, exc_info=exc_info)

    def warning(self, key: str, msg: str, *args) -> None:
        self.log(logging.WARNING, key, msg, *args)
