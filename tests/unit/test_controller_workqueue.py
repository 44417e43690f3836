"""The per-key work queue: coalescing, no concurrent syncs of one key, retries, timers."""

from __future__ import annotations

import asyncio
import time

import pytest

from nhigate.controller.workqueue import Aspect, Key, WorkQueue

KEY: Key = ("ns", "svc")


async def test_bursts_coalesce_and_never_overlap() -> None:
    calls: list[Aspect] = []
    running = 0
    overlap = False

    async def sync(key: Key, aspects: Aspect) -> None:
        nonlocal running, overlap
        running += 1
        overlap = overlap or running > 1
        calls.append(aspects)
        await asyncio.sleep(0.05)
        running -= 1

    queue = WorkQueue(sync)
    first = queue.request(KEY, Aspect.POLICY)
    await asyncio.sleep(0.01)  # the first sync is running now
    burst = [queue.request(KEY, a) for a in (Aspect.BYPASS, Aspect.ENFORCEMENT, Aspect.BYPASS)]
    await asyncio.gather(first, *burst)
    assert not overlap
    assert calls == [Aspect.POLICY, Aspect.BYPASS | Aspect.ENFORCEMENT]
    await queue.close()


async def test_failure_is_reported_and_retried_and_new_request_cuts_backoff() -> None:
    attempts = 0

    async def sync(key: Key, aspects: Aspect) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("api down")

    queue = WorkQueue(sync, retry_min=30.0)
    with pytest.raises(RuntimeError, match="api down"):
        await queue.request(KEY, Aspect.POLICY)
    started = time.monotonic()
    await asyncio.wait_for(queue.request(KEY, Aspect.POLICY), timeout=2)
    assert time.monotonic() - started < 1.0  # did not wait out the 30 s backoff
    assert attempts == 2
    await queue.close()


async def test_request_at_fires_at_the_given_time() -> None:
    fired: list[float] = []

    async def sync(key: Key, aspects: Aspect) -> None:
        fired.append(time.time())

    queue = WorkQueue(sync)
    when = time.time() + 0.2
    queue.request_at(KEY, Aspect.POLICY, when, slot="expiry")
    queue.request_at(KEY, Aspect.POLICY, when + 10, slot="other")
    queue.request_at(KEY, Aspect.POLICY, when + 10, slot="other")  # replaces, not adds
    await asyncio.sleep(0.4)
    assert len(fired) == 1
    assert fired[0] >= when - 0.01
    queue.forget(KEY)
    await queue.close()


async def test_closed_queue_refuses() -> None:
    async def sync(key: Key, aspects: Aspect) -> None:
        return None

    queue = WorkQueue(sync)
    await queue.close()
    with pytest.raises(RuntimeError, match="closed"):
        await queue.request(KEY, Aspect.ALL)


async def test_timers_read_the_clock_the_controller_injects() -> None:
    """`request_at(when)` is in the controller's clock (issue 15: one clock): with a clock an
    hour ahead of the wall clock, a timer due 50 ms from that clock's now fires in 50 ms, not
    in an hour."""
    fired = asyncio.Event()

    async def sync(key: Key, aspects: Aspect) -> None:
        fired.set()

    offset = 3600.0
    queue = WorkQueue(sync, clock=lambda: time.time() + offset)
    queue.request_at(KEY, Aspect.POLICY, time.time() + offset + 0.05, slot="expiry")
    await asyncio.wait_for(fired.wait(), timeout=2.0)
    await queue.close()
