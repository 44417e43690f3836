"""Authentication: turn an `Authorization` header (or an mTLS SPIFFE ID) into an `Identity`.

Fail closed and strict: a Bearer JWS from a configured issuer, checked with
that issuer's JWKS (never with keys a token points at), allowed algorithms
only, claims checked against the issuer's audiences, skew and lifetime cap.

Verified tokens are cached (keyed by the raw token string itself, an LRU bounded
by entry count and by total token bytes) until they expire or their issuer's keys
change: a lookup hashes the token with Python's keyed string hash (SipHash,
randomised per process) instead of a SHA-256, and a hit compares it in full. A cache
hit re-checks the token's time window; revocations and grants are checked per request later by
`decide()`, so a cached token is still revocable.

JWKS refresh on an unknown `kid` is rate-limited per issuer and shared by
concurrent requests, so a flood of random kids costs at most one fetch per
`min_refresh_interval`. Keys survive a JWKS outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

from nhigate.policy.document import IssuerConfig
from nhigate.policy.model import Identity, IdentityKind, Reason
from nhigate.proxy.jwks import JwksError, KeySet, fetch_jwks, load_jwks
from nhigate.proxy.spiffe import is_spiffe_id
from nhigate.proxy.tokens import (
    MAX_TOKEN_BYTES,
    SUPPORTED_ALGORITHMS,
    ParsedToken,
    TokenError,
    ValidatedToken,
    parse_token,
    validate_claims,
    verify_signature,
)

log = logging.getLogger(__name__)

MAX_KEYS_TRIED = 4
"""A token without `kid` is tried against at most this many keys (bounds CPU per request)."""
JWKS_FETCH_TIMEOUT = 5.0
_MAX_HEADER_LENGTH = MAX_TOKEN_BYTES + 64
CACHE_TOKEN_BYTES = 16 * 1024 * 1024
"""The cached tokens' total length is kept under this (the entry count is bounded too)."""


@dataclass(frozen=True, slots=True)
class AuthnFailure:
    """Why a credential was refused. `detail` is short and safe to log (never the token)."""

    reason: Reason
    detail: str


@dataclass(slots=True)
class AuthnStats:
    """Counters exported by the metrics module."""

    cache_hits: int = 0
    cache_misses: int = 0
    jwks_refresh: dict[tuple[str, str], int] = field(default_factory=dict)
    """(issuer name, result) -> count; result is "success" or "error" (jwks_refresh_total)."""
    jwks_refresh_rate_limited: int = 0
    """Unknown-kid refreshes refused by the per-issuer rate limit."""


@dataclass(frozen=True, slots=True)
class IssuerKeyStatus:
    """What an issuer's key source looks like right now (for logs, readiness and status)."""

    key_count: int
    last_success: float | None
    """Clock time of the last successful load or fetch (None: never)."""
    last_error: str | None
    """The last fetch or parse failure; None after a success."""


_MISSING = AuthnFailure(Reason.CREDENTIAL_MISSING, "no credential")
_NOT_BEARER = AuthnFailure(Reason.CREDENTIAL_MISSING, "Authorization is not a Bearer credential")
_EMPTY = AuthnFailure(Reason.TOKEN_MALFORMED, "empty bearer token")
_TOO_LARGE = AuthnFailure(Reason.TOKEN_MALFORMED, "token too large")
_NOT_ASCII = AuthnFailure(Reason.TOKEN_MALFORMED, "token is not ASCII")
_BAD_SIGNATURE = AuthnFailure(Reason.TOKEN_INVALID, "signature verification failed")


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _IssuerState:
    """Mutable per-issuer state: its keys and refresh bookkeeping."""

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
        """Bumped whenever the keys change or the issuer is retired: invalidates cache entries."""
        self.last_attempt: float | None = None
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.inflight: asyncio.Task[None] | None = None
        self.retired = False

    def set_keys(self, keys: KeySet) -> bool:
        """Install `keys`; True (and a new generation) when they differ from the current ones."""
        if keys.fingerprint == self.keys.fingerprint:
            return False
        self.keys = keys
        self.generation += 1
        return True


# (identity, not_before, expires_at, issuer state, issuer generation at verification)
_CacheEntry = tuple[Identity, float, float, _IssuerState, int]


