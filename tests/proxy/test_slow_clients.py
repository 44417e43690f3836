"""Slow and silent clients on the proxied port: real sockets on 127.0.0.1, short timeouts.

A connection that never sends a byte, one that trickles its request head, one left idle
after a response, and one over the connection bound must each end within a bounded time,
with an audit line (and a metric) saying why, while legitimate traffic, slow streaming
bodies included, is unaffected. Timeouts here are 1-2 s so every test is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

pytestmark = pytest.mark.usefixtures("http1_server")

HEAD = b"GET /v1/items/1 HTTP/1.1\r\nHost: proxy.test\r\n"


async def _connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = int(url.rsplit(":", 1)[1])
    return await asyncio.open_connection("127.0.0.1", port)


async def _read_until_closed(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the proxy sends until it closes the connection (fails after `within` s)."""
    chunks: list[bytes] = []
    async with asyncio.timeout(within):
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def _trickle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, every: float, within: float
) -> tuple[bytes, int]:
    """Send a never-ending header one byte every `every` s until the proxy answers or closes.

    Returns what the proxy sent and how many bytes were trickled. Between bytes the client
    waits for the proxy to speak, so it never writes into a connection already closed.
    """
    sent = 0
    async with asyncio.timeout(within):
        while True:
            try:
                first = await asyncio.wait_for(reader.read(65536), every)
            except TimeoutError:
                writer.write(b"X")
                await writer.drain()
                sent += 1
                continue
            return first + await _read_until_closed(reader, within), sent


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, auth: str) -> bytes:
    """One keep-alive GET on a raw connection; returns the response head."""
    writer.write(HEAD + f"Authorization: {auth}\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    return head


def _counter(harness: Any, name: str, **labels: str) -> float:
    value = harness.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


async def _wait_for(check: Any, within: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _proxy(kit: Any, signing_key: Any, upstream: Any, **settings: Any) -> AsyncIterator[Any]:
    harness, runner = await kit.start_proxy(
        upstream.url, key=signing_key, upstream=upstream, **settings
    )
    try:
        yield harness
    finally:
        await harness.session.close()
        await runner.cleanup()


async def test_a_silent_connection_is_closed_after_the_head_timeout(
    kit: Any, signing_key: Any, upstream: Any
) -> None:
    async with _proxy(kit, signing_key, upstream, request_head_timeout=1.0) as harness:
        loop = asyncio.get_running_loop()
        reader, writer = await _connect(harness.url)
        started = loop.time()
        answered = await _read_until_closed(reader, within=5.0)
        elapsed = loop.time() - started
        writer.close()
        assert answered == b"", "a connection that sent nothing gets no answer, only a close"
        assert 0.8 <= elapsed < 2.5, elapsed
        records = await harness.wait_audit(1)
        assert [(r["reason"], r["status"], r["peer"]) for r in records] == [
            ("request_timeout", 0, "127.0.0.1")
        ]
        assert "no request" in records[0]["detail"]
        assert _counter(harness, "nhigate_proxy_client_timeouts_total", kind="head") == 1
        assert upstream.requests == []


async def test_a_trickling_head_is_answered_408_after_the_head_timeout(
    kit: Any, signing_key: Any, upstream: Any
) -> None:
    async with _proxy(kit, signing_key, upstream, request_head_timeout=1.0) as harness:
        loop = asyncio.get_running_loop()
        reader, writer = await _connect(harness.url)
        started = loop.time()
        writer.write(HEAD)
        answered, trickled = await _trickle(reader, writer, every=0.1, within=5.0)
        elapsed = loop.time() - started
        writer.close()
        assert trickled >= 5, "bytes kept arriving, yet the head timeout still applied"
        assert answered.startswith(b"HTTP/1.1 408 "), answered[:60]
        assert b"Connection: close" in answered
        assert 0.8 <= elapsed < 2.5, elapsed
        records = await harness.wait_audit(1)
        assert [(r["reason"], r["status"], r["peer"]) for r in records] == [
            ("request_timeout", 408, "127.0.0.1")
        ]
        assert upstream.requests == []


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    kit: Any, signing_key: Any, upstream: Any
) -> None:
    async with _proxy(
        kit, signing_key, upstream, request_head_timeout=1.0, idle_timeout=2.0
    ) as harness:
        loop = asyncio.get_running_loop()
        reader, writer = await _connect(harness.url)
        auth = harness.auth()["Authorization"]
        assert (await _get(reader, writer, auth)).startswith(b"HTTP/1.1 200 ")
        await asyncio.sleep(0.5)  # idle, but within the idle timeout: the connection is reused
        assert (await _get(reader, writer, auth)).startswith(b"HTTP/1.1 200 ")
        idle_from = loop.time()
        answered = await _read_until_closed(reader, within=5.0)
        idle = loop.time() - idle_from
        writer.close()
        assert answered == b""
        # The idle timeout (2 s), not the head timeout (1 s), applies between requests.
        assert 1.8 <= idle < 3.5, idle
        assert _counter(harness, "nhigate_proxy_client_timeouts_total", kind="idle") == 1
        records = await harness.wait_audit(2)
        assert [r["reason"] for r in records] == ["allowed", "allowed"]


async def test_the_next_head_on_a_kept_alive_connection_has_the_head_timeout(
    kit: Any, signing_key: Any, upstream: Any
) -> None:
    async with _proxy(
        kit, signing_key, upstream, request_head_timeout=1.0, idle_timeout=30.0
    ) as harness:
        loop = asyncio.get_running_loop()
        reader, writer = await _connect(harness.url)
        assert (await _get(reader, writer, harness.auth()["Authorization"])).startswith(
            b"HTTP/1.1 200 "
        )
        started = loop.time()
        writer.write(HEAD)
        answered, _ = await _trickle(reader, writer, every=0.1, within=5.0)
        elapsed = loop.time() - started
        writer.close()
        assert answered.startswith(b"HTTP/1.1 408 "), answered[:60]
        assert 0.8 <= elapsed < 2.5, elapsed


async def test_legitimate_requests_are_unaffected_by_slow_clients_in_parallel(
    kit: Any, signing_key: Any, upstream: Any
) -> None:
    async with _proxy(kit, signing_key, upstream, request_head_timeout=1.0) as harness:
        silent = [await _connect(harness.url) for _ in range(5)]
        tricklers = [await _connect(harness.url) for _ in range(5)]
        for _, writer in tricklers:
            writer.write(HEAD)
        trickling = [
            asyncio.create_task(_trickle(r, w, every=0.1, within=5.0)) for r, w in tricklers
        ]
        closing = [asyncio.create_task(_read_until_closed(r, within=5.0)) for r, _ in silent]
        statuses: list[int] = []
        loop = asyncio.get_running_loop()
        until = loop.time() + 2.0  # across the moment the slow clients are cut
        while loop.time() < until:
            async with harness.session.get(
                f"{harness.url}/v1/items/1", headers=harness.auth()
            ) as resp:
                statuses.append(resp.status)
                await resp.read()
            await asyncio.sleep(0.05)
        answers = [answer for answer, _ in await asyncio.gather(*trickling)]
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers)
        assert await asyncio.gather(*closing) == [b""] * 5
        for _, writer in silent + tricklers:
            writer.close()
        assert len(statuses) >= 10
        assert set(statuses) == {200}


