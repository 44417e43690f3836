"""The cluster policy watch comes back quickly after the API server does.

While the watch is down a replica keeps serving its last policy, so a deleted grant stays
usable there: retries must stay short, and a successful list must reset the backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from nhigate.proxy import policy_source
from nhigate.proxy.policy_source import POLICY_WATCH_BACKOFF, ClusterSource, PolicyHolder


class FlakyApi:
    """`list` fails `failures` times, then succeeds; `watch` ends at once (or fails later)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.lists = 0

    async def list(self, ref: Any, namespace: Any = None, **kw: Any) -> Any:
        self.lists += 1
        if self.lists <= self.failures:
            raise ConnectionError("API server unreachable")
        return [], str(self.lists)

    async def watch(self, ref: Any, namespace: Any = None, **kw: Any) -> AsyncIterator[Any]:
        raise ConnectionError("watch dropped")
        yield  # pragma: no cover - makes this an async generator


async def test_retries_are_capped_and_reset_after_a_successful_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def record_sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) >= 14:
            raise asyncio.CancelledError
        await real_sleep(0)

    monkeypatch.setattr(policy_source.asyncio, "sleep", record_sleep)
    api = FlakyApi(failures=12)
    source = ClusterSource(api, "ns", "nhigate-x-policy", PolicyHolder())
    with pytest.raises(asyncio.CancelledError):
        await source.run()

    first, cap = POLICY_WATCH_BACKOFF
    assert cap <= 5.0  # a 30 s cap kept deleted grants alive for up to 30 s after an outage
    assert max(delays) <= cap
    assert delays[11] >= cap / 2  # twelve failed lists: backed off to the cap
    # the 13th list succeeds, then its watch fails: the retry starts from the first delay again
    assert delays[12] <= first


def test_watch_requests_are_short_enough_to_notice_a_dead_connection() -> None:
    source = ClusterSource(FlakyApi(0), "ns", "cm", PolicyHolder())
    assert source._watch_timeout <= 90
