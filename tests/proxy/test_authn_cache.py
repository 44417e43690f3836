"""The verified-token cache: hits re-check the clock, stay bounded, and never outlive keys."""

from __future__ import annotations

import time

import pytest
from jwt_factory import FakeClock, TestKey, claims_for, jwks_for, make_signing_key, sign

from nhigate.policy.document import IssuerConfig
from nhigate.policy.model import Identity, Reason
from nhigate.proxy.authn import Authenticator, AuthnFailure

ISS = "https://cache.example"
AUD = "api"


@pytest.fixture(scope="module")
def key() -> TestKey:
    return make_signing_key("ES256", "k1")


def issuer(key: TestKey, *, skew: int = 30, audiences: tuple[str, ...] = (AUD,)) -> IssuerConfig:
    return IssuerConfig(
        name="ci",
        issuer=ISS,
        audiences=audiences,
        algorithms=("ES256",),
        max_token_lifetime_seconds=3600,
        clock_skew_seconds=skew,
        jwks=jwks_for(key),
    )


async def test_hit_returns_same_identity_and_counts(key: TestKey) -> None:
    clock = FakeClock()
    authn = Authenticator([issuer(key)], clock=clock)
    header = "Bearer " + sign(key, claims_for(ISS, AUD, now=clock.now))
    first = await authn.authenticate(header)
    second = await authn.authenticate(header)
    assert isinstance(first, Identity)
    assert second is first
    assert (authn.stats.cache_misses, authn.stats.cache_hits) == (1, 1)


async def test_hit_rechecks_exp(key: TestKey) -> None:
    clock = FakeClock()
    authn = Authenticator([issuer(key, skew=30)], clock=clock)
    header = "Bearer " + sign(key, claims_for(ISS, AUD, now=clock.now, lifetime=60))
    assert isinstance(await authn.authenticate(header), Identity)
    clock.advance(60 + 29)  # inside the skew: still served from cache
    assert isinstance(await authn.authenticate(header), Identity)
    assert authn.stats.cache_hits == 1
    clock.advance(1)  # exp + skew reached
    result = await authn.authenticate(header)
    assert isinstance(result, AuthnFailure)
    assert result.reason is Reason.TOKEN_EXPIRED


async def test_hit_rechecks_not_before_when_clock_goes_back(key: TestKey) -> None:
    clock = FakeClock()
    authn = Authenticator([issuer(key, skew=0)], clock=clock)
    header = "Bearer " + sign(key, claims_for(ISS, AUD, now=clock.now, nbf=clock.now + 5))
    clock.advance(10)
    assert isinstance(await authn.authenticate(header), Identity)
    clock.advance(-20)  # wall clock stepped back before nbf
    result = await authn.authenticate(header)
    assert isinstance(result, AuthnFailure)
    assert result.reason is Reason.TOKEN_NOT_YET_VALID


async def test_cache_is_bounded_lru(key: TestKey) -> None:
    clock = FakeClock()
    authn = Authenticator([issuer(key)], clock=clock, cache_size=3)
    headers = [
        "Bearer " + sign(key, claims_for(ISS, AUD, sub=f"s{i}", now=clock.now)) for i in range(5)
    ]
    for h in headers:
        await authn.authenticate(h)
    assert len(authn._cache) == 3
    await authn.authenticate(headers[4])  # most recent: hit
    await authn.authenticate(headers[0])  # evicted: miss
    assert authn.stats.cache_hits == 1
    assert authn.stats.cache_misses == 6


async def test_cache_disabled(key: TestKey) -> None:
    authn = Authenticator([issuer(key)], cache_size=0)
    header = "Bearer " + sign(key, claims_for(ISS, AUD))
    assert isinstance(await authn.authenticate(header), Identity)
    assert isinstance(await authn.authenticate(header), Identity)
    assert authn.stats.cache_hits == 0
    assert len(authn._cache) == 0


