"""What the native HTTP/1.1 front end (`--http1-server native`, http1.py) does differently.

The shared suites (smuggling, paths, limits, slow clients, Expect, forwarding, retries,
decisions) run over both front ends; these pin the native one's explicit answers for what it
does not serve (WebSocket relays, MCP endpoints), the settings it refuses, and framing of a
streamed response and of pipelined requests on the wire.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from nhigate.policy import ServiceConfig
from nhigate.proxy.settings import ProxySettings, Upstream

SERVICE = ServiceConfig(
    namespace="payments",
    name="payments-api",
    backend_service="api",
    backend_port=8080,
    websocket_paths=("/ws",),
    mcp_endpoints=("/mcp",),
)


def test_native_front_end_with_an_http2_port_is_refused_at_startup() -> None:
    with pytest.raises(ValueError, match=r"--http1-server native serves HTTP/1\.1 only"):
        ProxySettings(
            upstream=Upstream("http", "127.0.0.1", 80),
            upstream_protocol="http2",
            http1_server="native",
        )


async def _raw(port: int, data: bytes, *, within: float = 3.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        async with asyncio.timeout(within):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    except TimeoutError:
        pass
    writer.close()
    return b"".join(chunks)


@pytest.fixture
async def native(kit: Any, signing_key: Any) -> Any:
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # no Content-Length: chunked towards the proxy
        await response.prepare(request)
        for part in (b"one,", b"two,", b"three"):
            await response.write(part)
            await asyncio.sleep(0.05)  # the proxy streams: the body is not there with the head
        await response.write_eof()
        return response

    upstream, up_runner = await kit.start_upstream(stream)
    harness, runner = await kit.start_proxy(
        upstream.url, key=signing_key, upstream=upstream, http1_server="native"
    )
    grants = (kit.grant("all", "ci-deployer", ("/**",), frozenset({"GET", "POST", "HEAD"})),)
    harness.holder.swap(kit.build_policy(signing_key, grants, service=SERVICE))
    yield harness
    await harness.session.close()
    await runner.cleanup()
    await up_runner.cleanup()


def _port(harness: Any) -> int:
    return int(harness.url.rsplit(":", 1)[1])


async def test_a_websocket_handshake_to_a_declared_path_gets_501(native: Any) -> None:
    head = (
        "GET /ws HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Authorization: Bearer {native.token()}\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: p\r\n\r\n"
    ).encode()
    raw = await _raw(_port(native), head)
    assert raw.startswith(b"HTTP/1.1 501 "), raw[:200]
    assert raw.count(b"HTTP/1.1 ") == 1  # nothing behind the handshake is parsed
    records = await native.wait_audit(1)
    assert records[-1]["reason"] == "upgrade_rejected"
    assert records[-1]["status"] == 501
    assert native.upstream.requests == []


async def test_an_mcp_endpoint_gets_501(native: Any) -> None:
    async with native.session.post(
        f"{native.url}/mcp",
        json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
        headers=native.auth(),
    ) as resp:
        assert resp.status == 501
    records = await native.wait_audit(1)
    assert records[-1]["reason"] == "request_rejected"
    assert native.upstream.requests == []


async def test_streamed_response_is_chunked_and_pipelined_answers_keep_their_order(
    native: Any,
) -> None:
    auth = f"Authorization: Bearer {native.token()}\r\n"
    batch = (
        f"GET /a HTTP/1.1\r\nHost: p\r\n{auth}\r\n"
        f"HEAD /b HTTP/1.1\r\nHost: p\r\n{auth}\r\n"
        f"GET /c HTTP/1.1\r\nHost: p\r\n{auth}Connection: close\r\n\r\n"
    ).encode()
    raw = await _raw(_port(native), batch)
    assert raw.count(b"HTTP/1.1 200 ") == 3, raw
    assert raw.count(b"Transfer-Encoding: chunked") == 2  # HEAD: head only
    first, second, third = raw.split(b"HTTP/1.1 200 ")[1:]
    assert first.endswith(b"\r\n\r\n4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n")
    assert b"\r\n\r\n" in second
    assert not second.split(b"\r\n\r\n", 1)[1]  # HEAD: no body
    assert [r.raw_path for r in native.upstream.requests] == ["/a", "/b", "/c"]
    assert third.endswith(b"0\r\n\r\n")


async def test_tls_listener_serves_and_forwards_https(
    kit: Any, upstream: Any, signing_key: Any, tmp_path: Any
) -> None:
    import ssl

    from test_websocket import _self_signed  # type: ignore[import-not-found]

    from nhigate.proxy.http1 import NativeRunner

    cert, key = _self_signed(tmp_path)
    harness, runner = await kit.start_proxy(
        upstream.url,
        key=signing_key,
        upstream=upstream,
        tls_cert=cert,
        tls_key=key,
        http1_server="native",
    )
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(str(cert), str(key))
    tls = NativeRunner(harness.app)
    tls.front = runner.front  # a second listener over the same front end
    try:
        port = await tls.start("127.0.0.1", 0, ssl_context=server_ssl)
        client_ssl = ssl.create_default_context(cafile=str(cert))
        async with harness.session.get(
            f"https://127.0.0.1:{port}/v1/items/1", headers=harness.auth(), ssl=client_ssl
        ) as resp:
            assert resp.status == 200
        assert upstream.last_header("X-Forwarded-Proto") == ["https"]
    finally:
        if tls._listener is not None:
            tls._listener.close()
        await harness.session.close()
        await runner.cleanup()
