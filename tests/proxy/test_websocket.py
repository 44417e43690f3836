"""WebSocket through the real proxy: aiohttp's own WebSocket server and client as the peers.

The backend is a real aiohttp WebSocket echo server (or, for the attacks, a raw TCP server
that misbehaves on purpose); the caller is aiohttp's WebSocket client or a raw socket.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import generate_latest

from nhigate.policy import Revocation, ServiceConfig
from nhigate.proxy.aiohttp_seam import bound_port
from nhigate.proxy.state import STATE

LARGE = 4 * 1024 * 1024 + 17
FLOOD_MESSAGES = 400
FLOOD_SIZE = 64 * 1024

WS_SERVICE = ServiceConfig(
    namespace="payments",
    name="payments-api",
    backend_service="api",
    backend_port=8080,
    websocket_paths=("/ws", "/rooms/*/ws"),
)


async def echo(request: web.Request) -> web.StreamResponse:
    """Echo text and binary messages; `close <code>` closes with that code."""
    ws = web.WebSocketResponse(max_msg_size=0)
    await ws.prepare(request)
    if request.path == "/rooms/greeting/ws":
        await ws.send_str("welcome")  # sent at once, before the caller says anything
    if request.path == "/rooms/deaf/ws":
        await asyncio.sleep(1.5)  # reads nothing for a while, then counts what came
        received = 0
        async for msg in ws:
            received += len(msg.data)
            if received >= FLOOD_MESSAGES * FLOOD_SIZE:
                await ws.send_str(f"got {received}")
                break
        return ws
    if request.path == "/rooms/flood/ws":
        for i in range(FLOOD_MESSAGES):  # as fast as the connection takes them
            await ws.send_bytes(i.to_bytes(4, "big") * (FLOOD_SIZE // 4))
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            if msg.data.startswith("close "):
                await ws.close(code=int(msg.data.split()[1]), message=b"bye")
                break
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


@pytest.fixture
async def ws_upstream(kit: Any) -> AsyncIterator[Any]:
    upstream, runner = await kit.start_upstream(echo)
    yield upstream
    await runner.cleanup()


@pytest.fixture
async def wsproxy(kit: Any, ws_upstream: Any, signing_key: Any) -> AsyncIterator[Any]:
    harness, runner = await kit.start_proxy(ws_upstream.url, key=signing_key, upstream=ws_upstream)
    harness.set_policy(_grants(kit), service=WS_SERVICE)
    yield harness
    await harness.session.close()
    await runner.cleanup()


def _grants(kit: Any, **kw: Any) -> tuple[Any, ...]:
    return (kit.grant("payments/ws", "ci-deployer", ("/ws", "/rooms/*/ws"), **kw),)


async def _connect(proxy: Any, path: str = "/ws", **kw: Any) -> aiohttp.ClientWebSocketResponse:
    headers = kw.pop("headers", proxy.auth())
    ws: aiohttp.ClientWebSocketResponse = await proxy.session.ws_connect(
        proxy.url + path, headers=headers, max_msg_size=0, autoping=False, **kw
    )
    return ws


async def _closed_within(ws: aiohttp.ClientWebSocketResponse, seconds: float) -> Any:
    msg = await asyncio.wait_for(ws.receive(), seconds)
    return msg


def _records(proxy: Any, event: str) -> list[dict[str, Any]]:
    return [r for r in proxy.audit_records() if (r.get("websocket") or {}).get("event") == event]


async def _wait_records(proxy: Any, event: str, count: int = 1) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 2.0
    while True:
        records = _records(proxy, event)
        if len(records) >= count or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.01)


# -- real peers ------------------------------------------------------------------------------


async def test_text_binary_large_ping_and_close_code_cross_the_proxy(wsproxy: Any) -> None:
    ws = await _connect(wsproxy)
    assert _metric(wsproxy, "nhigate_proxy_websocket_connections ") == 1
    await ws.send_str("hello")
    assert (await ws.receive()).data == "hello"
    await ws.send_bytes(b"\x00\xff" * 10)
    assert (await ws.receive()).data == b"\x00\xff" * 10
    big = os.urandom(LARGE)
    await ws.send_bytes(big)
    assert (await ws.receive(timeout=20)).data == big
    await ws.ping(b"are you there")
    pong = await ws.receive()
    assert (pong.type, pong.data) == (WSMsgType.PONG, b"are you there")
    await ws.send_str("close 4001")
    closing = await ws.receive()
    assert (closing.type, closing.data, closing.extra) == (WSMsgType.CLOSE, 4001, "bye")
    await ws.close()

    opened = await _wait_records(wsproxy, "open")
    closed = await _wait_records(wsproxy, "close")
    assert [(r["decision"], r["reason"], r["status"]) for r in opened] == [
        ("allow", "allowed", 101)
    ]
    assert len(closed) == 1
    record = closed[0]
    assert (record["decision"], record["reason"], record["grant"]) == (
        "close",
        "allowed",
        "payments/ws",
    )
    assert record["request_id"] == opened[0]["request_id"]
    assert record["websocket"]["closed_by"] in ("backend", "client")
    assert record["websocket"]["bytes_from_client"] > LARGE
    assert record["websocket"]["bytes_to_client"] > LARGE
    assert record["duration_ms"] > 0
    from_client = 'nhigate_proxy_websocket_bytes_total{direction="from_client"}'
    assert _metric(wsproxy, from_client) == record["websocket"]["bytes_from_client"]
    assert _metric(wsproxy, "nhigate_proxy_websocket_connections ") == 0


async def test_the_upgrade_request_carries_the_proxys_headers_not_the_callers(
    wsproxy: Any, ws_upstream: Any
) -> None:
    forged = {
        **wsproxy.auth(),
        "X-Nhigate-Subject": "admin",
        "X-Nhigate-Grant": "everything",
        "X-Request-Id": "forged",
        "X-Forwarded-For": "10.0.0.1",
    }
    ws = await _connect(wsproxy, "/rooms/42/ws", headers=forged)
    await ws.close()
    seen = ws_upstream.requests[-1]
    assert (seen.method, seen.raw_path) == ("GET", "/rooms/42/ws")
    assert ws_upstream.last_header("Authorization") == []
    assert ws_upstream.last_header("X-Nhigate-Subject") == ["ci-deployer"]
    assert ws_upstream.last_header("X-Nhigate-Grant") == ["payments/ws"]
    assert ws_upstream.last_header("X-Request-Id") != ["forged"]
    assert ws_upstream.last_header("X-Forwarded-For") == ["127.0.0.1"]
    assert ws_upstream.last_header("Upgrade") == ["websocket"]
    assert len(ws_upstream.last_header("Sec-WebSocket-Key")) == 1


async def test_what_the_backend_sends_right_after_its_101_reaches_the_caller(
    wsproxy: Any,
) -> None:
    ws = await _connect(wsproxy, "/rooms/greeting/ws")
    assert (await ws.receive(timeout=5)).data == "welcome"
    await ws.send_str("and back")
    assert (await ws.receive(timeout=5)).data == "and back"
    await ws.close()


async def test_a_caller_that_does_not_read_pauses_the_backend_not_the_proxys_memory(
    wsproxy: Any,
) -> None:
    ws = await _connect(wsproxy, "/rooms/flood/ws")
    await asyncio.sleep(1.0)  # the backend floods 25 MiB while the caller reads nothing
    (tunnel,) = wsproxy.app[STATE].tunnels.open
    queued = tunnel._client.get_write_buffer_size()
    assert queued < 1024 * 1024, queued
    assert tunnel.bytes_to_client < FLOOD_MESSAGES * FLOOD_SIZE // 2
    for i in range(FLOOD_MESSAGES):  # then everything arrives, in order and intact
        msg = await ws.receive(timeout=10)
        assert msg.data == i.to_bytes(4, "big") * (FLOOD_SIZE // 4)
    await ws.close()


async def test_a_backend_that_does_not_read_pauses_the_caller_not_the_proxys_memory(
    wsproxy: Any,
) -> None:
    ws = await _connect(wsproxy, "/rooms/deaf/ws")
    payload = b"\x01" * FLOOD_SIZE

    async def flood() -> None:
        for _ in range(FLOOD_MESSAGES):
            await ws.send_bytes(payload)

    sending = asyncio.create_task(flood())
    await asyncio.sleep(1.0)
    (tunnel,) = wsproxy.app[STATE].tunnels.open
    queued = tunnel._backend_transport.get_write_buffer_size()
    assert queued < 1024 * 1024, queued
    assert tunnel.bytes_from_client < FLOOD_MESSAGES * FLOOD_SIZE // 2
    await asyncio.wait_for(sending, 20)
    assert (await ws.receive(timeout=20)).data == f"got {FLOOD_MESSAGES * FLOOD_SIZE}"
    await ws.close()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_wss_through_the_proxys_tls_listener(
    kit: Any, ws_upstream: Any, signing_key: Any, tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path)
    proxy, runner = await kit.start_proxy(
        ws_upstream.url, key=signing_key, upstream=ws_upstream, tls_cert=cert, tls_key=key
    )
    try:
        proxy.set_policy(_grants(kit), service=WS_SERVICE)
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ssl.load_cert_chain(str(cert), str(key))
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl)
        await site.start()
        port = bound_port(site)
        client_ssl = ssl.create_default_context(cafile=str(cert))
        ws = await proxy.session.ws_connect(
            f"wss://127.0.0.1:{port}/ws", headers=proxy.auth(), ssl=client_ssl, max_msg_size=0
        )
        big = os.urandom(LARGE)
        await ws.send_bytes(big)
        assert (await ws.receive(timeout=20)).data == big
        await ws.send_str("over TLS")
        assert (await ws.receive()).data == "over TLS"
        assert ws_upstream.last_header("X-Forwarded-Proto") == ["https"]
        started = time.monotonic()
        proxy.set_policy(kit.default_grants, service=WS_SERVICE)
        await _assert_closed_by_policy(proxy, ws, started, "no_matching_grant")
    finally:
        await proxy.session.close()
        await runner.cleanup()


# -- policy changes close open connections -----------------------------------------------------


def _metric(proxy: Any, line_start: str) -> float:
    text = generate_latest(proxy.metrics.registry).decode()
    values = [
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)
    ]
    assert len(values) == 1, (line_start, text)
    return values[0]


async def _assert_closed_by_policy(wsproxy: Any, ws: Any, started: float, reason: str) -> None:
    msg = await _closed_within(ws, 1.5)
    elapsed = time.monotonic() - started
    assert msg.type is WSMsgType.CLOSE
    assert (msg.data, msg.extra) == (1008, reason)
    assert elapsed < 1.2
    closed = await _wait_records(wsproxy, "close")
    assert [(r["reason"], r["websocket"]["closed_by"]) for r in closed] == [(reason, "proxy")]
    assert closed[0]["identity"]["subject"] == "ci-deployer"
    assert (
        _metric(
            wsproxy, f'nhigate_proxy_websocket_closed_total{{closed_by="proxy",reason="{reason}"}}'
        )
        == 1
    )
    assert _metric(wsproxy, "nhigate_proxy_websocket_connections ") == 0


async def test_a_revocation_closes_an_open_stream_at_once(wsproxy: Any, kit: Any) -> None:
    ws = await _connect(wsproxy)
    await ws.send_str("before")
    assert (await ws.receive()).data == "before"
    started = time.monotonic()
    revocation = Revocation(name="stolen", issuer=kit.issuer_name, subject="ci-deployer")
    wsproxy.set_policy(_grants(kit), service=WS_SERVICE, revocations=(revocation,))
    await _assert_closed_by_policy(wsproxy, ws, started, "revoked")


async def test_deleting_the_grant_closes_an_open_stream(wsproxy: Any, kit: Any) -> None:
    ws = await _connect(wsproxy)
    started = time.monotonic()
    wsproxy.set_policy(kit.default_grants, service=WS_SERVICE)
    await _assert_closed_by_policy(wsproxy, ws, started, "no_matching_grant")


async def test_grant_expiry_closes_an_open_stream_within_a_second(wsproxy: Any, kit: Any) -> None:
    expires = wsproxy.clock() + 1.0
    wsproxy.set_policy(_grants(kit, expires_at=expires), service=WS_SERVICE)
    ws = await _connect(wsproxy)
    await ws.send_str("still here")
    assert (await ws.receive()).data == "still here"
    wait = expires - wsproxy.clock()
    msg = await _closed_within(ws, wait + 1.5)
    late = wsproxy.clock() - expires
    assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1008, "grant_expired")
    assert late < 1.0
    closed = await _wait_records(wsproxy, "close")
    assert [r["reason"] for r in closed] == ["grant_expired"]


async def test_a_stream_outlives_its_grants_expiry_when_another_grant_still_allows_it(
    wsproxy: Any, kit: Any
) -> None:
    expiring = kit.grant("payments/a-ws", "ci-deployer", ("/ws",), expires_at=wsproxy.clock() + 0.5)
    lasting = kit.grant("payments/b-ws", "ci-deployer", ("/ws",))
    wsproxy.set_policy((expiring, lasting), service=WS_SERVICE)
    ws = await _connect(wsproxy)
    await asyncio.sleep(1.5)  # past the first grant's expiry and two timer ticks
    await ws.send_str("still allowed")
    assert (await ws.receive(timeout=2)).data == "still allowed"
    await ws.close()
    closed = await _wait_records(wsproxy, "close")
    assert [r["reason"] for r in closed] == ["allowed"]
    assert closed[0]["websocket"]["closed_by"] != "proxy"


async def test_token_expiry_closes_an_open_stream(wsproxy: Any) -> None:
    now = int(wsproxy.clock())
    ws = await _connect(wsproxy, headers=wsproxy.auth(exp=now + 2))
    msg = await _closed_within(ws, 3.5)
    assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1008, "token_expired")
    assert wsproxy.clock() - (now + 2) < 1.0


async def test_undeclaring_the_path_closes_an_open_stream(wsproxy: Any, kit: Any) -> None:
    ws = await _connect(wsproxy, "/rooms/7/ws")
    started = time.monotonic()
    service = ServiceConfig(
        namespace="payments",
        name="payments-api",
        backend_service="api",
        backend_port=8080,
        websocket_paths=("/ws",),
    )
    wsproxy.set_policy(_grants(kit), service=service)
    await _assert_closed_by_policy(wsproxy, ws, started, "upgrade_rejected")


# -- refused upgrades (attacks) ------------------------------------------------------------------


def _handshake(path: str = "/ws", *, method: str = "GET", extra: str = "", token: str = "") -> str:
    key = base64.b64encode(os.urandom(16)).decode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: Upgrade\r\n"
        f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
        f"{extra}\r\n"
    )


async def _raw(url: str, data: bytes, *, read_for: float = 1.0) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    received = b""
    deadline = time.monotonic() + read_for
    while (left := deadline - time.monotonic()) > 0:
        try:
            piece = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            break
        if not piece:
            break
        received += piece
    writer.close()
    return received


def _statuses(raw: bytes) -> list[int]:
    """The status of every response in `raw` (bodies here never hold a status line)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", raw)]


