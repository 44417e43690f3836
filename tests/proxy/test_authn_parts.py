"""The Authenticator's three parts alone: the token cache, the verifier and the JWKS refresher."""

from __future__ import annotations

import asyncio

import pytest
from jwt_factory import (
    FakeClock,
    JwksServer,
    TestKey,
    claims_for,
    encode_segments,
    hmac_token,
    jwks_for,
    make_signing_key,
    sign,
)

from nhigate.policy.document import IssuerConfig
from nhigate.policy.model import Identity, IdentityKind, Reason
from nhigate.proxy.authn import Authenticator
from nhigate.proxy.jwks import load_jwks
from nhigate.proxy.jwks_refresher import IssuerKeys, JwksRefresher, refresh_due
from nhigate.proxy.token_cache import TokenCache
from nhigate.proxy.token_verifier import (
    MAX_KEYS_TRIED,
    NO_KEY_FOR_KID,
    AuthnFailure,
    read_token,
    verify,
)
from nhigate.proxy.tokens import ParsedToken, ValidatedToken

ISS = "https://parts.example"
AUD = "api"
NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def key() -> TestKey:
    return make_signing_key("ES256", "k1")


def config(**overrides: object) -> IssuerConfig:
    fields: dict[str, object] = {
        "name": "ci",
        "issuer": ISS,
        "audiences": (AUD,),
        "algorithms": ("ES256",),
        "max_token_lifetime_seconds": 3600,
        "clock_skew_seconds": 0,
    }
    fields.update(overrides)
    return IssuerConfig(**fields)  # type: ignore[arg-type]


# -- TokenCache -------------------------------------------------------------------------------


class Source:
    """A key source whose generation a test moves by hand."""

    def __init__(self) -> None:
        self.generation = 0


def verified(
    subject: str, not_before: float = NOW - 10, expires_at: float = NOW + 60
) -> ValidatedToken:
    identity = Identity(kind=IdentityKind.JWT, issuer="ci", subject=subject)
    return ValidatedToken(identity, not_before, expires_at)


def test_cache_serves_inside_the_window_and_drops_outside_it() -> None:
    clock = FakeClock(NOW)
    cache = TokenCache(10, clock=clock)
    cache.store("t", verified("a", not_before=NOW - 1, expires_at=NOW + 5), Source())
    assert cache.lookup("t") == Identity(kind=IdentityKind.JWT, issuer="ci", subject="a")
    assert cache.hits == 1
    clock.advance(5)  # expires_at itself is already expired
    assert cache.lookup("t") is None
    assert len(cache) == 0  # dropped, so the caller verifies afresh for the exact reason
    cache.store("early", verified("b", not_before=NOW + 100), Source())
    assert cache.lookup("early") is None
    assert cache.hits == 1


def test_cache_is_bounded_by_count_least_recently_used_first() -> None:
    cache = TokenCache(3, clock=FakeClock(NOW))
    source = Source()
    for name in "abc":
        cache.store(name, verified(name), source)
    assert cache.lookup("a") is not None  # a is now the most recently used
    cache.store("d", verified("d"), source)
    assert len(cache) == 3
    assert cache.lookup("b") is None  # the least recently used went
    assert [cache.lookup(n) is not None for n in "acd"] == [True, True, True]


def test_cache_is_bounded_by_token_bytes_and_skips_oversized_tokens() -> None:
    cache = TokenCache(100, 10, clock=FakeClock(NOW))
    source = Source()
    cache.store("x" * 11, verified("big"), source)
    assert len(cache) == 0
    cache.store("a" * 4, verified("a"), source)
    cache.store("b" * 4, verified("b"), source)
    cache.store("c" * 4, verified("c"), source)  # 12 > 10: the oldest goes
    assert cache.lookup("a" * 4) is None
    assert cache.lookup("b" * 4) is not None
    assert cache.lookup("c" * 4) is not None
    cache.store("b" * 4, verified("b2"), source)  # stored again: replaced, not counted twice
    assert len(cache) == 2
    assert cache.lookup("b" * 4) == Identity(kind=IdentityKind.JWT, issuer="ci", subject="b2")


def test_cache_of_size_zero_stores_nothing() -> None:
    cache = TokenCache(0, clock=FakeClock(NOW))
    cache.store("t", verified("a"), Source())
    assert len(cache) == 0
    assert cache.lookup("t") is None


def test_cache_never_serves_a_token_verified_with_keys_that_changed() -> None:
    cache = TokenCache(10, clock=FakeClock(NOW))
    rotated, kept = Source(), Source()
    cache.store("old", verified("a"), rotated)
    cache.store("other", verified("b"), rotated)
    cache.store("kept", verified("c"), kept)
    rotated.generation += 1
    assert cache.lookup("old") is None  # on lookup ...
    cache.evict_stale()  # ... and eagerly
    assert len(cache) == 1
    assert cache.lookup("kept") is not None


# -- token_verifier ---------------------------------------------------------------------------


def parsed(token: str) -> ParsedToken:
    result = read_token(token)
    assert isinstance(result, ParsedToken), result
    return result


