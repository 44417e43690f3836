"""Every deny reason: the right status, one audit record, and nothing reaches the upstream."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from jwt_factory import claims_for, sign

from nhigate.policy import Revocation, ServiceConfig, TenantMapping

pytestmark = pytest.mark.usefixtures("http1_server")


async def _raw(url: str, request: bytes) -> bytes:
    """Send raw bytes (for request targets aiohttp's client will not produce)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    await writer.wait_closed()
    return data


async def _deny_case(proxy: Any, status: int, reason: str, **kwargs: Any) -> dict[str, Any]:
    before = len(proxy.audit_records())
    path = kwargs.pop("path", "/v1/items/1")
    method = kwargs.pop("method", "GET")
    async with proxy.session.request(method, f"{proxy.url}{path}", **kwargs) as resp:
        assert resp.status == status, await resp.text()
        body = await resp.json()
        assert body["error"] == reason
        assert resp.headers["X-Request-Id"] == body["request_id"]
        headers = dict(resp.headers)
    records = (await proxy.wait_audit(before + 1))[before:]
    assert len(records) == 1, records
    record = records[0]
    assert record["decision"] == "deny"
    assert record["reason"] == reason
    assert record["status"] == status
    assert record["request_id"] == body["request_id"]
    record["_headers"] = headers
    return record


async def test_missing_credential_is_401_with_challenge(proxy: Any) -> None:
    record = await _deny_case(proxy, 401, "credential_missing")
    assert record["_headers"]["WWW-Authenticate"].startswith("Bearer")
    assert record["identity"] is None
    assert proxy.upstream.requests == []


@pytest.mark.parametrize(
    ("claims_change", "reason"),
    [
        ({"exp": -60, "iat": -120}, "token_expired"),
        ({"aud": "someone-else"}, "audience_mismatch"),
        ({"iss": "https://other.issuer"}, "unknown_issuer"),
    ],
)
async def test_invalid_tokens_are_401_invalid_token(
    proxy: Any, claims_change: dict[str, Any], reason: str
) -> None:
    now = proxy.clock()
    claims = claims_for("https://issuer.test", "payments-api", now=now)
    for name, value in claims_change.items():
        claims[name] = now + value if name in ("exp", "iat") else value
    token = sign(proxy.key, claims)
    record = await _deny_case(proxy, 401, reason, headers={"Authorization": f"Bearer {token}"})
    assert 'error="invalid_token"' in record["_headers"]["WWW-Authenticate"]
    assert proxy.upstream.requests == []


async def test_garbage_token_is_401(proxy: Any) -> None:
    await _deny_case(proxy, 401, "token_malformed", headers={"Authorization": "Bearer a.b.c"})


async def test_ungranted_route_method_and_subject_are_403(proxy: Any) -> None:
    await _deny_case(proxy, 403, "no_matching_grant", path="/v1/admin", headers=proxy.auth())
    await _deny_case(proxy, 403, "no_matching_grant", method="DELETE", headers=proxy.auth())
    await _deny_case(proxy, 403, "no_matching_grant", headers=proxy.auth("someone-else"))
    assert proxy.upstream.requests == []


async def test_revoked_subject_is_403(proxy: Any, kit: Any) -> None:
    proxy.set_policy(
        kit.default_grants,
        revocations=(Revocation(name="r", issuer="ci", subject="ci-deployer"),),
    )
    await _deny_case(proxy, 403, "revoked", headers=proxy.auth())
    assert proxy.upstream.requests == []


async def test_tenant_header_and_claim_must_agree(proxy: Any, kit: Any) -> None:
    service = ServiceConfig(
        namespace="payments",
        name="payments-api",
        backend_service="api",
        backend_port=8080,
        tenant=TenantMapping(header="X-Tenant", claim="tenant"),
    )
    scoped = kit.grant("t", "ci-deployer", ("/v1/items/**",), tenant="acme")
    proxy.set_policy((scoped,), service=service)
    auth = proxy.auth(tenant="acme")
    await _deny_case(proxy, 403, "tenant_mismatch", headers={**auth, "X-Tenant": "globex"})
    async with proxy.session.get(
        f"{proxy.url}/v1/items/1", headers={**auth, "X-Tenant": "acme"}
    ) as resp:
        assert resp.status == 200
    assert len(proxy.upstream.requests) == 1


async def test_no_policy_is_503_and_audited(kit: Any, signing_key: Any, upstream: Any) -> None:
    harness, runner = await kit.start_proxy(
        upstream.url, key=signing_key, upstream=upstream, policy_grants=None
    )
    try:
        record = await _deny_case(harness, 503, "no_policy", headers=harness.auth())
        assert record["policy_version"] is None
        assert upstream.requests == []
    finally:
        await harness.session.close()
        await runner.cleanup()


async def test_grant_expiry_follows_the_proxy_clock_without_reload(proxy: Any, kit: Any) -> None:
    now = proxy.clock()
    expiring = kit.grant("short", "ci-deployer", ("/v1/items/**",), expires_at=now + 60)
    policy = proxy.set_policy((expiring,))
    async with proxy.session.get(f"{proxy.url}/v1/items/1", headers=proxy.auth()) as resp:
        assert resp.status == 200
    proxy.clock.offset = 61.0  # no reload: the same policy object is still loaded
    assert proxy.holder.current is policy
    record = await _deny_case(proxy, 403, "grant_expired", headers=proxy.auth())
    assert record["grant"] == "short"
    assert len(proxy.upstream.requests) == 1


@pytest.mark.parametrize(
    "target",
    [
        b"CONNECT 127.0.0.1:80 HTTP/1.1",
        b"TRACE /v1/items/1 HTTP/1.1",
        b"GET http://127.0.0.1/v1/admin HTTP/1.1",
        b"OPTIONS * HTTP/1.1",
    ],
)
async def test_non_origin_targets_and_tunnel_methods_are_rejected(
    proxy: Any, target: bytes
) -> None:
    token = proxy.token().encode()
    raw = target + b"\r\nHost: x\r\nAuthorization: Bearer " + token + b"\r\n\r\n"
    data = await _raw(proxy.url, raw)
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    records = await proxy.wait_audit(1)
    assert [r["reason"] for r in records] == ["request_rejected"]
    assert proxy.upstream.requests == []


async def test_two_authorization_headers_are_rejected(proxy: Any) -> None:
    token = proxy.token().encode()
    raw = (
        b"GET /v1/items/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + token
        + b"\r\nAuthorization: Bearer other\r\n\r\n"
    )
    data = await _raw(proxy.url, raw)
    assert data.startswith(b"HTTP/1.1 400")
    assert proxy.upstream.requests == []