async def test_a_slow_streaming_body_is_not_cut_by_the_head_timeout(
    kit: Any, signing_key: Any, upstream: Any
) -> None:
    write = kit.grant("w", "ci-deployer", ("/upload",), frozenset({"POST"}))
    async with _proxy(
        kit,
        signing_key,
        upstream,
        policy_grants=(write,),
        request_head_timeout=1.0,
        idle_timeout=1.0,
    ) as harness:

        async def slowly() -> AsyncIterator[bytes]:
            for _ in range(6):
                yield b"z" * 100
                await asyncio.sleep(0.5)  # 3 s in all: three times the head timeout

        async with harness.session.post(
            f"{harness.url}/upload", data=slowly(), headers=harness.auth()
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["len"] == 600
        assert upstream.requests[-1].body == b"z" * 600


async def test_a_slow_streaming_response_is_not_cut_by_the_head_timeout(
    kit: Any, signing_key: Any
) -> None:
    async def dripping(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(6):
            await response.write(f"part {i}\n".encode())
            await asyncio.sleep(0.5)
        await response.write_eof()
        return response

    upstream, up_runner = await kit.start_upstream(dripping)
    try:
        async with _proxy(
            kit, signing_key, upstream, request_head_timeout=1.0, idle_timeout=1.0
        ) as harness:
            async with harness.session.get(
                f"{harness.url}/v1/items/1", headers=harness.auth()
            ) as resp:
                assert resp.status == 200
                body = await resp.read()
            assert body == b"".join(f"part {i}\n".encode() for i in range(6))
    finally:
        await up_runner.cleanup()


async def test_the_connection_bound_refuses_the_next_connection_and_counts_it(
    kit: Any, signing_key: Any, upstream: Any
) -> None:
    async with _proxy(
        kit, signing_key, upstream, request_head_timeout=10.0, max_connections=3
    ) as harness:
        held = [await _connect(harness.url) for _ in range(3)]
        await asyncio.sleep(0.2)  # the proxy has accepted all three
        reader, writer = await _connect(harness.url)
        answered = await _read_until_closed(reader, within=2.0)
        writer.close()
        assert answered.startswith(b"HTTP/1.1 503 "), answered[:60]
        assert b"Connection: close" in answered
        assert b'"error":"connection_limit"' in answered
        assert _counter(harness, "nhigate_proxy_connections_refused_total") == 1
        records = await harness.wait_audit(1)
        assert [(r["reason"], r["status"], r["peer"]) for r in records] == [
            ("connection_limit", 503, "127.0.0.1")
        ]
        # Held connections still work, and a freed slot is available again.
        auth = harness.auth()["Authorization"]
        assert (await _get(*held[0], auth)).startswith(b"HTTP/1.1 200 ")
        held[1][1].close()
        await _wait_for(lambda: _counter(harness, "nhigate_proxy_connections_open") <= 2)
        reader, writer = await _connect(harness.url)
        assert (await _get(reader, writer, auth)).startswith(b"HTTP/1.1 200 ")
        writer.close()
        for _, w in held:
            w.close()


def test_the_limits_hold_under_uvloop_as_the_proxy_runs(
    signing_key: Any, kit: Any, http1_server: str
) -> None:
    """`nhigate proxy` runs on uvloop, whose transports are not asyncio's classes."""
    import uvloop

    from nhigate.proxy.server import serve
    from nhigate.proxy.settings import ProxySettings, Upstream

    async def scenario() -> tuple[bytes, bytes, bytes]:
        stop = asyncio.Event()
        ports: dict[str, int] = {}
        settings = ProxySettings(
            upstream=Upstream("http", "127.0.0.1", 9),
            listen_port=0,
            admin_port=0,
            request_head_timeout=1.0,
            max_connections=2,
            audit_log=os.devnull,
            http1_server=http1_server,  # type: ignore[arg-type]
        )
        task = asyncio.create_task(
            serve(settings, stop, on_started=lambda port, _: ports.update(port=port))
        )
        await _wait_for(lambda: "port" in ports)
        url = f"http://127.0.0.1:{ports['port']}"
        try:
            silent = await _connect(url)
            trickler = await _connect(url)
            await asyncio.sleep(0.2)
            over = await _connect(url)
            refused = await _read_until_closed(over[0], within=2.0)
            trickler[1].write(HEAD)
            answered, _ = await _trickle(*trickler, every=0.1, within=5.0)
            closed = await _read_until_closed(silent[0], within=5.0)
            for _, writer in (silent, trickler, over):
                writer.close()
            return refused, answered, closed
        finally:
            stop.set()
            await task

    async def bounded() -> tuple[bytes, bytes, bytes]:
        async with asyncio.timeout(20):
            return await scenario()

    refused, answered, closed = uvloop.run(bounded())
    assert refused.startswith(b"HTTP/1.1 503 "), refused[:60]
    assert answered.startswith(b"HTTP/1.1 408 "), answered[:60]
    assert closed == b""


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("request_head_timeout", 0.0, "--request-head-timeout and --idle-timeout must be > 0"),
        ("idle_timeout", -1.0, "--request-head-timeout and --idle-timeout must be > 0"),
        ("max_connections", 0, "--max-connections must be >= 1"),
    ],
)
def test_limits_that_would_disable_the_guard_are_refused(
    field: str, value: float, message: str
) -> None:
    from nhigate.proxy.settings import ProxySettings, Upstream

    with pytest.raises(ValueError, match=message):
        ProxySettings(upstream=Upstream("http", "127.0.0.1", 80), **{field: value})