def refusal(result: object) -> tuple[Reason, str]:
    assert isinstance(result, AuthnFailure), result
    return result.reason, result.detail


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("not.a.jws.at.all", Reason.TOKEN_MALFORMED),
        ("", Reason.TOKEN_MALFORMED),
        (encode_segments({"alg": "none"}, {"iss": ISS}) + ".", Reason.ALGORITHM_NOT_ALLOWED),
        (
            hmac_token(b"public-key-bytes", {"alg": "HS256"}, {"iss": ISS}),
            Reason.ALGORITHM_NOT_ALLOWED,
        ),
    ],
)
def test_read_token_refuses_before_any_issuer_is_consulted(token: str, reason: Reason) -> None:
    assert refusal(read_token(token))[0] is reason


@pytest.mark.parametrize("claims", [{"aud": AUD, "sub": "x"}, {"iss": 7, "aud": AUD, "sub": "x"}])
def test_read_token_needs_a_string_iss(key: TestKey, claims: dict[str, object]) -> None:
    assert refusal(read_token(sign(key, claims)))[0] is Reason.UNKNOWN_ISSUER


def test_verify_accepts_a_valid_token_with_its_window(key: TestKey) -> None:
    token = sign(key, claims_for(ISS, AUD, now=NOW, lifetime=300))
    result = verify(parsed(token), config(), load_jwks(jwks_for(key)), NOW)
    assert isinstance(result, ValidatedToken)
    assert result.identity.subject == "ci-deployer"
    assert result.identity.issuer == "ci"
    assert (result.not_before, result.expires_at) == (NOW, NOW + 300)


def test_verify_refusals(key: TestKey) -> None:
    keys = load_jwks(jwks_for(key))
    good = parsed(sign(key, claims_for(ISS, AUD, now=NOW)))
    assert refusal(verify(good, config(algorithms=("RS256",)), keys, NOW)) == (
        Reason.ALGORITHM_NOT_ALLOWED,
        "ES256 not allowed for this issuer",
    )
    assert refusal(verify(good, config(), keys, NOW + 301))[0] is Reason.TOKEN_EXPIRED
    assert refusal(verify(good, config(audiences=("other",)), keys, NOW))[0] is (
        Reason.AUDIENCE_MISMATCH
    )
    forged = parsed(sign(make_signing_key("ES256", "k1"), claims_for(ISS, AUD, now=NOW)))
    assert refusal(verify(forged, config(), keys, NOW)) == (
        Reason.TOKEN_INVALID,
        "signature verification failed",
    )


def test_verify_answers_no_key_for_kid_only_when_a_refresh_could_help(key: TestKey) -> None:
    keys = load_jwks(jwks_for(key))
    unknown = parsed(sign(make_signing_key("ES256", "k2"), claims_for(ISS, AUD, now=NOW)))
    assert verify(unknown, config(), keys, NOW) is NO_KEY_FOR_KID
    # A known kid whose key does not fit the alg: no refresh would change that.
    rsa = make_signing_key("RS256", "k1")
    wrong_alg = parsed(sign(rsa, claims_for(ISS, AUD, now=NOW)))
    result = verify(wrong_alg, config(algorithms=("ES256", "RS256")), keys, NOW)
    assert result is not NO_KEY_FOR_KID
    assert refusal(result) == (Reason.ALGORITHM_NOT_ALLOWED, "RS256 does not fit the kid's key")


def test_verify_tries_a_bounded_number_of_keys_for_a_token_without_kid() -> None:
    keys = [make_signing_key("ES256", None) for _ in range(MAX_KEYS_TRIED + 1)]
    key_set = load_jwks(jwks_for(*keys))
    claims = claims_for(ISS, AUD, now=NOW)
    within = parsed(sign(keys[MAX_KEYS_TRIED - 1], claims, {"kid": None}))
    beyond = parsed(sign(keys[MAX_KEYS_TRIED], claims, {"kid": None}))
    assert isinstance(verify(within, config(), key_set, NOW), ValidatedToken)
    assert refusal(verify(beyond, config(), key_set, NOW))[0] is Reason.TOKEN_INVALID


# -- jwks_refresher ---------------------------------------------------------------------------


def issuer_keys(*, last_attempt: float | None, failing: bool) -> IssuerKeys:
    state = IssuerKeys(config(jwks_uri="http://127.0.0.1:1/jwks"))
    state.last_attempt = last_attempt
    if not failing:
        state.last_success = last_attempt
    else:
        state.last_error = "503"
    return state


@pytest.mark.parametrize(
    ("last_attempt", "failing", "now", "due"),
    [
        (None, True, NOW, True),  # never fetched
        (NOW - 299, False, NOW, False),  # healthy: waits for its period
        (NOW - 300, False, NOW, True),
        (NOW - 9, True, NOW, False),  # failing: retried, but not faster than retry_after
        (NOW - 10, True, NOW, True),
        (NOW + 50, False, NOW, True),  # the clock went back: do not wait for a future time
    ],
)
def test_refresh_due(last_attempt: float | None, failing: bool, now: float, due: bool) -> None:
    state = issuer_keys(last_attempt=last_attempt, failing=failing)
    assert refresh_due(state, now, period=300, retry_after=10) is due


