"""Allowed requests reach the upstream with the right headers and without the caller's secrets."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest
from yarl import URL

pytestmark = pytest.mark.usefixtures("http1_server")


async def test_allowed_request_reaches_upstream_with_identity_and_without_credential(
    proxy: Any,
) -> None:
    url = URL(f"{proxy.url}/v1/items/42?x=1&y=%2F", encoded=True)
    async with proxy.session.get(url, headers=proxy.auth()) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["path"] == "/v1/items/42?x=1&y=%2F"  # query forwarded untouched
    seen = proxy.upstream.requests[-1]
    names = {k.lower() for k, _ in seen.headers}
    assert "authorization" not in names
    assert proxy.upstream.last_header("X-Nhigate-Subject") == ["ci-deployer"]
    assert proxy.upstream.last_header("X-Nhigate-Issuer") == ["ci"]
    assert proxy.upstream.last_header("X-Nhigate-Grant") == ["payments/read"]
    assert proxy.upstream.last_header("X-Forwarded-For") == ["127.0.0.1"]
    assert proxy.upstream.last_header("X-Forwarded-Proto") == ["http"]
    request_id = proxy.upstream.last_header("X-Request-Id")
    assert len(request_id) == 1
    records = await proxy.wait_audit(1)
    assert len(records) == 1
    record = records[0]
    assert record["decision"] == "allow"
    assert record["reason"] == "allowed"
    assert record["request_id"] == request_id[0]
    assert record["identity"] == {"issuer": "ci", "subject": "ci-deployer", "kind": "jwt"}
    assert record["grant"] == "payments/read"
    assert record["status"] == 200
    assert record["path"] == "/v1/items/42"
    assert record["method"] == "GET"
    assert record["upstream"] == proxy.upstream.url
    assert record["policy_version"] == proxy.holder.current.version
    assert record["duration_ms"] >= 0
    assert record["time"].endswith("Z")


async def test_caller_supplied_proxy_headers_are_replaced(proxy: Any) -> None:
    forged = {
        "X-Nhigate-Subject": "admin",
        "X-Nhigate-Issuer": "root",
        "X-Nhigate-Grant": "everything",
        "X-Nhigate-Assertion": "forged.jwt.value",
        "X-Nhigate-Anything": "x",
        "X-Request-Id": "caller-chosen",
        "X-Forwarded-For": "10.9.9.9",
        "X-Forwarded-Host": "evil.example",
        "X-Real-IP": "10.9.9.9",
        "Forwarded": "for=10.9.9.9",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "X-Kept": "yes",
    }
    async with proxy.session.get(
        f"{proxy.url}/v1/items/1", headers={**forged, **proxy.auth()}
    ) as resp:
        assert resp.status == 200
    assert proxy.upstream.last_header("X-Nhigate-Subject") == ["ci-deployer"]
    assert proxy.upstream.last_header("X-Nhigate-Issuer") == ["ci"]
    assert proxy.upstream.last_header("X-Nhigate-Grant") == ["payments/read"]
    assert proxy.upstream.last_header("X-Nhigate-Assertion") == []
    assert proxy.upstream.last_header("X-Nhigate-Anything") == []
    assert proxy.upstream.last_header("X-Request-Id") != ["caller-chosen"]
    assert proxy.upstream.last_header("X-Forwarded-For") == ["127.0.0.1"]
    assert proxy.upstream.last_header("X-Forwarded-Host") != ["evil.example"]
    for name in ("X-Real-IP", "Forwarded", "Proxy-Authorization", "Keep-Alive", "TE"):
        assert proxy.upstream.last_header(name) == [], name
    assert proxy.upstream.last_header("X-Kept") == ["yes"]


async def test_connection_header_cannot_smuggle_or_strip_proxy_headers(proxy: Any) -> None:
    headers = {
        "Connection": "keep-alive, authorization, x-nhigate-subject, x-custom",
        "X-Custom": "hop",
        **proxy.auth(),
    }
    async with proxy.session.get(f"{proxy.url}/v1/items/1", headers=headers) as resp:
        assert resp.status == 200
    # The proxy-set identity survives; the caller's credential and Connection-named headers do not.
    assert proxy.upstream.last_header("X-Nhigate-Subject") == ["ci-deployer"]
    assert proxy.upstream.last_header("Authorization") == []
    assert proxy.upstream.last_header("X-Custom") == []
    # Naming Authorization in Connection does not let an unauthenticated caller through.
    async with proxy.session.get(
        f"{proxy.url}/v1/items/1", headers={"Connection": "authorization"}
    ) as resp:
        assert resp.status == 401


async def test_request_and_response_bodies_stream_both_ways(kit: Any, signing_key: Any) -> None:
    from aiohttp import web

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(64):
            await resp.write(b"x" * 65536)
        await resp.write_eof()
        return resp

    upstream, up_runner = await kit.start_upstream(big)
    write = kit.grant("w", "ci-deployer", ("/upload",), frozenset({"POST", "GET"}))
    harness, runner = await kit.start_proxy(
        upstream.url, key=signing_key, upstream=upstream, policy_grants=(write,)
    )
    try:
        payload = b"y" * (3 * 1024 * 1024)

        async def chunks() -> Any:
            for i in range(0, len(payload), 100_000):
                yield payload[i : i + 100_000]

        async with harness.session.post(
            f"{harness.url}/upload", data=chunks(), headers=harness.auth()
        ) as resp:
            assert resp.status == 200
            received = await resp.read()
        assert len(received) == 64 * 65536
        assert upstream.requests[-1].body == payload
        async with harness.session.post(
            f"{harness.url}/upload", data=io.BytesIO(payload), headers=harness.auth()
        ) as resp:
            assert resp.status == 200
            await resp.read()
        assert upstream.requests[-1].body == payload
        records = await harness.wait_audit(2)
        assert [r["status"] for r in records] == [200, 200]
    finally:
        await harness.session.close()
        await runner.cleanup()
        await up_runner.cleanup()


async def test_redirects_are_returned_not_followed(kit: Any, signing_key: Any) -> None:
    from aiohttp import web

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/v1/admin")

    upstream, up_runner = await kit.start_upstream(redirect)
    harness, runner = await kit.start_proxy(upstream.url, key=signing_key, upstream=upstream)
    try:
        async with harness.session.get(
            f"{harness.url}/v1/items/1", headers=harness.auth(), allow_redirects=False
        ) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "/v1/admin"
        assert [r.raw_path for r in upstream.requests] == ["/v1/items/1"]
    finally:
        await harness.session.close()
        await runner.cleanup()
        await up_runner.cleanup()


async def test_keep_alive_connections_are_reused(proxy: Any) -> None:
    for _ in range(20):
        async with proxy.session.get(f"{proxy.url}/v1/items/1", headers=proxy.auth()) as resp:
            assert resp.status == 200
    from nhigate.proxy.state import STATE

    pool = proxy.app[STATE].pool
    assert pool.connections_opened <= 2


async def test_head_request_keeps_length_and_no_body(proxy: Any) -> None:
    async with proxy.session.head(f"{proxy.url}/v1/items/1", headers=proxy.auth()) as resp:
        assert resp.status == 200
        assert await resp.read() == b""
    # The connection after a HEAD is still good for the next request.
    async with proxy.session.get(f"{proxy.url}/v1/items/2", headers=proxy.auth()) as resp:
        assert resp.status == 200
        assert (await resp.json())["path"] == "/v1/items/2"
    await asyncio.sleep(0)
