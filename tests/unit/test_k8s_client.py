"""KubeClient against a small fake API server on 127.0.0.1 (wire format, auth, errors, watch)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from nhigate.k8s import (
    CONFIGMAPS,
    DEPLOYMENTS,
    NAMESPACES,
    PROTECTEDSERVICES,
    KubeClient,
    KubeError,
    WatchExpired,
    ref_for,
)

TOKEN = "test-token-123"


class FakeApi:
    """Records requests; serves canned answers."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.watch_lines: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "content_type": request.headers.get("Content-Type"),
                "auth": request.headers.get("Authorization"),
                "body": json.loads(body) if body else None,
            }
        )
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        path = request.path
        if path == "/openid/v1/jwks":
            return web.Response(body=b'{"keys":[]}', content_type="application/json")
        if path.endswith("/missing"):
            status = {"kind": "Status", "reason": "NotFound", "message": "x not found", "code": 404}
            return web.json_response(status, status=404)
        if path.endswith("/forbidden"):
            status = {"kind": "Status", "reason": "Forbidden", "message": "no way", "code": 403}
            return web.json_response(status, status=403)
        if request.query.get("watch") == "true":
            resp = web.StreamResponse()
            await resp.prepare(request)
            for line in self.watch_lines:
                await resp.write(json.dumps(line).encode() + b"\n")
            await resp.write_eof()
            return resp
        if request.method == "GET" and path == "/api/v1/namespaces/ns/configmaps":
            return web.json_response(
                {"metadata": {"resourceVersion": "42"}, "items": [{"metadata": {"name": "a"}}]}
            )
        if request.method == "GET" and path == "/apis/gateway.networking.k8s.io/v1":
            return web.json_response({"resources": [{"name": "httproutes"}]})
        if request.method == "GET" and path.startswith("/apis/nope"):
            return web.json_response({"code": 404}, status=404)
        if request.method in ("PATCH", "POST"):
            return web.json_response(json.loads(body))
        return web.json_response({"metadata": {"name": path.rsplit("/", 1)[-1]}})


@pytest.fixture
async def fake_api(tmp_path: Path) -> AsyncIterator[tuple[FakeApi, KubeClient]]:
    api = FakeApi()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", api.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": TOKEN}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    client = await KubeClient.connect(str(kubeconfig))
    try:
        yield api, client
    finally:
        await client.close()
        await runner.cleanup()


def test_paths() -> None:
    assert CONFIGMAPS.path("ns", "a") == "/api/v1/namespaces/ns/configmaps/a"
    assert DEPLOYMENTS.path("ns") == "/apis/apps/v1/namespaces/ns/deployments"
    assert NAMESPACES.path(name="ns") == "/api/v1/namespaces/ns"
    assert PROTECTEDSERVICES.api_version == "nhigate.io/v1alpha1"
    assert ref_for("apps/v1", "Deployment") is DEPLOYMENTS
    with pytest.raises(ValueError, match="namespace is required"):
        CONFIGMAPS.path(None, "a")
    with pytest.raises(ValueError, match="unknown resource type"):
        ref_for("v1", "Banana")
    # names are path-quoted, never interpreted
    assert CONFIGMAPS.path("ns", "../x") == "/api/v1/namespaces/ns/configmaps/..%2Fx"


async def test_get_found_and_missing(fake_api: tuple[FakeApi, KubeClient]) -> None:
    api, client = fake_api
    assert await client.get(CONFIGMAPS, "a", "ns") == {"metadata": {"name": "a"}}
    assert await client.get(CONFIGMAPS, "missing", "ns") is None
    assert api.requests[0]["auth"] == f"Bearer {TOKEN}"


async def test_errors_carry_status_and_reason(fake_api: tuple[FakeApi, KubeClient]) -> None:
    _, client = fake_api
    with pytest.raises(KubeError) as info:
        await client.get(CONFIGMAPS, "forbidden", "ns")
    assert (info.value.status, info.value.reason, info.value.message) == (
        403,
        "Forbidden",
        "no way",
    )


