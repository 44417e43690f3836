"""JWKS over real HTTP (127.0.0.1): start-up fetch, unknown-kid refresh, rate limit, kid floods,
outages, slow and bad key servers, key rotation, policy reloads."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from jwt_factory import (
    FakeClock,
    JwksServer,
    TestKey,
    claims_for,
    jwks_for,
    make_signing_key,
    sign,
)

from nhigate.policy.document import IssuerConfig
from nhigate.policy.model import Identity, Reason
from nhigate.proxy.authn import Authenticator, AuthnFailure

ISS = "https://jwks.example"
AUD = "api"


@pytest.fixture(scope="module")
def key_a() -> TestKey:
    return make_signing_key("ES256", "key-a")


@pytest.fixture(scope="module")
def key_b() -> TestKey:
    return make_signing_key("RS256", "key-b")


@pytest.fixture
async def server(key_a: TestKey) -> AsyncIterator[JwksServer]:
    async with JwksServer(jwks_for(key_a)) as srv:
        yield srv


def config(uri: str, **changes: Any) -> IssuerConfig:
    fields: dict[str, Any] = {
        "name": "ci",
        "issuer": ISS,
        "audiences": (AUD,),
        "algorithms": ("RS256", "ES256"),
        "max_token_lifetime_seconds": 3600,
        "clock_skew_seconds": 30,
        "jwks_uri": uri,
    }
    fields.update(changes)
    return IssuerConfig(**fields)


def token(key: TestKey, clock: FakeClock, **headers: Any) -> str:
    return "Bearer " + sign(key, claims_for(ISS, AUD, now=clock.now), headers or None)


async def test_start_fetches_keys(server: JwksServer, key_a: TestKey) -> None:
    clock = FakeClock()
    authn = Authenticator([config(server.uri)], clock=clock)
    await authn.start()
    try:
        assert server.hits == 1
        assert authn.issuer_status()["ci"].key_count == 1
        assert isinstance(await authn.authenticate(token(key_a, clock)), Identity)
        assert authn.stats.jwks_refresh == {("ci", "success"): 1}
    finally:
        await authn.close()


async def test_start_does_not_raise_when_jwks_is_down(server: JwksServer, key_a: TestKey) -> None:
    server.status = 503
    clock = FakeClock()
    authn = Authenticator([config(server.uri)], clock=clock, min_refresh_interval=10)
    await authn.start()
    try:
        status = authn.issuer_status()["ci"]
        assert status.key_count == 0
        assert status.last_error == "HTTP 503"
        assert authn.stats.jwks_refresh == {("ci", "error"): 1}
        # Within the rate-limit window: no new fetch, unknown_key.
        result = await authn.authenticate(token(key_a, clock))
        assert isinstance(result, AuthnFailure)
        assert result.reason is Reason.UNKNOWN_KEY
        assert server.hits == 1
        # The server recovers; after the window the next request fetches and passes.
        server.status = 200
        clock.advance(11)
        assert isinstance(await authn.authenticate(token(key_a, clock)), Identity)
        assert server.hits == 2
    finally:
        await authn.close()


async def test_unknown_kid_triggers_refresh_then_rotation_key_works(
    server: JwksServer, key_a: TestKey, key_b: TestKey
) -> None:
    clock = FakeClock()
    authn = Authenticator([config(server.uri)], clock=clock, min_refresh_interval=10)
    await authn.start()
    try:
        clock.advance(11)
        server.jwks = jwks_for(key_a, key_b)  # the issuer rotates in key-b
        assert isinstance(await authn.authenticate(token(key_b, clock)), Identity)
        assert server.hits == 2
    finally:
        await authn.close()


async def test_kid_flood_costs_at_most_one_fetch_per_interval(
    server: JwksServer, key_a: TestKey
) -> None:
    attacker = make_signing_key("ES256", "attacker")
    clock = FakeClock()
    authn = Authenticator([config(server.uri)], clock=clock, min_refresh_interval=10)
    await authn.start()
    try:
        clock.advance(11)
        server.delay = 0.05  # keep the fetch in flight while the flood arrives
        flood = [token(attacker, clock, kid=secrets.token_hex(8)) for _ in range(300)]
        results = await asyncio.gather(*(authn.authenticate(t) for t in flood))
        assert all(isinstance(r, AuthnFailure) and r.reason is Reason.UNKNOWN_KEY for r in results)
        assert server.hits == 2  # start + one shared refresh for the whole concurrent flood
        # A second wave inside the window: no fetch at all.
        clock.advance(5)
        for t in flood[:100]:
            result = await authn.authenticate(t)
            assert isinstance(result, AuthnFailure)
            assert result.reason is Reason.UNKNOWN_KEY
        assert server.hits == 2
        assert authn.stats.jwks_refresh_rate_limited >= 100
        # Next window: exactly one more.
        clock.advance(6)
        for t in flood[:50]:
            await authn.authenticate(t)
        assert server.hits == 3
        # Legitimate traffic was never disturbed.
        assert isinstance(await authn.authenticate(token(key_a, clock)), Identity)
    finally:
        await authn.close()


async def test_keys_survive_outage_and_garbage(server: JwksServer, key_a: TestKey) -> None:
    clock = FakeClock()
    authn = Authenticator(
        [config(server.uri)], clock=clock, min_refresh_interval=1, jwks_timeout=0.3
    )
    await authn.start()
    unknown = make_signing_key("ES256", "not-published")
    try:
        for breakage in ("status", "garbage", "empty", "hmac-only", "slow"):
            server.status, server.body, server.delay = 200, None, 0.0
            if breakage == "status":
                server.status = 500
            elif breakage == "garbage":
                server.body = b"<html>not json"
            elif breakage == "empty":
                server.body = b'{"keys": []}'
            elif breakage == "hmac-only":
                server.body = b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "key-a"}]}'
            else:
                server.delay = 0.6  # beyond the fetch timeout
            clock.advance(2)
            hits = server.hits
            # An unknown kid forces a refresh against the broken server...
            result = await authn.authenticate(token(unknown, clock))
            assert isinstance(result, AuthnFailure)
            assert result.reason is Reason.UNKNOWN_KEY, breakage
            assert server.hits == hits + 1, breakage
            # ... and the known key still verifies.
            assert isinstance(await authn.authenticate(token(key_a, clock)), Identity), breakage
            assert authn.issuer_status()["ci"].last_error is not None
    finally:
        await authn.close()


async def test_rotation_removing_a_key_evicts_cached_tokens(
    server: JwksServer, key_a: TestKey, key_b: TestKey
) -> None:
    server.jwks = jwks_for(key_a, key_b)
    clock = FakeClock()
    authn = Authenticator([config(server.uri)], clock=clock, min_refresh_interval=1)
    await authn.start()
    try:
        old = token(key_a, clock)
        assert isinstance(await authn.authenticate(old), Identity)
        assert isinstance(await authn.authenticate(old), Identity)
        assert authn.stats.cache_hits == 1
        server.jwks = jwks_for(key_b)  # key-a withdrawn (compromised)
        clock.advance(2)
        # Any unknown kid triggers the refresh that notices the withdrawal.
        await authn.authenticate(token(make_signing_key("ES256", "other"), clock))
        result = await authn.authenticate(old)
        assert isinstance(result, AuthnFailure)
        assert result.reason is Reason.UNKNOWN_KEY
    finally:
        await authn.close()


async def test_unchanged_refresh_keeps_cache(server: JwksServer, key_a: TestKey) -> None:
    clock = FakeClock()
    authn = Authenticator([config(server.uri)], clock=clock, min_refresh_interval=1)
    await authn.start()
    try:
        good = token(key_a, clock)
        await authn.authenticate(good)
        clock.advance(2)
        await authn.authenticate(token(make_signing_key("ES256", "x"), clock))  # refresh, same keys
        hits = authn.stats.cache_hits
        assert isinstance(await authn.authenticate(good), Identity)
        assert authn.stats.cache_hits == hits + 1
    finally:
        await authn.close()


async def test_scheduled_refresh_picks_up_new_keys(
    server: JwksServer, key_a: TestKey, key_b: TestKey
) -> None:
    authn = Authenticator([config(server.uri)], min_refresh_interval=0.05, refresh_interval=0.1)
    await authn.start()
    try:
        server.jwks = jwks_for(key_b)
        for _ in range(100):  # no request triggers it: only the schedule can load key-b
            await asyncio.sleep(0.02)
            if server.hits >= 3:
                break
        assert server.hits >= 3
        assert authn.stats.jwks_refresh_rate_limited == 0
        now_token = "Bearer " + sign(key_b, claims_for(ISS, AUD))
        assert isinstance(await authn.authenticate(now_token), Identity)
        assert authn.stats.jwks_refresh[("ci", "success")] >= 3
    finally:
        await authn.close()


async def test_cancelled_request_does_not_cancel_shared_fetch(
    server: JwksServer, key_a: TestKey
) -> None:
    clock = FakeClock()
    authn = Authenticator([config(server.uri)], clock=clock)
    try:
        server.delay = 0.2
        first = asyncio.create_task(authn.authenticate(token(key_a, clock)))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(authn.authenticate(token(key_a, clock)))
        await asyncio.sleep(0.01)
        first.cancel()
        assert isinstance(await second, Identity)
        assert server.hits == 1
    finally:
        await authn.close()


async def test_token_key_urls_are_never_fetched(server: JwksServer, key_a: TestKey) -> None:
    """jku/x5u point at an attacker server holding the attacker's key: the refresh goes to the
    configured jwks_uri only, and the attacker's key is never trusted."""
    attacker = make_signing_key("ES256", "evil")
    async with JwksServer(jwks_for(attacker)) as evil:
        clock = FakeClock()
        authn = Authenticator([config(server.uri)], clock=clock)
        try:
            forged = token(attacker, clock, jku=evil.uri, x5u=evil.base + "/x.pem")
            result = await authn.authenticate(forged)
            assert isinstance(result, AuthnFailure)
            assert result.reason is Reason.UNKNOWN_KEY
            assert server.hits == 1
            assert evil.hits == 0
            assert evil.other_hits == 0
        finally:
            await authn.close()


