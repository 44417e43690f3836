"""Authentication: turn an `Authorization` header (or an mTLS SPIFFE ID) into an `Identity`.

`Authenticator` is a thin façade over three parts, each with one concern:

- `token_cache.TokenCache`: verified tokens served again without a signature check
  (bounded, time window and issuer keys re-checked per hit; revocations and grants are
  checked per request later by `decide()`, so a cached token is still revocable);
- `token_verifier`: a token and one issuer's keys -> a verified token or why not (no I/O);
- `jwks_refresher.JwksRefresher`: each issuer's keys, refreshed on schedule and on an
  unknown `kid` within a per-issuer rate bound (keys survive a JWKS outage).

What stays here is reading the credential a request presents and the order of the steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import aiohttp

from nhigate.policy.document import IssuerConfig
from nhigate.policy.model import Identity, IdentityKind, Reason
from nhigate.proxy.jwks_refresher import JWKS_FETCH_TIMEOUT as JWKS_FETCH_TIMEOUT
from nhigate.proxy.jwks_refresher import IssuerKeyStatus as IssuerKeyStatus
from nhigate.proxy.jwks_refresher import JwksRefresher, RefreshCounts
from nhigate.proxy.spiffe import is_spiffe_id
from nhigate.proxy.token_cache import CACHE_TOKEN_BYTES as CACHE_TOKEN_BYTES
from nhigate.proxy.token_cache import TokenCache
from nhigate.proxy.token_verifier import MAX_KEYS_TRIED as MAX_KEYS_TRIED
from nhigate.proxy.token_verifier import NO_KEY_FOR_KID, read_token, verify
from nhigate.proxy.token_verifier import AuthnFailure as AuthnFailure
from nhigate.proxy.tokens import MAX_TOKEN_BYTES

_MAX_HEADER_LENGTH = MAX_TOKEN_BYTES + 64

_MISSING = AuthnFailure(Reason.CREDENTIAL_MISSING, "no credential")
_NOT_BEARER = AuthnFailure(Reason.CREDENTIAL_MISSING, "Authorization is not a Bearer credential")
_EMPTY = AuthnFailure(Reason.TOKEN_MALFORMED, "empty bearer token")
_TOO_LARGE = AuthnFailure(Reason.TOKEN_MALFORMED, "token too large")
_NOT_ASCII = AuthnFailure(Reason.TOKEN_MALFORMED, "token is not ASCII")
_BAD_SPIFFE_ID = AuthnFailure(Reason.TOKEN_INVALID, "malformed SPIFFE ID")
_UNKNOWN_ISSUER = AuthnFailure(Reason.UNKNOWN_ISSUER, "iss is not a configured issuer")
_KEYS_CHANGED = AuthnFailure(Reason.UNKNOWN_KEY, "issuer keys changed during verification")


class AuthnStats:
    """Counters exported by the metrics module, read from the parts that count them."""

    __slots__ = ("_cache", "_refresh", "cache_misses")

    def __init__(self, cache: TokenCache, refresh: RefreshCounts) -> None:
        self._cache = cache
        self._refresh = refresh
        self.cache_misses = 0
        """Bearer tokens that needed a signature check."""

    @property
    def cache_hits(self) -> int:
        """Bearer tokens answered from the verified-token cache."""
        return self._cache.hits

    @property
    def jwks_refresh(self) -> Mapping[tuple[str, str], int]:
        """(issuer name, result) -> count; result is "success" or "error" (jwks_refresh_total)."""
        return self._refresh.results

    @property
    def jwks_refresh_rate_limited(self) -> int:
        """Unknown-kid refreshes refused by the per-issuer rate limit."""
        return self._refresh.rate_limited


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
        self._clock = clock
        self._cache = TokenCache(cache_size, cache_bytes, clock=clock)
        self._keys = JwksRefresher(
            session=session,
            clock=clock,
            on_keys_changed=self._cache.evict_stale,
            min_refresh_interval=min_refresh_interval,
            refresh_interval=refresh_interval,
            timeout=jwks_timeout,
        )
        self.stats = AuthnStats(self._cache, self._keys.counts)
        self.update_issuers(issuers)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Fetch the JWKS of every `jwks_uri` issuer and start scheduled refreshes.

        Never raises: fetch failures are recorded (see `issuer_status()`) and
        retried; requests for such an issuer fail with `unknown_key` meanwhile.
        """
        await self._keys.start()

    async def close(self) -> None:
        """Stop refreshing and close the HTTP session if this object created it."""
        await self._keys.close()

    def update_issuers(self, issuers: Sequence[IssuerConfig]) -> None:
        """Apply a policy reload. Unchanged issuers keep their keys and cached tokens; removed
        or changed ones are retired and their cached tokens dropped."""
        self._keys.update(issuers)

    def issuer_status(self) -> dict[str, IssuerKeyStatus]:
        """Per issuer name: key count, last successful load, last error."""
        return self._keys.status()

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
                return _BAD_SPIFFE_ID
            return Identity(
                kind=IdentityKind.SPIFFE, issuer="", subject=spiffe_id, spiffe_id=spiffe_id
            )
        if len(authorization) > _MAX_HEADER_LENGTH:
            return _TOO_LARGE
        scheme, _, token = authorization.partition(" ")
        if scheme != "Bearer" and scheme.lower() != "bearer":  # (the usual spelling: no lower())
            return _NOT_BEARER
        token = token.strip(" \t")
        if not token:
            return _EMPTY
        identity = self._cache.lookup(token)
        if identity is not None:
            return identity
        # (checked after the lookup: only ASCII tokens are ever cached, so a hit needs no check)
        if not token.isascii():
            return _NOT_ASCII
        return None  # not cached, expired or keys changed: verify

    async def _verify(self, token: str) -> Identity | AuthnFailure:
        """Verify `token` against each issuer configured with its `iss` (the first success
        wins, else the first refusal); an unknown kid may refresh that issuer's keys once."""
        parsed = read_token(token)
        if isinstance(parsed, AuthnFailure):
            return parsed
        candidates = self._keys.for_iss(parsed.claims["iss"])
        if not candidates:
            return _UNKNOWN_ISSUER
        first_failure: AuthnFailure | None = None
        for issuer in candidates:
            result = verify(parsed, issuer.config, issuer.keys, self._clock())
            if result is NO_KEY_FOR_KID and await self._keys.refresh_for_unknown_key(issuer):
                result = verify(parsed, issuer.config, issuer.keys, self._clock())
            if not isinstance(result, AuthnFailure) and issuer.retired:
                # a reload removed the issuer while this request awaited a key fetch
                result = _KEYS_CHANGED
            if isinstance(result, AuthnFailure):
                first_failure = first_failure or result
                continue
            self._cache.store(token, result, issuer)
            return result.identity
        assert first_failure is not None
        return first_failure
