"""A coalescing, per-key work queue: one sync at a time per ProtectedService.

Watch events arrive in bursts (a grant, its status write, a Lease renewal...).
Each request marks *aspects* of one ProtectedService dirty; a single worker task
per key runs the sync with everything marked since its last run, so bursts
collapse into one sync and two syncs of the same service never race. A failed
sync is retried with backoff, and any new request cuts the backoff short (a
revocation must not wait for a retry timer).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

Key = tuple[str, str]
"""(namespace, ProtectedService name)."""


class Aspect(enum.Flag):
    """What part of a ProtectedService's state needs recomputing."""

    NONE = 0
    POLICY = enum.auto()
    """Grants/revocations/issuers changed: recompile, apply the ConfigMap, grant statuses."""
    ENFORCEMENT = enum.auto()
    """Proxy Leases changed: which replica serves which version."""
    BYPASS = enum.auto()
    """NetworkPolicies/Services/Ingresses/HTTPRoutes/Pods changed: direct paths."""
    INFRA = enum.auto()
    """The ProtectedService spec or its owned objects changed: apply them all."""
    ALL = POLICY | ENFORCEMENT | BYPASS | INFRA


SyncFn = Callable[[Key, Aspect], Awaitable[None]]


@dataclass
class _KeyState:
    pending: Aspect = Aspect.NONE
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)


class WorkQueue:
    """Coalesce sync requests per key; run at most one sync per key at a time."""

    def __init__(
        self,
        sync: SyncFn,
        *,
        retry_min: float = 0.5,
        retry_max: float = 30.0,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sync = sync
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._clock = clock  # the controller's: `request_at` times are read on it
        self._log = logger or logging.getLogger(__name__)
        self._keys: dict[Key, _KeyState] = {}
        self._closed = False

    def request(self, key: Key, aspects: Aspect) -> asyncio.Future[None]:
        """Mark `aspects` of `key` dirty; the future resolves when a sync that
        started after this call has finished (or carries its exception)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(RuntimeError("the work queue is closed"))
            return future
        state = self._keys.setdefault(key, _KeyState())
        state.pending |= aspects
        state.waiters.append(future)
        state.wake.set()
        if state.task is None:
            state.task = asyncio.create_task(self._work(key, state), name=f"sync {key[0]}/{key[1]}")
        return future

    def request_at(self, key: Key, aspects: Aspect, when: float, *, slot: str) -> None:
        """Request a sync at time `when` of the queue's clock (epoch seconds); replaces the
        `slot` timer."""
        state = self._keys.setdefault(key, _KeyState())
        old = state.timers.pop(slot, None)
        if old is not None:
            old.cancel()
        if self._closed:
            return
        delay = max(0.0, when - self._clock())

        def fire() -> None:
            state.timers.pop(slot, None)
            self.request(key, aspects).add_done_callback(_consume)

        state.timers[slot] = asyncio.get_running_loop().call_later(delay, fire)

    def forget(self, key: Key) -> None:
        """Drop timers for a key that no longer exists (its worker finishes on its own)."""
        state = self._keys.get(key)
        if state is not None:
            for timer in state.timers.values():
                timer.cancel()
            state.timers.clear()

    async def close(self) -> None:
        """Cancel every worker and timer."""
        self._closed = True
        tasks = []
        for state in self._keys.values():
            for timer in state.timers.values():
                timer.cancel()
            if state.task is not None:
                state.task.cancel()
                tasks.append(state.task)
            for waiter in state.waiters:
                if not waiter.done():
                    waiter.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._keys.clear()

    async def _work(self, key: Key, state: _KeyState) -> None:
        failures = 0
        try:
            while state.pending:
                aspects, state.pending = state.pending, Aspect.NONE
                waiters, state.waiters = state.waiters, []
                state.wake.clear()
                try:
                    await self._sync(key, aspects)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # retried below; the caller sees it too
                    failures += 1
                    delay = min(self._retry_max, self._retry_min * 2 ** (failures - 1))
                    self._log.warning(
                        "sync of %s/%s failed (%s), retrying in %.1fs: %s",
                        key[0], key[1], aspects, delay, exc, exc_info=failures == 1,
                    )  # fmt: skip
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(exc)
                            waiter.add_done_callback(_consume)
                    state.pending |= aspects
                    with contextlib.suppress(TimeoutError):  # a new request ends the backoff
                        await asyncio.wait_for(state.wake.wait(), timeout=delay)
                    continue
                failures = 0
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
        finally:
            state.task = None
            if not state.pending and not state.timers and self._keys.get(key) is state:
                del self._keys[key]


def _consume(future: asyncio.Future[None]) -> None:
    """Mark a fire-and-forget future's exception as retrieved (the queue already logged it)."""
    if not future.cancelled():
        future.exception()
