"""The upstream never receives a request twice unless its method is idempotent (issue 12,
item 2; docs/security.md#7-what-is-authorised-is-all-a-backend-can-act-on).

The upstream here is a real TCP server on 127.0.0.1 that reads each request in full and
then, for the paths that ask for it, closes the connection without answering: exactly what
a backend does when it crashes or hits its idle timeout after acting on a request. A POST
that was read must not be sent again on a new connection (a refund executed twice); a GET
or PUT may be (RFC 9110 section 9.2.2).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from nhigate.proxy.forward import NotRetriedError, UpstreamPool, serialise_head

pytestmark = pytest.mark.usefixtures("http1_server")


@dataclass
class VanishingUpstream:
    """Reads every request; answers `/ok`, closes without an answer on `/vanish` (always)
    and on `/vanish-once` (the first time only)."""

    port: int = 0
    seen: Counter[tuple[str, str]] = field(default_factory=Counter)
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.seen[(method, target)] += 1
                if target.endswith("/vanish") or (
                    target.endswith("/vanish-once") and self.seen[(method, target)] == 1
                ):
                    writer.close()  # read it, acted on it (say), never answered
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def close_idle(self) -> None:
        for writer in self.writers:
            writer.close()


@pytest.fixture
async def vanishing() -> AsyncIterator[VanishingUpstream]:
    upstream = VanishingUpstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    yield upstream
    server.close()
    upstream.close_idle()
    await server.wait_closed()


@pytest.fixture
async def harness(kit: Any, signing_key: Any, vanishing: VanishingUpstream) -> AsyncIterator[Any]:
    grants = (
        kit.grant(
            "payments/all",
            "ci-deployer",
            ("/v1/items/**",),
            frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}),
        ),
    )
    proxy, runner = await kit.start_proxy(
        f"http://127.0.0.1:{vanishing.port}", key=signing_key, policy_grants=grants
    )
    yield proxy
    await proxy.session.close()
    await runner.cleanup()


async def _warm(harness: Any, vanishing: VanishingUpstream) -> None:
    """One answered request, so the next one goes out on a pooled keep-alive connection."""
    async with harness.session.get(f"{harness.url}/v1/items/ok", headers=harness.auth()) as resp:
        assert resp.status == 200
    assert vanishing.connections == 1


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_a_non_idempotent_request_the_upstream_read_reaches_it_exactly_once(
    harness: Any, vanishing: VanishingUpstream, method: str
) -> None:
    await _warm(harness, vanishing)
    async with harness.session.request(
        method, f"{harness.url}/v1/items/vanish", data=b'{"refund": 100}', headers=harness.auth()
    ) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"] == "upstream_unavailable"
    await asyncio.sleep(0.2)  # a retry, if any, would have arrived by now
    assert vanishing.seen[(method, "/v1/items/vanish")] == 1
    assert vanishing.connections == 1  # no second connection was opened to send it again
    record = (await harness.wait_audit(2))[-1]
    assert record["decision"] == "deny"
    assert record["reason"] == "upstream_unavailable"
    assert record["method"] == method
    assert "not retried" in record["detail"]


async def test_a_non_idempotent_request_the_upstream_read_on_a_new_connection_is_not_retried(
    harness: Any, vanishing: VanishingUpstream
) -> None:
    async with harness.session.post(
        f"{harness.url}/v1/items/vanish", data=b"x", headers=harness.auth()
    ) as resp:
        assert resp.status == 502
    await asyncio.sleep(0.2)
    assert vanishing.seen[("POST", "/v1/items/vanish")] == 1


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS"])
async def test_an_idempotent_request_is_retried_once_on_a_new_connection(
    harness: Any, vanishing: VanishingUpstream, method: str
) -> None:
    await _warm(harness, vanishing)
    async with harness.session.request(
        method, f"{harness.url}/v1/items/vanish-once", headers=harness.auth()
    ) as resp:
        assert resp.status == 200
    assert vanishing.seen[(method, "/v1/items/vanish-once")] == 2  # RFC 9110 9.2.2 allows it
    assert vanishing.connections == 2
    # Retried once, not forever: an upstream that always vanishes is a 502 after two tries.
    async with harness.session.request(
        method, f"{harness.url}/v1/items/vanish", headers=harness.auth()
    ) as resp:
        assert resp.status == 502
    await asyncio.sleep(0.1)
    assert vanishing.seen[(method, "/v1/items/vanish")] == 2


async def test_a_post_after_the_upstream_closed_the_idle_connection_goes_on_a_new_one(
    harness: Any, vanishing: VanishingUpstream
) -> None:
    # The common stale case: the upstream's idle timeout closed the pooled connection well
    # before the POST. Nothing was sent on it, so sending on a new one is not a retry.
    await _warm(harness, vanishing)
    vanishing.close_idle()
    await asyncio.sleep(0.1)
    async with harness.session.post(
        f"{harness.url}/v1/items/ok", data=b"x", headers=harness.auth()
    ) as resp:
        assert resp.status == 200
    assert vanishing.seen[("POST", "/v1/items/ok")] == 1
    assert vanishing.connections == 2


async def test_a_pooled_connection_closed_under_the_event_loop_is_not_used_for_a_post(
    vanishing: VanishingUpstream,
) -> None:
    # The upstream's FIN is in the kernel but the event loop has not dispatched it yet (the
    # loop is blocked), so the pool still lists the connection: the socket check finds the
    # end-of-file before a POST is written to it, and the POST goes on a new connection.
    pool = UpstreamPool("127.0.0.1", vanishing.port, read_timeout=5.0)
    try:
        head = serialise_head("GET", "/ok", [("Host", "up"), ("Content-Length", "0")])
        first = await pool.request(head, None, is_head=False, idempotent=True)
        assert first.status == 200
        await asyncio.sleep(0.05)  # the upstream is back to waiting for the next request
        _shut_down(vanishing)  # no await from here to the POST: the loop dispatches nothing
        time.sleep(0.1)  # noqa: ASYNC251 (blocks the loop on purpose: the FIN arrives unseen)
        assert not pool._idle[-1].closed  # the pool has not been told
        post = serialise_head("POST", "/ok", [("Host", "up"), ("Content-Length", "1")])
        second = await pool.request(post, b"x", is_head=False, idempotent=False)
        assert second.status == 200
        assert vanishing.seen[("POST", "/ok")] == 1
        assert vanishing.connections == 2
        # And with no live connection left to find, a POST that vanishes is never repeated.
        vanish = serialise_head("POST", "/vanish", [("Host", "up"), ("Content-Length", "1")])
        with pytest.raises(NotRetriedError):
            await pool.request(vanish, b"x", is_head=False, idempotent=False)
        await asyncio.sleep(0.1)
        assert vanishing.seen[("POST", "/vanish")] == 1
    finally:
        await pool.close()


def _shut_down(upstream: VanishingUpstream) -> None:
    for writer in upstream.writers:
        writer.transport.get_extra_info("socket").shutdown(2)
