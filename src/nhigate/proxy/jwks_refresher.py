"""Each configured issuer's keys, and keeping `jwksUri` keys fresh.

Inline JWKS are loaded once per policy reload; `jwksUri` keys are fetched at start, on
each issuer's schedule (sooner while failing), and on an unknown `kid`. The unknown-kid
refresh is rate-limited per issuer and shared by concurrent requests, so a flood of
random kids costs at most one fetch per `min_refresh_interval`. Keys survive a JWKS
outage: a failed fetch keeps the keys already held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

from nhigate.policy.document import IssuerConfig
from nhigate.proxy.jwks import JwksError, KeySet, fetch_jwks, load_jwks

log = logging.getLogger(__name__)

JWKS_FETCH_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class IssuerKeyStatus:
    """What an issuer's key source looks like right now (for logs, readiness and status)."""

    key_count: int
    last_success: float | None
    """Clock time of the last successful load or fetch (None: never)."""
    last_error: str | None
    """The last fetch or parse failure; None after a success."""


@dataclass(slots=True)
class RefreshCounts:
    """The refresher's counters, exported by the metrics module."""

    results: dict[tuple[str, str], int] = field(default_factory=dict)
    """(issuer name, result) -> count; result is "success" or "error" (jwks_refresh_total)."""
    rate_limited: int = 0
    """Unknown-kid refreshes refused by the per-issuer rate limit."""


class IssuerKeys:
    """One issuer's keys and their refresh bookkeeping (mutable; replaced on a config change)."""

    __slots__ = (
        "config",
        "generation",
        "inflight",
        "keys",
        "last_attempt",
        "last_error",
        "last_success",
        "retired",
    )

    def __init__(self, config: IssuerConfig) -> None:
        self.config = config
        self.keys = KeySet()
        self.generation = 0
        """Bumped whenever the keys change or the issuer is retired: tokens verified with an
        earlier generation no longer count (see `token_cache.KeySource`)."""
        self.last_attempt: float | None = None
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.inflight: asyncio.Task[None] | None = None
        self.retired = False
        """True once a policy reload removed or changed this issuer."""

    @property
    def fetchable(self) -> bool:
        """True for a `jwksUri` issuer (inline keys are never fetched)."""
        return self.config.jwks is None and self.config.jwks_uri is not None

    def set_keys(self, keys: KeySet) -> bool:
        """Install `keys`; True (and a new generation) when they differ from the current ones."""
        if keys.fingerprint == self.keys.fingerprint:
            return False
        self.keys = keys
        self.generation += 1
        return True

    def retire(self) -> None:
        """Stop counting: tokens verified with these keys must be verified again."""
        self.retired = True
        self.generation += 1


