"""`Expect: 100-continue` is answered by the pipeline, and only once the request is authorised."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import urlsplit

import pytest

from nhigate.proxy import app as proxy_app
from nhigate.proxy import factory

pytestmark = pytest.mark.usefixtures("http1_server")


async def _exchange(url: str, head: str, body: bytes | None) -> tuple[bytes, bytes]:
    """Send `head`, read what arrives within 0.5 s, then send `body` and read the rest."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(head.encode())
        await writer.drain()
        first = b""
        with contextlib.suppress(TimeoutError):
            first = await asyncio.wait_for(reader.read(65536), 0.5)
        rest = b""
        if body is not None and not first.startswith(b"HTTP/1.1 4"):
            writer.write(body)
            await writer.drain()
            rest = await asyncio.wait_for(reader.read(65536), 5.0)
        return first, rest
    finally:
        writer.close()


def _head(path: str, token: str | None, expect: str, length: int) -> str:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: proxy\r\n{auth}Expect: {expect}\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    )


async def test_continue_is_sent_after_authorisation(proxy: Any) -> None:
    first, rest = await _exchange(
        proxy.url, _head("/v1/items/1", proxy.token(), "100-continue", 5), b"hello"
    )
    assert first.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    response = first[len(b"HTTP/1.1 100 Continue\r\n\r\n") :] + rest
    assert response.startswith(b"HTTP/1.1 200")
    assert proxy.upstream.requests[-1].body == b"hello"
    assert not proxy.upstream.last_header("Expect")


async def test_unauthenticated_caller_gets_no_continue(proxy: Any) -> None:
    first, _ = await _exchange(proxy.url, _head("/v1/items/1", None, "100-continue", 5), b"hello")
    assert first.startswith(b"HTTP/1.1 401")
    assert b"100 Continue" not in first
    assert proxy.upstream.requests == []
    records = await proxy.wait_audit(1)
    assert [r["reason"] for r in records] == ["credential_missing"]


async def test_unsupported_expectation_is_refused_and_audited(proxy: Any) -> None:
    first, _ = await _exchange(proxy.url, _head("/v1/items/1", proxy.token(), "magic", 5), b"x")
    assert first.startswith(b"HTTP/1.1 400")
    assert proxy.upstream.requests == []
    records = await proxy.wait_audit(1)
    assert [(r["reason"], r["detail"]) for r in records] == [
        ("request_rejected", "unsupported Expect header")
    ]


async def test_behind_the_router_continue_is_sent_once(
    kit: Any, upstream: Any, signing_key: Any
) -> None:
    # A plain `web.AppRunner`: aiohttp's router answers the expectation before the pipeline
    # runs, so the pipeline must not send a second `100 Continue`.
    harness, runner = await kit.start_proxy(
        upstream.url, key=signing_key, upstream=upstream, routed=True
    )
    try:
        first, rest = await _exchange(
            harness.url, _head("/v1/items/1", harness.token(), "100-continue", 5), b"hello"
        )
        response = first + rest
        assert response.count(b"100 Continue") == 1
        assert response[len(b"HTTP/1.1 100 Continue\r\n\r\n") :].startswith(b"HTTP/1.1 200")
        assert upstream.requests[-1].body == b"hello"
    finally:
        await harness.session.close()
        await runner.cleanup()


async def test_one_pipeline_serves_both_entry_points(
    kit: Any, upstream: Any, signing_key: Any, monkeypatch: Any
) -> None:
    # One `ProxyHandler` per app: its request ids, header caches and MCP gate are the same
    # whether `ProxyRunner` or the router's middleware calls it.
    built: list[proxy_app.ProxyHandler] = []

    class Counted(proxy_app.ProxyHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(factory, "ProxyHandler", Counted)  # what create_app builds
    for routed in (False, True):
        built.clear()
        harness, runner = await kit.start_proxy(
            upstream.url, key=signing_key, upstream=upstream, routed=routed
        )
        try:
            response = await harness.session.get(
                f"{harness.url}/v1/items/1", headers=harness.auth()
            )
            assert response.status == 200
            assert built == [harness.app[proxy_app.PIPELINE]]
        finally:
            await harness.session.close()
            await runner.cleanup()