REFUSED_UPGRADES = {
    "h2c": "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n{auth}\r\n",
    "tcp": "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n{auth}\r\n",
    "tls": "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: TLS/1.2\r\n{auth}\r\n",
    "token list": "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
    "Upgrade: websocket, h2c\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{auth}\r\n",
    "no connection token": "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{auth}\r\n",
    "version 8": "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    "Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{auth}\r\n",
    "short key": "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n{auth}\r\n",
    "two keys": "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZR==\r\n{auth}\r\n",
    "http/1.0": "GET /ws HTTP/1.0\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{auth}\r\n",
    "post": _handshake(method="POST", extra="Content-Length: 0\r\n{auth}"),
    "undeclared path": _handshake("/v1/items/1", extra="{auth}"),
    "body smuggled behind the handshake": _handshake(
        extra="Content-Length: 42\r\n{auth}"
    ).removesuffix("\r\n")
    + "\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(REFUSED_UPGRADES))
async def test_every_other_upgrade_is_refused_and_audited(
    wsproxy: Any, ws_upstream: Any, kit: Any, name: str
) -> None:
    # /v1/items/** is granted for GET too, so "undeclared path" is refused for the path alone.
    wsproxy.set_policy((*_grants(kit), *kit.default_grants), service=WS_SERVICE)
    auth = f"Authorization: Bearer {wsproxy.token()}\r\n"
    request = REFUSED_UPGRADES[name].replace("{auth}", auth)
    raw = await _raw(wsproxy.url, request.encode(), read_for=0.5)
    assert _statuses(raw)[:1] == [400], raw[:300]
    assert b"upgrade_rejected" in raw
    assert b"101" not in raw.split(b"\r\n")[0]
    assert ws_upstream.requests == []
    records = wsproxy.audit_records()
    assert [(r["decision"], r["reason"]) for r in records][:1] == [("deny", "upgrade_rejected")]
    assert records[0]["identity"]["subject"] == "ci-deployer"


async def test_a_handshake_cannot_reach_an_mcp_endpoint_or_carry_an_override(
    wsproxy: Any, ws_upstream: Any, kit: Any
) -> None:
    # Even a service that declares every path for WebSocket and honours overrides.
    service = ServiceConfig(
        namespace="payments",
        name="payments-api",
        backend_service="api",
        backend_port=8080,
        websocket_paths=("/**",),
        mcp_endpoints=("/mcp",),
        authorise_method_overrides=True,
        authorise_path_overrides=True,
    )
    everything = kit.grant("payments/all", "ci-deployer", ("/**",), frozenset({"*"}))
    wsproxy.set_policy((everything,), service=service)
    token = wsproxy.token()
    for request in (
        _handshake("/mcp", token=token),
        _handshake("/MCP/x", token=token),
        _handshake(token=token, extra="X-HTTP-Method-Override: DELETE\r\n"),
        _handshake(token=token, extra="X-Original-URL: /admin\r\n"),
    ):
        raw = await _raw(wsproxy.url, request.encode(), read_for=0.3)
        assert _statuses(raw)[:1] == [400], raw[:200]
    records = wsproxy.audit_records()
    assert [(r["reason"], r["detail"]) for r in records] == [
        ("upgrade_rejected", "WebSocket on an MCP endpoint"),
        ("upgrade_rejected", "WebSocket on an MCP endpoint"),
        ("upgrade_rejected", "override on a WebSocket handshake"),
        ("upgrade_rejected", "override on a WebSocket handshake"),
    ]
    assert ws_upstream.requests == []


async def test_an_unauthenticated_handshake_is_401_and_never_reaches_the_backend(
    wsproxy: Any, ws_upstream: Any
) -> None:
    raw = await _raw(wsproxy.url, _handshake().encode(), read_for=0.5)
    assert _statuses(raw)[:1] == [401]
    assert ws_upstream.requests == []


async def test_a_handshake_needs_a_grant_for_get_on_its_path(
    wsproxy: Any, ws_upstream: Any, kit: Any
) -> None:
    post_only = (kit.grant("payments/ws", "ci-deployer", ("/ws",), frozenset({"POST"})),)
    wsproxy.set_policy(post_only, service=WS_SERVICE)
    raw = await _raw(wsproxy.url, _handshake(token=wsproxy.token()).encode(), read_for=0.5)
    assert _statuses(raw)[:1] == [403]
    assert ws_upstream.requests == []


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/rooms/1/ws/../../../admin/ws", 400),  # normalised to /admin/ws: not declared
        ("/rooms/1/../../ws", 101),  # normalised to /ws: declared and granted
        ("/rooms/%2e%2e/ws", 101),  # /ws as well
        ("/rooms/a%2fb/ws", 400),  # an encoded slash is refused like on any request
        ("/WS", 400),  # paths are case-sensitive: /WS is not declared
    ],
)
async def test_handshake_paths_are_normalised_like_any_request(
    wsproxy: Any, ws_upstream: Any, path: str, status: int
) -> None:
    raw = await _raw(wsproxy.url, _handshake(path, token=wsproxy.token()).encode(), read_for=0.5)
    assert _statuses(raw)[:1] == [status], raw[:200]
    if status == 101:
        assert [r.raw_path for r in ws_upstream.requests] == ["/ws"]
    else:
        assert ws_upstream.requests == []