class Authenticator:
    """Verifies credentials against the configured issuers. One per proxy process."""

    def __init__(
        self,
        issuers: Sequence[IssuerConfig],
        *,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
        cache_size: int = 10_000,
        cache_bytes: int = CACHE_TOKEN_BYTES,
        min_refresh_interval: float = 10.0,
        refresh_interval: float | None = None,
        jwks_timeout: float = JWKS_FETCH_TIMEOUT,
    ) -> None:
        """`clock` gives epoch seconds (token times and refresh rate limits use it);
        `refresh_interval` overrides every issuer's own scheduled JWKS refresh period
        (`IssuerConfig.refresh_interval_seconds`, from its `refreshInterval`);
        `jwks_timeout` bounds one JWKS fetch; the token cache holds at most `cache_size`
        tokens of at most `cache_bytes` characters in all."""
        self.stats = AuthnStats()
        self._clock = clock
        self._cache_size = max(0, cache_size)
        self._cache_bytes = max(0, cache_bytes)
        self._cache: OrderedDict[str, _CacheEntry] = OrderedDict()
        """Verified tokens, keyed by the token itself (least recently used first)."""
        self._cached_bytes = 0
        self._min_refresh_interval = min_refresh_interval
        self._refresh_interval = refresh_interval
        self._jwks_timeout = jwks_timeout
        self._session = session
        self._owns_session = False
        self._started = False
        self._scheduler: asyncio.Task[None] | None = None
        self._states: dict[str, _IssuerState] = {}
        self._by_iss: dict[str, tuple[_IssuerState, ...]] = {}
        self.update_issuers(issuers)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Fetch the JWKS of every `jwks_uri` issuer and start scheduled refreshes.

        Never raises: fetch failures are recorded (see `issuer_status()`) and
        retried; requests for such an issuer fail with `unknown_key` meanwhile.
        """
        self._started = True
        tasks = [self._start_refresh(s) for s in self._states.values() if self._fetchable(s)]
        if tasks:
            await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)
        if self._scheduler is None:
            self._scheduler = asyncio.create_task(self._refresh_loop(), name="nhigate-jwks-refresh")

    async def close(self) -> None:
        """Stop refreshing and close the HTTP session if this object created it."""
        self._started = False
        tasks = [s.inflight for s in self._states.values() if s.inflight is not None]
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

    def update_issuers(self, issuers: Sequence[IssuerConfig]) -> None:
        """Apply a policy reload. Unchanged issuers keep their keys and cached tokens; removed
        or changed ones are retired and their cached tokens dropped."""
        new_states: dict[str, _IssuerState] = {}
        for config in issuers:
            previous = self._states.get(config.name)
            if previous is not None and previous.config == config:
                new_states[config.name] = previous
                continue
            state = _IssuerState(config)
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
                # Same key source, other settings changed: keep serving its keys until refreshed.
                state.set_keys(previous.keys)
                state.last_success = previous.last_success
            new_states[config.name] = state
        for name, previous in self._states.items():
            if new_states.get(name) is not previous:
                previous.retired = True
                previous.generation += 1
        self._states = new_states
        by_iss: dict[str, list[_IssuerState]] = {}
        for state in new_states.values():
            by_iss.setdefault(state.config.issuer, []).append(state)
        self._by_iss = {iss: tuple(states) for iss, states in by_iss.items()}
        self._evict_stale()
        if self._started and _loop_running():
            for state in new_states.values():
                if self._fetchable(state) and state.last_attempt is None:
                    self._start_refresh(state)

    def issuer_status(self) -> dict[str, IssuerKeyStatus]:
        """Per issuer name: key count, last successful load, last error."""
        return {
            name: IssuerKeyStatus(len(s.keys), s.last_success, s.last_error)
            for name, s in self._states.items()
        }

    # --- the request path -------------------------------------------------------------------

    async def authenticate(
        self, authorization: str | None, spiffe_id: str | None = None
    ) -> Identity | AuthnFailure:
        """Authenticate one request.

        A present `Authorization` header decides alone (an invalid token is
        never rescued by a client certificate); without it, a verified mTLS
        `spiffe_id` is the identity; with neither, `credential_missing`.
        """
        result = self.authenticate_now(authorization, spiffe_id)
        if result is not None:
            return result
        assert authorization is not None
        token = authorization.partition(" ")[2].strip(" \t")
        self.stats.cache_misses += 1
        return await self._verify(token)

    def authenticate_now(
        self, authorization: str | None, spiffe_id: str | None = None
    ) -> Identity | AuthnFailure | None:
        """`authenticate()`'s answer when it needs no signature check, else None.

        Decides missing or malformed credentials, SPIFFE IDs and bearer tokens in the
        verified-token cache (their time window and issuer keys re-checked) without a
        coroutine; None means the token must be verified: await `authenticate()`.
        """
        if authorization is None:
            if spiffe_id is None:
                return _MISSING
            if not is_spiffe_id(spiffe_id):
                return AuthnFailure(Reason.TOKEN_INVALID, "malformed SPIFFE ID")
            return Identity(
                kind=IdentityKind.SPIFFE, issuer="", subject=spiffe_id, spiffe_id=spiffe_id
            )
        if len(authorization) > _MAX_HEADER_LENGTH:
            return _TOO_LARGE
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return _NOT_BEARER
        token = token.strip(" \t")
        if not token:
            return _EMPTY
        if not token.isascii():
            return _NOT_ASCII
        entry = self._cache.get(token)
        if entry is not None:
            now = self._clock()
            if entry[3].generation == entry[4] and entry[1] <= now < entry[2]:
                self._cache.move_to_end(token)
                self.stats.cache_hits += 1
                return entry[0]
            self._uncache(token)  # expired or keys changed: verify afresh for the exact reason
        return None

    def _uncache(self, token: str) -> None:
        del self._cache[token]
        self._cached_bytes -= len(token)

    def _cache_token(self, token: str, entry: _CacheEntry) -> None:
        """Remember a verified token, evicting the least recently used over either bound."""
        size = len(token)
        if size > self._cache_bytes:
            return
        cache = self._cache
        if token in cache:  # verified twice concurrently: keep the newer entry
            self._uncache(token)
        while cache and (
            len(cache) >= self._cache_size or self._cached_bytes + size > self._cache_bytes
        ):
            evicted, _ = cache.popitem(last=False)
            self._cached_bytes -= len(evicted)
        cache[token] = entry
        self._cached_bytes += size

    async def _verify(self, token: str) -> Identity | AuthnFailure:
        try:
            parsed = parse_token(token)
        except TokenError as exc:
            return AuthnFailure(exc.reason, exc.detail)
        alg = parsed.alg
        if alg not in SUPPORTED_ALGORITHMS:
            # `none` in any case, HS* (HMAC with a public key as secret) and anything unknown.
            return AuthnFailure(Reason.ALGORITHM_NOT_ALLOWED, "algorithm not supported")
        iss = parsed.claims.get("iss")
        if not isinstance(iss, str):
            return AuthnFailure(Reason.UNKNOWN_ISSUER, "missing or non-string iss")
        states = self._by_iss.get(iss)
        if not states:
            return AuthnFailure(Reason.UNKNOWN_ISSUER, "iss is not a configured issuer")
        first_failure: AuthnFailure | None = None
        for state in states:
            result = await self._verify_with(state, parsed)
            if isinstance(result, AuthnFailure):
                first_failure = first_failure or result
                continue
            if self._cache_size and not state.retired:
                self._cache_token(
                    token,
                    (
                        result.identity,
                        result.not_before,
                        result.expires_at,
                        state,
                        state.generation,
                    ),
                )
            return result.identity
        assert first_failure is not None
        return first_failure

    async def _verify_with(
        self, state: _IssuerState, parsed: ParsedToken
    ) -> ValidatedToken | AuthnFailure:
        config = state.config
        alg, kid = parsed.alg, parsed.kid
        if alg not in config.algorithms:
            return AuthnFailure(Reason.ALGORITHM_NOT_ALLOWED, f"{alg} not allowed for this issuer")
        candidates = state.keys.candidates(kid, alg)
        known_kid = kid is not None and state.keys.has_kid(kid)
        if not candidates and not known_kid and await self._refresh_for_unknown_key(state):
            candidates = state.keys.candidates(kid, alg)
        if not candidates:
            if kid is not None and state.keys.has_kid(kid):
                # (never echo the kid: it is attacker-controlled text)
                return AuthnFailure(
                    Reason.ALGORITHM_NOT_ALLOWED, f"{alg} does not fit the kid's key"
                )
            return AuthnFailure(Reason.UNKNOWN_KEY, "no key for this kid")
        generation = state.generation
        for key in candidates[:MAX_KEYS_TRIED]:
            if verify_signature(key.key, alg, parsed.signing_input, parsed.signature):
                break
        else:
            return _BAD_SIGNATURE
        try:
            validated = validate_claims(parsed.claims, config, self._clock())
        except TokenError as exc:
            return AuthnFailure(exc.reason, exc.detail)
        if state.generation != generation or state.retired:
            return AuthnFailure(Reason.UNKNOWN_KEY, "issuer keys changed during verification")
        return validated

    # --- JWKS refresh -----------------------------------------------------------------------

    @staticmethod
    def _fetchable(state: _IssuerState) -> bool:
        return state.config.jwks is None and state.config.jwks_uri is not None

    async def _refresh_for_unknown_key(self, state: _IssuerState) -> bool:
        """Refresh an issuer's JWKS for an unknown kid, within the rate limit.

        Returns True when a fetch ran (or was joined) and finished. Concurrent
        callers share one in-flight fetch; a cancelled caller does not cancel it.
        """
        if not self._fetchable(state):
            return False
        task = state.inflight
        if task is None:
            now = self._clock()
            last = state.last_attempt
            if last is not None and 0 <= now - last < self._min_refresh_interval:
                self.stats.jwks_refresh_rate_limited += 1
                return False
            task = self._start_refresh(state)
        await asyncio.shield(task)
        return True

    def _start_refresh(self, state: _IssuerState) -> asyncio.Task[None]:
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

    async def _refresh(self, state: _IssuerState) -> None:
        """Fetch and install an issuer's JWKS. Never raises; a failure keeps the old keys."""
        name, uri = state.config.name, state.config.jwks_uri
        assert uri is not None
        try:
            if self._session is None:
                self._session = aiohttp.ClientSession()
                self._owns_session = True
            keys = await fetch_jwks(self._session, uri, self._jwks_timeout)
        except JwksError as exc:
            state.last_error = str(exc)
            self._count_refresh(name, "error")
            log.warning(
                "issuer %s: JWKS refresh failed (keeping %d keys): %s", name, len(state.keys), exc
            )
            return
        except Exception as exc:  # fail closed but keep the process alive: keys stay as they were
            state.last_error = f"internal error: {type(exc).__name__}"
            self._count_refresh(name, "error")
            log.exception("issuer %s: JWKS refresh crashed", name)
            return
        if state.retired:
            return
        state.last_error = None
        state.last_success = self._clock()
        self._count_refresh(name, "success")
        if state.set_keys(keys):
            log.info("issuer %s: JWKS loaded, %d keys", name, len(keys))
            self._evict_stale()

    def _count_refresh(self, issuer: str, result: str) -> None:
        key = (issuer, result)
        self.stats.jwks_refresh[key] = self.stats.jwks_refresh.get(key, 0) + 1

    async def _refresh_loop(self) -> None:
        """Scheduled refreshes: every issuer's refresh period, and after a failure every
        `min_refresh_interval`, per `jwks_uri` issuer."""
        tick = max(0.05, min(self._min_refresh_interval, self._refresh_interval or 1e9))
        while True:
            await asyncio.sleep(tick)
            try:
                self._start_due_refreshes()
            except Exception:  # never let the schedule die silently
                log.exception("JWKS refresh schedule failed")

    def _start_due_refreshes(self) -> None:
        now = self._clock()
        for state in list(self._states.values()):
            if not self._fetchable(state) or state.inflight is not None:
                continue
            last = state.last_attempt
            elapsed = float("inf") if last is None or now < last else now - last
            failing = state.last_error is not None or state.last_success is None
            period = self._refresh_interval or float(state.config.refresh_interval_seconds)
            if elapsed >= period or (failing and elapsed >= self._min_refresh_interval):
                self._start_refresh(state)

    def _evict_stale(self) -> None:
        """Drop cache entries whose issuer was retired or whose keys changed."""
        stale = [
            token
            for token, (_, _, _, state, generation) in self._cache.items()
            if state.generation != generation
        ]
        for token in stale:
            self._uncache(token)