async def test_update_issuers_keeps_unchanged_and_retires_removed(
    server: JwksServer, key_a: TestKey
) -> None:
    inline_key = make_signing_key("EdDSA", "inline")
    inline = IssuerConfig(
        name="inline",
        issuer="https://inline.example",
        audiences=(AUD,),
        algorithms=("EdDSA",),
        max_token_lifetime_seconds=600,
        clock_skew_seconds=0,
        jwks=jwks_for(inline_key),
    )
    clock = FakeClock()
    authn = Authenticator([config(server.uri), inline], clock=clock)
    await authn.start()
    try:
        ci_token = token(key_a, clock)
        inline_token = "Bearer " + sign(
            inline_key, claims_for("https://inline.example", AUD, now=clock.now)
        )
        for t in (ci_token, inline_token):
            assert isinstance(await authn.authenticate(t), Identity)
        # Reload: ci unchanged, inline's audiences changed.
        changed = IssuerConfig(
            name="inline",
            issuer="https://inline.example",
            audiences=("someone-else",),
            algorithms=("EdDSA",),
            max_token_lifetime_seconds=600,
            clock_skew_seconds=0,
            jwks=jwks_for(inline_key),
        )
        authn.update_issuers([config(server.uri), changed])
        hits = authn.stats.cache_hits
        assert isinstance(await authn.authenticate(ci_token), Identity)
        assert authn.stats.cache_hits == hits + 1  # unchanged issuer: still cached
        assert server.hits == 1  # and its keys kept, no refetch
        result = await authn.authenticate(inline_token)
        assert isinstance(result, AuthnFailure)
        assert result.reason is Reason.AUDIENCE_MISMATCH  # cached entry dropped, re-verified
        # Reload without ci: its tokens stop working at once.
        authn.update_issuers([changed])
        result = await authn.authenticate(ci_token)
        assert isinstance(result, AuthnFailure)
        assert result.reason is Reason.UNKNOWN_ISSUER
    finally:
        await authn.close()


