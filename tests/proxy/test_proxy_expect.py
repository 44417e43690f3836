"""`Expect: 100-continue` is answered by the pipeline, and only once the request is authorised."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import urlsplit


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