async def test_the_admin_port_closes_silent_and_trickling_connections_too(
    http1_server: str,
) -> None:
    """A flood of silent connections to the admin port would exhaust the same process's fds."""
    from nhigate.proxy.server import serve
    from nhigate.proxy.settings import ProxySettings, Upstream

    stop = asyncio.Event()
    ports: dict[str, int] = {}
    settings = ProxySettings(
        upstream=Upstream("http", "127.0.0.1", 9),
        listen_port=0,
        admin_port=0,
        request_head_timeout=1.0,
        audit_log=os.devnull,
        http1_server=http1_server,  # type: ignore[arg-type]
    )
    task = asyncio.create_task(
        serve(settings, stop, on_started=lambda _, admin: ports.update(admin=admin))
    )
    try:
        await _wait_for(lambda: "admin" in ports)
        url = f"http://127.0.0.1:{ports['admin']}"
        loop = asyncio.get_running_loop()
        silent = await _connect(url)
        trickler = await _connect(url)
        started = loop.time()
        trickler[1].write(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n")
        trickled = asyncio.create_task(_trickle(*trickler, every=0.1, within=5.0))
        assert await _read_until_closed(silent[0], within=5.0) == b""
        await trickled
        assert loop.time() - started < 2.5
        for _, writer in (silent, trickler):
            writer.close()
    finally:
        stop.set()
        await task