async def test_failures_are_not_cached(key: TestKey) -> None:
    clock = FakeClock()
    authn = Authenticator([issuer(key, audiences=("other",))], clock=clock)
    header = "Bearer " + sign(key, claims_for(ISS, AUD, now=clock.now))
    assert isinstance(await authn.authenticate(header), AuthnFailure)
    authn.update_issuers([issuer(key)])  # the issuer now accepts our audience
    assert isinstance(await authn.authenticate(header), Identity)


async def test_key_rotation_in_inline_jwks_evicts(key: TestKey) -> None:
    clock = FakeClock()
    authn = Authenticator([issuer(key)], clock=clock)
    header = "Bearer " + sign(key, claims_for(ISS, AUD, now=clock.now))
    assert isinstance(await authn.authenticate(header), Identity)
    assert len(authn._cache) == 1
    replacement = make_signing_key("ES256", "k2")
    rotated = IssuerConfig(
        name="ci",
        issuer=ISS,
        audiences=(AUD,),
        algorithms=("ES256",),
        max_token_lifetime_seconds=3600,
        clock_skew_seconds=30,
        jwks=jwks_for(replacement),
    )
    authn.update_issuers([rotated])
    assert len(authn._cache) == 0  # evicted eagerly, not only on the next lookup
    result = await authn.authenticate(header)
    assert isinstance(result, AuthnFailure)
    assert result.reason is Reason.UNKNOWN_KEY


async def test_same_token_different_header_spacing_hits_cache(key: TestKey) -> None:
    authn = Authenticator([issuer(key)])
    token = sign(key, claims_for(ISS, AUD))
    await authn.authenticate("Bearer " + token)
    assert isinstance(await authn.authenticate("Bearer   " + token), Identity)
    assert authn.stats.cache_hits == 1


async def test_hit_path_is_cheap(key: TestKey) -> None:
    """Loose bound (shared CI cores): the measured number is in bench/token_bench.py."""
    authn = Authenticator([issuer(key)])
    header = "Bearer " + sign(key, claims_for(ISS, AUD))
    await authn.authenticate(header)
    rounds = 20_000
    start = time.perf_counter()
    for _ in range(rounds):
        await authn.authenticate(header)
    per_call = (time.perf_counter() - start) / rounds
    assert per_call < 50e-6, f"cache hit took {per_call * 1e6:.1f} µs"


async def test_cache_is_bounded_by_token_bytes_as_well_as_count(key: TestKey) -> None:
    # Large tokens must not let the cache grow past its byte budget (memory stays bounded).
    clock = FakeClock()
    tokens = [
        sign(key, {**claims_for(ISS, AUD, now=clock.now), "pad": "x" * 2000, "n": i})
        for i in range(12)
    ]
    budget = 3 * len(tokens[0]) + 10  # room for three of these tokens
    authn = Authenticator([issuer(key)], clock=clock, cache_size=1000, cache_bytes=budget)
    for token in tokens:
        assert isinstance(await authn.authenticate("Bearer " + token), Identity)
    assert authn.stats.cache_misses == 12
    # the three most recent are served from the cache; the oldest were evicted
    for token in tokens[-3:]:
        assert isinstance(await authn.authenticate("Bearer " + token), Identity)
    assert authn.stats.cache_hits == 3
    assert isinstance(await authn.authenticate("Bearer " + tokens[0]), Identity)
    assert authn.stats.cache_misses == 13


async def test_a_token_larger_than_the_byte_budget_is_verified_but_not_cached(key: TestKey) -> None:
    clock = FakeClock()
    header = "Bearer " + sign(key, {**claims_for(ISS, AUD, now=clock.now), "pad": "x" * 3000})
    authn = Authenticator([issuer(key)], clock=clock, cache_bytes=1000)
    assert isinstance(await authn.authenticate(header), Identity)
    assert isinstance(await authn.authenticate(header), Identity)
    assert (authn.stats.cache_misses, authn.stats.cache_hits) == (2, 0)
