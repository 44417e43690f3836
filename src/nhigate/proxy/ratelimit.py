"""Per-(identity, grant) token buckets, per proxy replica.

A bucket refills at `requests_per_second` up to `burst`. The table is
bounded: when it is full, the least recently created buckets are dropped
(a dropped bucket comes back full, which only matters beyond `max_buckets`
distinct callers).
"""

from __future__ import annotations

import math
from collections.abc import Hashable

from nhigate.policy.model import RateLimit


class _Bucket:
    __slots__ = ("limit", "stamp", "tokens")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.limit = limit
        self.tokens = float(limit.burst)
        self.stamp = now


class RateLimiter:
    """Token buckets keyed by any hashable (the proxy uses `(issuer, subject, grant)`)."""

    def __init__(self, max_buckets: int = 100_000) -> None:
        self._buckets: dict[Hashable, _Bucket] = {}
        self._max = max_buckets

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, key: Hashable, limit: RateLimit, now: float) -> float:
        """Take one token: 0.0 when allowed, else the seconds until one is available."""
        bucket = self._buckets.get(key)
        if bucket is None or bucket.limit != limit:
            if bucket is None and len(self._buckets) >= self._max:
                self._evict()
            bucket = _Bucket(limit, now)
            self._buckets[key] = bucket
        elif now > bucket.stamp:
            bucket.tokens = min(
                float(limit.burst), bucket.tokens + (now - bucket.stamp) * limit.requests_per_second
            )
            bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / limit.requests_per_second

    def _evict(self) -> None:
        for key in list(self._buckets)[: max(1, self._max // 10)]:
            del self._buckets[key]


def retry_after_header(wait: float) -> str:
    """`Retry-After` value in whole seconds (at least 1)."""
    return str(max(1, math.ceil(wait)))
