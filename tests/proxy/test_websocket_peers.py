"""The `websockets` library's server and client through the real proxy (a second, independent
RFC 6455 implementation next to aiohttp's in test_websocket.py).

`websockets` negotiates permessage-deflate (RFC 7692) by default, so this also shows that
extensions and subprotocols are negotiated end to end through the proxy.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from nhigate.policy import ServiceConfig

CHAT = Subprotocol("chat.v1")

SERVICE = ServiceConfig(
    namespace="payments",
    name="payments-api",
    backend_service="api",
    backend_port=8080,
    websocket_paths=("/ws",),
)


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        if message == "bye":
            await ws.close(code=4002, reason="done")
            return
        await ws.send(message)


@pytest.fixture
async def proxied(kit: Any, signing_key: Any) -> AsyncIterator[Any]:
    async with serve(echo, "127.0.0.1", 0, subprotocols=[CHAT], max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        proxy, runner = await kit.start_proxy(f"http://127.0.0.1:{port}", key=signing_key)
        grant = kit.grant("payments/ws", "ci-deployer", ("/ws",))
        proxy.set_policy((grant,), service=SERVICE)
        yield proxy
        await proxy.session.close()
        await runner.cleanup()


async def test_websockets_client_and_server_through_the_proxy(proxied: Any) -> None:
    url = proxied.url.replace("http://", "ws://") + "/ws"
    async with connect(
        url,
        additional_headers=proxied.auth(),
        subprotocols=[CHAT],
        max_size=None,
    ) as ws:
        assert ws.subprotocol == "chat.v1"
        assert [e.name for e in ws.protocol.extensions] == ["permessage-deflate"]
        await ws.send("text frame")
        assert await ws.recv() == "text frame"
        big = os.urandom(3 * 1024 * 1024)
        await ws.send(big)
        assert await ws.recv() == big
        pong = await ws.ping(b"ping data")
        latency = await pong
        assert latency >= 0.0
        await ws.send("bye")
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert (ws.close_code, ws.close_reason) == (4002, "done")
    closed = [r for r in proxied.audit_records() if (r.get("websocket") or {}).get("event")]
    assert [r["websocket"]["event"] for r in closed] == ["open", "close"]
