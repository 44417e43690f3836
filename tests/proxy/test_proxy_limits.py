"""413, 429 + Retry-After, 502, 504, policy swap under load, admin endpoints, standalone reload."""

from __future__ import annotations

import asyncio
import io
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from nhigate.policy import RateLimit
from nhigate.proxy.aiohttp_seam import bound_port

pytestmark = pytest.mark.usefixtures("http1_server")


async def test_body_over_the_limit_is_413(kit: Any, signing_key: Any, upstream: Any) -> None:
    write = kit.grant("w", "ci-deployer", ("/upload",), frozenset({"POST"}))
    harness, runner = await kit.start_proxy(
        upstream.url,
        key=signing_key,
        upstream=upstream,
        policy_grants=(write,),
        max_body_bytes=1000,
    )
    try:
        async with harness.session.post(
            f"{harness.url}/upload", data=io.BytesIO(b"x" * 1001), headers=harness.auth()
        ) as resp:
            assert resp.status == 413

        async def chunks() -> Any:
            for _ in range(5):
                yield b"y" * 400

        async with harness.session.post(
            f"{harness.url}/upload", data=chunks(), headers=harness.auth()
        ) as resp:
            assert resp.status == 413
        records = await harness.wait_audit(2)
        assert [(r["reason"], r["status"]) for r in records] == [("body_too_large", 413)] * 2
        assert all(len(r.body) <= 1000 for r in upstream.requests)
    finally:
        await harness.session.close()
        await runner.cleanup()


async def test_rate_limit_is_429_with_retry_after(proxy: Any, kit: Any) -> None:
    limited = kit.grant("limited", "ci-deployer", ("/v1/items/**",), rate_limit=RateLimit(0.5, 2))
    proxy.set_policy((limited,))
    statuses = []
    for _ in range(3):
        async with proxy.session.get(f"{proxy.url}/v1/items/1", headers=proxy.auth()) as resp:
            statuses.append(resp.status)
            retry_after = resp.headers.get("Retry-After")
    assert statuses == [200, 200, 429]
    assert retry_after is not None
    assert int(retry_after) >= 1
    # Another identity has its own bucket.
    other = kit.grant("other", "someone", ("/v1/items/**",), rate_limit=RateLimit(0.5, 2))
    proxy.set_policy((limited, other))
    async with proxy.session.get(f"{proxy.url}/v1/items/1", headers=proxy.auth("someone")) as resp:
        assert resp.status == 200
    records = await proxy.wait_audit(4)
    assert [r["reason"] for r in records] == ["allowed", "allowed", "rate_limited", "allowed"]


async def test_upstream_refusing_connections_is_502(kit: Any, signing_key: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    harness, runner = await kit.start_proxy(f"http://127.0.0.1:{dead_port}", key=signing_key)
    try:
        async with harness.session.get(f"{harness.url}/v1/items/1", headers=harness.auth()) as r:
            assert r.status == 502
            assert (await r.json())["error"] == "upstream_unavailable"
        records = await harness.wait_audit(1)
        assert [(x["reason"], x["status"]) for x in records] == [("upstream_unavailable", 502)]
    finally:
        await harness.session.close()
        await runner.cleanup()


async def test_slow_upstream_is_504_not_a_hang(kit: Any, signing_key: Any) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.5)
        return web.Response(text="late")

    upstream, up_runner = await kit.start_upstream(slow)
    harness, runner = await kit.start_proxy(
        upstream.url, key=signing_key, upstream=upstream, upstream_timeout=0.3
    )
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with harness.session.get(f"{harness.url}/v1/items/1", headers=harness.auth()) as r:
            assert r.status == 504
        assert loop.time() - started < 2.0
        records = await harness.wait_audit(1)
        assert [(x["reason"], x["status"]) for x in records] == [("upstream_timeout", 504)]
    finally:
        await harness.session.close()
        await runner.cleanup()
        await up_runner.cleanup()


async def test_upstream_closing_without_response_is_502(kit: Any, signing_key: Any) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    harness, runner = await kit.start_proxy(f"http://127.0.0.1:{port}", key=signing_key)
    try:
        async with harness.session.get(f"{harness.url}/v1/items/1", headers=harness.auth()) as r:
            assert r.status == 502
    finally:
        await harness.session.close()
        await runner.cleanup()
        server.close()
        await server.wait_closed()


