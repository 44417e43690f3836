"""The native front end's callback path (`Http1Front.serve_now`): a bodyless request with a
cached token on a pooled upstream connection is sent and answered without a coroutine.

Every request after the first here takes that path (the first one's token is then cached and
its upstream connection pooled), so each test pins what the coroutine path guaranteed on it:
upstream silence is a 504 within the read timeout, a stale pooled connection is retried only
for an idempotent method, a client that leaves mid-exchange costs an audit line and nothing
else, and pipelined requests are answered in order, one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from nhigate.proxy.state import STATE


@dataclass
class ScriptedUpstream:
    """Answers `/ok*` at once; `/slow` after 0.3 s; never answers `/stall`; on `/vanish`
    closes the connection without an answer. Records every request line it reads."""

    port: int = 0
    seen: list[str] = field(default_factory=list)
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0].decode()
                self.seen.append(line)
                target = line.split(" ")[1]
                if target == "/stall":
                    await asyncio.sleep(30)
                if target == "/vanish":
                    writer.close()
                    return
                if target == "/slow":
                    await asyncio.sleep(0.3)
                body = target.encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedUpstream]:
    upstream = ScriptedUpstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    yield upstream
    server.close()


@pytest.fixture
async def native(kit: Any, signing_key: Any, scripted: ScriptedUpstream) -> AsyncIterator[Any]:
    grants = (kit.grant("all", "ci-deployer", ("/**",), frozenset({"GET", "POST", "PUT"})),)
    harness, runner = await kit.start_proxy(
        f"http://127.0.0.1:{scripted.port}",
        key=signing_key,
        policy_grants=grants,
        http1_server="native",
        upstream_timeout=0.5,
    )
    yield harness
    await harness.session.close()
    await runner.cleanup()


class Client:
    """One raw keep-alive connection to the proxy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, within: float = 3.0) -> tuple[int, bytes]:
        """The next response's status and body (every answer here has a Content-Length)."""
        async with asyncio.timeout(within):
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            return int(head.split(b" ", 2)[1]), await self.reader.readexactly(length)


@pytest.fixture
async def connect(native: Any) -> AsyncIterator[Any]:
    """Opens raw client connections to the proxy; closes them after the test."""
    opened: list[Client] = []
    port = int(native.url.rsplit(":", 1)[1])

    async def open_one() -> Client:
        opened.append(Client(*await asyncio.open_connection("127.0.0.1", port)))
        return opened[-1]

    yield open_one
    for client in opened:
        client.writer.close()
        with contextlib.suppress(ConnectionError):
            await client.writer.wait_closed()


def _get(harness: Any, path: str, method: str = "GET", token: str | None = None) -> bytes:
    token = token or harness.token()
    return f"{method} {path} HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {token}\r\n\r\n".encode()


async def _warmed(harness: Any, connect: Any) -> tuple[Client, str]:
    """A connection whose first request (`/ok`) was answered: the token is now cached and the
    upstream connection pooled, so the next request takes the callback path."""
    client = await connect()
    token = harness.token()
    await client.send(_get(harness, "/ok", token=token))
    assert (await client.answer())[0] == 200
    return client, token


async def test_requests_on_a_kept_alive_connection_are_each_forwarded_answered_and_audited(
    native: Any, scripted: ScriptedUpstream, connect: Any
) -> None:
    client = await connect()
    token = native.token()
    for i in range(20):
        await client.send(_get(native, f"/ok{i}", token=token))
        assert await client.answer() == (200, f"/ok{i}".encode())
    assert scripted.seen == [f"GET /ok{i} HTTP/1.1" for i in range(20)]
    assert scripted.connections == 1  # one pooled upstream connection carried all of them
    records = await native.wait_audit(20)
    assert [r["path"] for r in records] == [f"/ok{i}" for i in range(20)]
    assert {r["decision"] for r in records} == {"allow"}
    assert native.app[STATE].inflight == 0


async def test_a_denial_on_the_callback_path_reaches_no_upstream(
    native: Any, scripted: ScriptedUpstream, connect: Any
) -> None:
    client, token = await _warmed(native, connect)
    await client.send(_get(native, "/ok", method="DELETE", token=token))  # not granted
    status, body = await client.answer()
    assert status == 403
    assert b"no_matching_grant" in body
    await client.send(_get(native, "/ok-after", token=token))  # the connection carries on
    assert await client.answer() == (200, b"/ok-after")
    assert scripted.seen == ["GET /ok HTTP/1.1", "GET /ok-after HTTP/1.1"]


async def test_upstream_silence_is_a_504_within_the_read_timeout_and_the_next_request_works(
    native: Any, scripted: ScriptedUpstream, connect: Any
) -> None:
    client, token = await _warmed(native, connect)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await client.send(_get(native, "/stall", token=token))
    status, body = await client.answer(within=5.0)
    assert status == 504
    assert b"upstream_timeout" in body
    assert loop.time() - started < 3.0  # the 0.5 s read timeout, not the upstream's 30 s
    await client.send(_get(native, "/ok-again", token=token))
    assert await client.answer() == (200, b"/ok-again")
    records = await native.wait_audit(3)
    assert records[1]["reason"] == "upstream_timeout"
    assert records[1]["status"] == 504


@pytest.mark.parametrize(("method", "tries"), [("GET", 2), ("PUT", 2), ("POST", 1)])
async def test_a_bodyless_request_on_a_stale_pooled_connection_is_retried_only_if_idempotent(
    native: Any, scripted: ScriptedUpstream, connect: Any, method: str, tries: int
) -> None:
    client, token = await _warmed(native, connect)
    await client.send(_get(native, "/vanish", method=method, token=token))
    status, _ = await client.answer()
    assert status == 502
    await asyncio.sleep(0.2)  # a retry, if any, would have arrived by now
    assert scripted.seen.count(f"{method} /vanish HTTP/1.1") == tries
    record = (await native.wait_audit(2))[-1]
    assert record["reason"] == "upstream_unavailable"
    if tries == 1:
        assert "not retried" in record["detail"]


async def test_a_client_that_leaves_mid_exchange_costs_an_audit_line_and_nothing_else(
    native: Any, scripted: ScriptedUpstream, connect: Any
) -> None:
    client, token = await _warmed(native, connect)
    await client.send(_get(native, "/slow", token=token))
    await asyncio.sleep(0.05)  # the request is upstream
    client.writer.close()
    records = await native.wait_audit(2, within=3.0)
    assert [r["path"] for r in records] == ["/ok", "/slow"]
    assert records[1]["decision"] == "allow"
    assert native.app[STATE].inflight == 0
    again = await connect()
    await again.send(_get(native, "/ok-later", token=token))
    assert await again.answer() == (200, b"/ok-later")


async def test_pipelined_requests_are_answered_in_order_one_at_a_time(
    native: Any, scripted: ScriptedUpstream, connect: Any
) -> None:
    client, token = await _warmed(native, connect)
    paths = ["/slow", "/ok1", "/ok2", "/slow", "/ok3"]
    await client.send(b"".join(_get(native, path, token=token) for path in paths))
    answers = [await client.answer() for _ in paths]
    assert answers == [(200, path.encode()) for path in paths]
    # One at a time: the upstream saw each request only after the one before was answered.
    assert scripted.seen[1:] == [f"GET {path} HTTP/1.1" for path in paths]
    assert scripted.connections == 1