async def test_unknown_kid_refresh_is_rate_limited_and_shared(key: TestKey) -> None:
    clock = FakeClock(NOW)
    async with JwksServer(jwks_for(key)) as server:
        refresher = JwksRefresher(
            session=None, clock=clock, on_keys_changed=lambda: None, min_refresh_interval=10
        )
        refresher.update([config(jwks_uri=server.uri)])
        try:
            (state,) = refresher.for_iss(ISS)
            assert await refresher.refresh_for_unknown_key(state) is True
            assert server.hits == 1
            assert len(state.keys) == 1
            clock.advance(9)
            assert await refresher.refresh_for_unknown_key(state) is False
            assert (server.hits, refresher.counts.rate_limited) == (1, 1)
            clock.advance(1)
            assert await refresher.refresh_for_unknown_key(state) is True
            assert server.hits == 2
            assert refresher.counts.results == {("ci", "success"): 2}
        finally:
            await refresher.close()


async def test_failed_fetch_keeps_keys_and_counts_the_error(key: TestKey) -> None:
    clock = FakeClock(NOW)
    async with JwksServer(jwks_for(key)) as server:
        refresher = JwksRefresher(
            session=None, clock=clock, on_keys_changed=lambda: None, min_refresh_interval=1
        )
        refresher.update([config(jwks_uri=server.uri)])
        try:
            (state,) = refresher.for_iss(ISS)
            await refresher.refresh_for_unknown_key(state)
            server.status = 503
            clock.advance(1)
            assert await refresher.refresh_for_unknown_key(state) is True
            status = refresher.status()["ci"]
            assert status.key_count == 1
            assert status.last_error is not None
            assert status.last_success == NOW
            assert refresher.counts.results == {("ci", "success"): 1, ("ci", "error"): 1}
        finally:
            await refresher.close()


def test_inline_keys_are_never_fetched_and_bad_ones_are_reported() -> None:
    refresher = JwksRefresher(session=None, clock=FakeClock(NOW), on_keys_changed=lambda: None)
    refresher.update([config(jwks={"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})])
    (state,) = refresher.for_iss(ISS)
    assert not state.fetchable
    status = refresher.status()["ci"]
    assert (status.key_count, status.last_success) == (0, None)
    assert status.last_error is not None


def test_reload_retires_changed_and_removed_issuers_and_keeps_unchanged_ones(key: TestKey) -> None:
    changes: list[None] = []
    refresher = JwksRefresher(
        session=None, clock=FakeClock(NOW), on_keys_changed=lambda: changes.append(None)
    )
    ci, other = config(jwks=jwks_for(key)), config(name="other", jwks=jwks_for(key))
    refresher.update([ci, other])
    (kept, removed) = refresher.for_iss(ISS)
    generations = (kept.generation, removed.generation)
    refresher.update([ci])
    assert refresher.for_iss(ISS) == (kept,)
    assert kept.generation == generations[0]
    assert not kept.retired
    assert removed.retired
    assert removed.generation == generations[1] + 1
    refresher.update([config(jwks=jwks_for(key), audiences=("new",))])
    assert kept.retired  # changed settings: a new state, tokens verified before do not count
    assert refresher.for_iss(ISS)[0] is not kept
    assert len(changes) == 3  # the cache is told after every reload
    assert refresher.for_iss("https://unknown.example") == ()


# -- the façade's one judgement across an await -----------------------------------------------


async def test_an_issuer_removed_while_a_key_fetch_is_awaited_never_authenticates() -> None:
    """Two issuers share an `iss`; the first needs a (slow) fetch for the token's kid. A reload
    that removes both while the request waits must not let the second one's keys vouch for it,
    and nothing may be cached for the removed issuer."""
    fetched, inline = make_signing_key("ES256", "a"), make_signing_key("ES256", "b")
    clock = FakeClock(NOW)
    async with JwksServer(jwks_for(fetched)) as server:
        server.delay = 0.3
        authn = Authenticator(
            [
                config(name="slow", jwks_uri=server.uri),
                config(name="inline", jwks=jwks_for(inline)),
            ],
            clock=clock,
        )
        try:
            header = "Bearer " + sign(inline, claims_for(ISS, AUD, now=NOW))
            pending = asyncio.create_task(authn.authenticate(header))
            for _ in range(500):  # until the fetch is under way (bounded: never hangs)
                if server.hits:
                    break
                await asyncio.sleep(0.01)
            assert server.hits == 1
            authn.update_issuers([])
            result = await pending
            assert isinstance(result, AuthnFailure), result
            assert result.reason is Reason.UNKNOWN_KEY
            assert len(authn._cache) == 0
            assert refusal(await authn.authenticate(header))[0] is Reason.UNKNOWN_ISSUER
        finally:
            await authn.close()
