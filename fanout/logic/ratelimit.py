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

    def _refill(self, now: float) -> None:
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._stamp = now

    def take(self, now: float, n: float = 1.0, reserve: float = 0.0) -> bool:
        """Take ``n`` tokens if at least ``reserve`` would remain."""
        self._refill(now)
        if self._tokens - n >= reserve:
            self._tokens -= n
            return True
        return False

    def force(self, now: float, n: float = 1.0) -> None:
        """Take ``n`` tokens even if that leaves the bucket in debt (at most
        one burst deep): traffic that must pass still counts against it."""
        self._refill(now)
        self._tokens = max(self._tokens - n, -self.burst)

    def full(self, now: float) -> bool:
        return self._tokens + (now - self._stamp) * self.rate >= self.burst


class RateWindow:
    """Per-kind message counts over the last ``seconds`` whole seconds."""

    __slots__ = ("_slots", "_second", "seconds")

    def __init__(self, kinds: int, seconds: int = 10) -> None:
        self.seconds = seconds
        self._slots = [[0] * kinds for _ in range(seconds)]
        self._second = 0

    def _advance(self, now: float) -> list:
        second = int(now)
        if second != self._second:
            for s in range(max(self._second + 1, second - self.seconds + 1), second + 1):
                slot = self._slots[s % self.seconds]
                for i in range(len(slot)):
                    slot[i] = 0
            self._second = second
        return self._slots[second % self.seconds]

    def add(self, now: float, kind: int) -> None:
        self._advance(now)[kind] += 1

    def rates(self, now: float) -> list[float]:
        """Messages per second per kind, averaged over the window."""
        self._advance(now)
        return [sum(slot[i] for slot in self._slots) / self.seconds
                for i in range(len(self._slots[0]))]