def refresh_due(state: IssuerKeys, now: float, period: float, retry_after: float) -> bool:
    """Whether a scheduled fetch of `state` is due at `now`: `period` after the last attempt,
    or only `retry_after` while failing (never fetched, or the last fetch failed). A clock that
    went back counts as never attempted."""
    last = state.last_attempt
    elapsed = float("inf") if last is None or now < last else now - last
    failing = state.last_error is not None or state.last_success is None
    return elapsed >= period or (failing and elapsed >= retry_after)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class JwksRefresher:
    """The configured issuers' keys by `iss`, fetched and refreshed as their sources say."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession | None,
        clock: Callable[[], float],
        on_keys_changed: Callable[[], None],
        min_refresh_interval: float = 10.0,
        refresh_interval: float | None = None,
        timeout: float = JWKS_FETCH_TIMEOUT,
    ) -> None:
        """`on_keys_changed` is called (synchronously) after any issuer's generation moved;
        `min_refresh_interval` bounds unknown-kid and failure retries per issuer;
        `refresh_interval` overrides every issuer's own scheduled period; `timeout` bounds
        one fetch. Without `session`, one is created on the first fetch and closed by `close`."""
        self.counts = RefreshCounts()
        self._clock = clock
        self._on_keys_changed = on_keys_changed
        self._min_refresh_interval = min_refresh_interval
        self._refresh_interval = refresh_interval
        self._timeout = timeout
        self._session = session
        self._owns_session = False
        self._started = False
        self._scheduler: asyncio.Task[None] | None = None
        self._issuers: dict[str, IssuerKeys] = {}
        self._by_iss: dict[str, tuple[IssuerKeys, ...]] = {}

    def for_iss(self, iss: str) -> tuple[IssuerKeys, ...]:
        """The issuers whose `iss` claim is `iss` (usually one; empty: not configured)."""
        return self._by_iss.get(iss, ())

    def status(self) -> dict[str, IssuerKeyStatus]:
        """Per issuer name: key count, last successful load, last error."""
        return {
            name: IssuerKeyStatus(len(s.keys), s.last_success, s.last_error)
            for name, s in self._issuers.items()
        }

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Fetch every `jwksUri` issuer's keys and start the schedule. Never raises."""
        self._started = True
        tasks = [self._start_refresh(s) for s in self._issuers.values() if s.fetchable]
        if tasks:
            await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)
        if self._scheduler is None:
            self._scheduler = asyncio.create_task(self._refresh_loop(), name="nhigate-jwks-refresh")

    async def close(self) -> None:
        """Stop refreshing and close the HTTP session if this object created it."""
        self._started = False
        tasks = [s.inflight for s in self._issuers.values() if s.inflight is not None]
        if self._scheduler is not None:
            tasks.append(self._scheduler)
            self._scheduler = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None
            self._owns_session = False

    def update(self, issuers: Sequence[IssuerConfig]) -> None:
        """Apply a policy reload. Unchanged issuers keep their keys; removed or changed ones are
        retired (a changed `jwksUri` issuer keeps serving the same URI's keys until refreshed)."""
        fresh: dict[str, IssuerKeys] = {}
        for config in issuers:
            previous = self._issuers.get(config.name)
            if previous is not None and previous.config == config:
                fresh[config.name] = previous
                continue
            state = IssuerKeys(config)
            if config.jwks is not None:
                try:
                    state.set_keys(load_jwks(config.jwks))
                    state.last_success = self._clock()
                except JwksError as exc:
                    state.last_error = str(exc)
                    log.warning("issuer %s: inline JWKS unusable: %s", config.name, exc)
            elif (
                previous is not None
                and config.jwks_uri is not None
                and previous.config.jwks_uri == config.jwks_uri
            ):
                state.set_keys(previous.keys)
                state.last_success = previous.last_success
            fresh[config.name] = state
        for name, previous in self._issuers.items():
            if fresh.get(name) is not previous:
                previous.retire()
        self._issuers = fresh
        by_iss: dict[str, list[IssuerKeys]] = {}
        for state in fresh.values():
            by_iss.setdefault(state.config.issuer, []).append(state)
        self._by_iss = {iss: tuple(states) for iss, states in by_iss.items()}
        self._on_keys_changed()
        if self._started and _loop_running():
            for state in fresh.values():
                if state.fetchable and state.last_attempt is None:
                    self._start_refresh(state)

    # --- refreshing -------------------------------------------------------------------------

    async def refresh_for_unknown_key(self, state: IssuerKeys) -> bool:
        """Refresh an issuer's keys for an unknown kid, within the rate limit.

        True when a fetch ran (or was joined) and finished. Concurrent callers share one
        in-flight fetch; a cancelled caller does not cancel it.
        """
        if not state.fetchable:
            return False
        task = state.inflight
        if task is None:
            now = self._clock()
            last = state.last_attempt
            if last is not None and 0 <= now - last < self._min_refresh_interval:
                self.counts.rate_limited += 1
                return False
            task = self._start_refresh(state)
        await asyncio.shield(task)
        return True

    def _start_refresh(self, state: IssuerKeys) -> asyncio.Task[None]:
        if state.inflight is not None:
            return state.inflight
        state.last_attempt = self._clock()
        task = asyncio.create_task(self._refresh(state), name=f"jwks-{state.config.name}")
        state.inflight = task

        def _done(_: asyncio.Task[None]) -> None:
            if state.inflight is task:
                state.inflight = None

        task.add_done_callback(_done)
        return task

    async def _refresh(self, state: IssuerKeys) -> None:
        """Fetch and install an issuer's JWKS. Never raises; a failure keeps the old keys."""
        name, uri = state.config.name, state.config.jwks_uri
        assert uri is not None
        try:
            if self._session is None:
                self._session = aiohttp.ClientSession()
                self._owns_session = True
            keys = await fetch_jwks(self._session, uri, self._timeout)
        except JwksError as exc:
            state.last_error = str(exc)
            self._count(name, "error")
            log.warning(
                "issuer %s: JWKS refresh failed (keeping %d keys): %s", name, len(state.keys), exc
            )
            return
        except Exception as exc:  # fail closed but keep the process alive: keys stay as they were
            state.last_error = f"internal error: {type(exc).__name__}"
            self._count(name, "error")
            log.exception("issuer %s: JWKS refresh crashed", name)
            return
        if state.retired:
            return
        state.last_error = None
        state.last_success = self._clock()
        self._count(name, "success")
        if state.set_keys(keys):
            log.info("issuer %s: JWKS loaded, %d keys", name, len(keys))
            self._on_keys_changed()

    def _count(self, issuer: str, result: str) -> None:
        key = (issuer, result)
        self.counts.results[key] = self.counts.results.get(key, 0) + 1

    async def _refresh_loop(self) -> None:
        """Scheduled refreshes: every issuer's refresh period, and after a failure every
        `min_refresh_interval`, per `jwksUri` issuer."""
        tick = max(0.05, min(self._min_refresh_interval, self._refresh_interval or 1e9))
        while True:
            await asyncio.sleep(tick)
            try:
                self._start_due_refreshes()
            except Exception:  # never let the schedule die silently
                log.exception("JWKS refresh schedule failed")

    def _start_due_refreshes(self) -> None:
        now = self._clock()
        for state in list(self._issuers.values()):
            if not state.fetchable or state.inflight is not None:
                continue
            period = self._refresh_interval or float(state.config.refresh_interval_seconds)
            if refresh_due(state, now, period, self._min_refresh_interval):
                self._start_refresh(state)