# -- a backend that does not switch cannot open a tunnel -----------------------------------------

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _raw_backend(behaviour: Behaviour) -> tuple[asyncio.Server, int, list[bytes]]:
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        received.append(head)
        await behaviour(reader, writer)
        try:
            while piece := await asyncio.wait_for(reader.read(65536), 2.0):
                received.append(piece)
        except (TimeoutError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], received


SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"


def _declines(status: bytes) -> Behaviour:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(status + b"\r\nContent-Length: 2\r\nUpgrade: websocket\r\n\r\nno" + SMUGGLED)
        await writer.drain()

    return behaviour


async def _bad_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n" + SMUGGLED
    )
    await writer.drain()


async def _switches_to_h2c(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
        + SMUGGLED
    )
    await writer.drain()


@pytest.mark.parametrize(
    ("behaviour", "status"),
    [
        (_declines(b"HTTP/1.1 200 OK"), 200),
        (_declines(b"HTTP/1.1 426 Upgrade Required"), 426),
        (_declines(b"HTTP/1.1 403 Forbidden"), 403),
        (_bad_accept, 502),
        (_switches_to_h2c, 502),
    ],
    ids=["200", "426", "403", "101-wrong-accept", "101-h2c"],
)
async def test_a_backend_that_does_not_switch_cannot_open_a_tunnel(
    kit: Any, signing_key: Any, behaviour: Behaviour, status: int
) -> None:
    server, port, received = await _raw_backend(behaviour)
    proxy, runner = await kit.start_proxy(f"http://127.0.0.1:{port}", key=signing_key)
    try:
        proxy.set_policy((*_grants(kit), *kit.default_grants), service=WS_SERVICE)
        # The caller pipelines an ungranted, unauthenticated request behind the handshake,
        # hoping the proxy relays it as tunnel bytes.
        smuggle = b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"
        raw = await _raw(proxy.url, _handshake(token=proxy.token()).encode() + smuggle)
        statuses = _statuses(raw)
        assert statuses[0] == status
        assert b"SMUGGLED" not in raw
        if status != 502:
            # The connection stayed HTTP: the pipelined bytes were a request of their own.
            assert statuses[1:] == [401], raw
        backend_saw = b"".join(received)
        assert b"/admin" not in backend_saw
        assert backend_saw.count(b"GET /ws HTTP/1.1") == 1
        records = proxy.audit_records()
        assert records[0]["status"] == status
        assert not any(r.get("websocket") for r in records)
    finally:
        await proxy.session.close()
        await runner.cleanup()
        server.close()
        await server.wait_closed()