async def test_policy_swap_under_load_drops_no_request(proxy: Any, kit: Any) -> None:
    proxy.upstream.delay = 0.005
    versions = []
    auth = proxy.auth()

    async def client() -> list[int]:
        statuses = []
        for _ in range(25):
            async with proxy.session.get(f"{proxy.url}/v1/items/1", headers=auth) as resp:
                statuses.append(resp.status)
                await resp.read()
        return statuses

    async def swapper() -> None:
        for i in range(20):
            extra = kit.grant(f"extra-{i}", f"other-{i}", ("/v1/other/**",))
            versions.append(proxy.set_policy((*kit.default_grants, extra)).version)
            await asyncio.sleep(0.01)

    results = await asyncio.gather(*(client() for _ in range(8)), swapper())
    statuses = [s for r in results[:-1] for s in r]
    assert statuses == [200] * 200
    assert len(set(versions)) == 20
    records = await proxy.wait_audit(200)
    assert len(records) == 200
    # Requests were served across several policy versions while swaps happened.
    assert len({r["policy_version"] for r in records}) > 1


async def test_admin_endpoints(kit: Any, signing_key: Any, upstream: Any) -> None:
    from nhigate.proxy.admin import create_admin_app

    harness, runner = await kit.start_proxy(
        upstream.url, key=signing_key, upstream=upstream, policy_grants=None
    )
    admin_runner = web.AppRunner(create_admin_app(harness.app))
    await admin_runner.setup()
    site = web.TCPSite(admin_runner, "127.0.0.1", 0)
    await site.start()
    admin = f"http://127.0.0.1:{bound_port(site)}"
    try:
        async with harness.session.get(f"{admin}/healthz") as resp:
            assert resp.status == 200
        async with harness.session.get(f"{admin}/readyz") as resp:
            assert resp.status == 503
        policy = harness.set_policy(kit.default_grants)
        async with harness.session.get(f"{admin}/readyz") as resp:
            assert resp.status == 200
            assert policy.version in await resp.text()
        async with harness.session.get(f"{harness.url}/v1/items/1", headers=harness.auth()) as r:
            assert r.status == 200
        async with harness.session.get(f"{admin}/metrics") as resp:
            text = await resp.text()
        assert 'nhigate_proxy_requests_total{decision="allow",grant="payments/read"' in text
        assert f'nhigate_proxy_policy_version_info{{version="{policy.version}"}} 1.0' in text
        async with harness.session.get(f"{admin}/jwks.json") as resp:
            keys = (await resp.json())["keys"]
        assert keys
        assert keys[0]["kty"] == "EC"
        # The proxied port never serves admin paths.
        async with harness.session.get(f"{harness.url}/metrics") as resp:
            assert resp.status == 401
    finally:
        await admin_runner.cleanup()
        await harness.session.close()
        await runner.cleanup()


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def test_standalone_reload_keeps_last_good_policy(tmp_path: Path) -> None:
    from nhigate.proxy.policy_source import PolicyHolder, StandaloneSource

    for name in ("issuer.yaml", "protected-service.yaml", "grant-ci-deploy.yaml"):
        (tmp_path / name).write_text((EXAMPLES / name).read_text())
    holder = PolicyHolder()
    results: list[str] = []
    import time

    source = StandaloneSource(
        tmp_path, None, holder, interval=0.05, clock=time.time, on_reload=results.append
    )
    assert await source.load_once()
    first = holder.current
    assert first is not None
    # An invalid change keeps the last good policy.
    (tmp_path / "broken.yaml").write_text("apiVersion: nhigate.io/v1alpha1\nkind: RouteGrant\n")
    assert not await source.load_once()
    assert holder.current is first
    assert source.last_error
    # A valid change swaps in a new version; no change, no reload.
    (tmp_path / "broken.yaml").unlink()
    (tmp_path / "grant-agent.yaml").write_text((EXAMPLES / "grant-agent.yaml").read_text())
    assert await source.load_once()
    assert holder.current is not None
    assert holder.current.version != first.version
    assert not await source.load_once()
    assert results == ["loaded", "error", "loaded"]
