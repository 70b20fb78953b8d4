"""Token buckets for per-user rate limits."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``."""

    __slots__ = ("rate", "burst", "_tokens", "_stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    def take(self, now: float, n: float = 1.0) -> bool:
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._stamp = now
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False

    def full(self, now: float) -> bool:
        return self._tokens + (now - self._stamp) * self.rate >= self.burst