async def test_callers_that_vanish_leave_no_open_tunnel_behind(wsproxy: Any) -> None:
    count = 30

    async def vanish() -> None:
        host, port = wsproxy.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(_handshake(token=wsproxy.token()).encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        writer.transport.abort()  # no close frame, no FIN: a reset

    await asyncio.gather(*(vanish() for _ in range(count)))
    closed = await _wait_records(wsproxy, "close", count)
    assert len(closed) == count
    assert {r["websocket"]["closed_by"] for r in closed} <= {"client", "backend"}
    assert wsproxy.app[STATE].tunnels.open == set()
    assert _metric(wsproxy, "nhigate_proxy_websocket_connections ") == 0


async def test_a_handshake_to_a_backend_that_is_down_is_502(kit: Any, signing_key: Any) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    proxy, runner = await kit.start_proxy(f"http://127.0.0.1:{dead}", key=signing_key)
    try:
        proxy.set_policy(_grants(kit), service=WS_SERVICE)
        raw = await _raw(proxy.url, _handshake(token=proxy.token()).encode(), read_for=0.5)
        assert _statuses(raw) == [502]
        (record,) = proxy.audit_records()
        assert (record["decision"], record["reason"]) == ("deny", "upstream_unavailable")
    finally:
        await proxy.session.close()
        await runner.cleanup()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer nothing (`_raw_backend` then reads until the proxy hangs up)."""


async def test_a_handshake_the_backend_never_answers_is_504(kit: Any, signing_key: Any) -> None:
    server, port, _ = await _raw_backend(_silent)
    proxy, runner = await kit.start_proxy(
        f"http://127.0.0.1:{port}", key=signing_key, upstream_timeout=0.5
    )
    try:
        proxy.set_policy(_grants(kit), service=WS_SERVICE)
        # The answer comes within the read window: the 0.5 s upstream timeout, not the 30 s one.
        raw = await _raw(proxy.url, _handshake(token=proxy.token()).encode(), read_for=1.5)
        assert _statuses(raw) == [504]
        assert proxy.audit_records()[0]["reason"] == "upstream_timeout"
    finally:
        await proxy.session.close()
        await runner.cleanup()
        server.close()
        await server.wait_closed()


async def test_shutdown_closes_open_streams_with_going_away(
    kit: Any, ws_upstream: Any, signing_key: Any
) -> None:
    proxy, runner = await kit.start_proxy(ws_upstream.url, key=signing_key)
    proxy.set_policy(_grants(kit), service=WS_SERVICE)
    ws = await _connect(proxy)
    started = time.monotonic()
    cleanup = asyncio.create_task(runner.cleanup())
    msg = await _closed_within(ws, 2.0)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
    await cleanup
    assert time.monotonic() - started < 1.5
    await proxy.session.close()