async def test_update_issuers_with_new_uri_fetches(
    server: JwksServer, key_a: TestKey, key_b: TestKey
) -> None:
    async with JwksServer(jwks_for(key_b)) as other:
        clock = FakeClock()
        authn = Authenticator([config(server.uri)], clock=clock)
        await authn.start()
        try:
            authn.update_issuers([config(other.uri)])
            assert isinstance(await authn.authenticate(token(key_b, clock)), Identity)
            result = await authn.authenticate(token(key_a, clock))
            assert isinstance(result, AuthnFailure)
            assert result.reason is Reason.UNKNOWN_KEY
            assert other.hits >= 1
        finally:
            await authn.close()


async def test_each_issuer_is_refreshed_on_its_own_refresh_interval(key_a: TestKey) -> None:
    # The IdentityIssuer's refreshInterval reaches the proxy through the policy document.
    clock = FakeClock()
    async with JwksServer(jwks_for(key_a)) as fast, JwksServer(jwks_for(key_a)) as slow:
        authn = Authenticator(
            [
                config(fast.uri, refresh_interval_seconds=60),
                config(slow.uri, name="slow", issuer=ISS + "/slow", refresh_interval_seconds=600),
            ],
            clock=clock,
            min_refresh_interval=0.05,
        )
        await authn.start()
        try:
            assert (fast.hits, slow.hits) == (1, 1)
            clock.advance(61)  # past the fast issuer's period only
            for _ in range(100):
                await asyncio.sleep(0.02)
                if fast.hits >= 2:
                    break
            await asyncio.sleep(0.2)  # several more schedule ticks
            assert fast.hits == 2
            assert slow.hits == 1
            clock.advance(540)  # now 601 s: the slow issuer is due too
            for _ in range(100):
                await asyncio.sleep(0.02)
                if slow.hits >= 2:
                    break
            assert slow.hits == 2
        finally:
            await authn.close()
