"""Path tricks never reach an ungranted route: the upstream records exactly what it received."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nhigate.policy import normalise_path

pytestmark = pytest.mark.usefixtures("http1_server")

# The grant allows GET /v1/items/** only; /admin and /v1/admin are not granted.
TRICKS = [
    "/v1/items/../../admin",
    "/v1/items/%2e%2e/%2e%2e/admin",
    "/v1/items/%2E%2E/%2E%2E/admin",
    "/v1/items/..%2f..%2fadmin",
    "/v1/items%2f..%2f..%2fadmin",
    "//admin",
    "/v1//items/../../admin",
    "/v1/items/.%2e/.%2e/admin",
    "/v1/items/%252e%252e/%252e%252e/admin",
    "/v1/items/..;/..;/admin",
    "/v1/items/..\\..\\admin",
    "/V1/ITEMS/../../admin",
    "/v1/ITEMS/1",
    "/v1/items/%c0%ae%c0%ae/admin",
    "/./admin",
    "/v1/items/1/../../../admin",
]


async def _send(url: str, path: str, token: str) -> int:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
    writer.write(request.encode("latin-1"))
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    await writer.wait_closed()
    return int(status_line.split()[1]) if status_line else 0


@pytest.mark.parametrize("path", TRICKS)
async def test_path_trick_never_reaches_an_ungranted_route(proxy: Any, path: str) -> None:
    status = await _send(proxy.url, path, proxy.token())
    for seen in proxy.upstream.requests:
        # Whatever was forwarded is canonical and inside the granted subtree.
        raw = seen.raw_path.split("?", 1)[0]
        assert normalise_path(raw) == raw
        assert raw == "/v1/items" or raw.startswith("/v1/items/"), raw
        assert "admin" not in raw.lower() or raw.startswith("/v1/items/")
    if not proxy.upstream.requests:
        assert status in (400, 403), status
    records = await proxy.wait_audit(1)
    assert len(records) == 1


async def test_dot_segments_inside_the_grant_forward_the_normalised_path(proxy: Any) -> None:
    status = await _send(proxy.url, "/v1/items/a/../b/./c?q=%2e%2e", proxy.token())
    assert status == 200
    assert proxy.upstream.requests[-1].raw_path == "/v1/items/b/c?q=%2e%2e"
