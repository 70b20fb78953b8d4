"""Per-user admission of upstream chat: size and a token bucket per user.

Buckets follow the active chatters: a full bucket is the same as no bucket,
so full ones are dropped once there are many.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

from ..protocol import fanout_pb2 as pb
from .base import Rejected
from .ratelimit import TokenBucket

#: Buckets held before full ones are dropped.
BUCKETS_BEFORE_CLEANUP = 4096


class ChatAdmission:
    """:param max_chat_bytes: largest chat payload.
    :param chat_rate: chat messages per second per user (token bucket rate).
    :param chat_burst: token bucket size.
    :param metrics: counts refusals in ``rate_limited``, or None.

    Buckets are kept least recently used first. Past
    BUCKETS_BEFORE_CLEANUP, a new chatter first drops full buckets from the
    front and stops at the first that is not full: each bucket is dropped at
    most once, so a chat costs O(1) amortized however many users are
    limited (a scan of every bucket cost 517 us per chat past 4,096 limited
    users). What stays is bounded all the same: a bucket untouched for
    ``burst / rate`` seconds is full, so every bucket behind a non-full
    front one was used within that time.
    """

    def __init__(self, *, max_chat_bytes: int = 2048, chat_rate: float = 5.0,
                 chat_burst: float = 10.0, metrics=None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_chat_bytes = max_chat_bytes
        self.chat_rate = chat_rate
        self.chat_burst = chat_burst
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._clock = clock
        self._refused = metrics.rate_limited if metrics is not None else None

    def __len__(self) -> int:
        """Buckets held."""
        return len(self._buckets)

    def check(self, user: str, payload: bytes) -> None:
        """:raises Rejected: ``MESSAGE_TOO_LARGE`` or ``RATE_LIMITED``."""
        if len(payload) > self.max_chat_bytes:
            raise Rejected(pb.MESSAGE_TOO_LARGE,
                           f"chat of {len(payload)} bytes over {self.max_chat_bytes}")
        now = self._clock()
        buckets = self._buckets
        bucket = buckets.get(user)
        if bucket is None:
            if len(buckets) >= BUCKETS_BEFORE_CLEANUP:
                self._forget_full(now)
            bucket = buckets[user] = TokenBucket(self.chat_rate, self.chat_burst, now)
        else:
            buckets.move_to_end(user)
        if not bucket.take(now):
            if self._refused is not None:
                self._refused.inc()
            raise Rejected(pb.RATE_LIMITED,
                           f"over {self.chat_rate:g} chat messages/s (burst {self.chat_burst:g})")

    def _forget_full(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            user, bucket = next(iter(buckets.items()))
            if not bucket.full(now):
                return
            del buckets[user]