async def test_list_fills_kind_and_returns_version(fake_api: tuple[FakeApi, KubeClient]) -> None:
    api, client = fake_api
    items, version = await client.list(CONFIGMAPS, "ns", label_selector="a=b")
    assert version == "42"
    assert items == [{"metadata": {"name": "a"}, "apiVersion": "v1", "kind": "ConfigMap"}]
    assert api.requests[-1]["query"] == {"labelSelector": "a=b"}


async def test_apply_is_server_side_apply(fake_api: tuple[FakeApi, KubeClient]) -> None:
    api, client = fake_api
    obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "p", "namespace": "ns"}}
    assert await client.apply(obj) == obj
    sent = api.requests[-1]
    assert sent["method"] == "PATCH"
    assert sent["path"] == "/api/v1/namespaces/ns/configmaps/p"
    assert sent["content_type"] == "application/apply-patch+yaml"
    assert sent["query"] == {"fieldManager": "nhigate", "force": "true"}
    assert sent["body"] == obj


async def test_apply_status(fake_api: tuple[FakeApi, KubeClient]) -> None:
    api, client = fake_api
    await client.apply_status(
        PROTECTEDSERVICES, {"metadata": {"name": "x", "namespace": "ns"}, "status": {"a": 1}}
    )
    sent = api.requests[-1]
    assert sent["path"] == "/apis/nhigate.io/v1alpha1/namespaces/ns/protectedservices/x/status"
    assert sent["body"]["kind"] == "ProtectedService"
    assert sent["body"]["apiVersion"] == "nhigate.io/v1alpha1"
    assert sent["query"]["fieldManager"] == "nhigate"


async def test_delete_ignores_missing(fake_api: tuple[FakeApi, KubeClient]) -> None:
    api, client = fake_api
    await client.delete(CONFIGMAPS, "missing", "ns")
    assert api.requests[-1]["method"] == "DELETE"
    with pytest.raises(KubeError):
        await client.delete(CONFIGMAPS, "forbidden", "ns")


async def test_get_raw(fake_api: tuple[FakeApi, KubeClient]) -> None:
    _, client = fake_api
    assert await client.get_raw("/openid/v1/jwks") == b'{"keys":[]}'


async def test_resource_exists(fake_api: tuple[FakeApi, KubeClient]) -> None:
    _, client = fake_api
    assert await client.resource_exists("gateway.networking.k8s.io", "v1", "httproutes")
    assert not await client.resource_exists("gateway.networking.k8s.io", "v1", "grpcroutes")
    assert not await client.resource_exists("nope.io", "v1", "things")


async def test_watch_yields_events_and_bookmarks(fake_api: tuple[FakeApi, KubeClient]) -> None:
    api, client = fake_api
    api.watch_lines = [
        {"type": "ADDED", "object": {"metadata": {"name": "a", "resourceVersion": "43"}}},
        {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "44"}}},
        {"type": "DELETED", "object": {"metadata": {"name": "a", "resourceVersion": "45"}}},
    ]
    events = [e async for e in client.watch(CONFIGMAPS, "ns", resource_version="42")]
    assert [e.type for e in events] == ["ADDED", "BOOKMARK", "DELETED"]
    assert events[0].object["kind"] == "ConfigMap"
    query = api.requests[-1]["query"]
    assert query["watch"] == "true"
    assert query["allowWatchBookmarks"] == "true"
    assert query["resourceVersion"] == "42"


async def test_watch_raises_expired_on_410(fake_api: tuple[FakeApi, KubeClient]) -> None:
    api, client = fake_api
    api.watch_lines = [
        {"type": "ADDED", "object": {"metadata": {"name": "a"}}},
        {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}},
    ]
    seen: list[str] = []

    async def drain() -> None:
        async for event in client.watch(CONFIGMAPS, "ns", resource_version="1"):
            seen.append(event.type)

    with pytest.raises(WatchExpired) as info:
        await drain()
    assert seen == ["ADDED"]
    assert info.value.status == 410
