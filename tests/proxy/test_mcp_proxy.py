"""MCP endpoints through the real proxy: per-tool decisions, strict parsing, filtered lists.

A small spec-shaped MCP backend (JSON or SSE answers, a session id on initialize)
records what it receives; the attack tests assert the backend received nothing, or
exactly the bytes that were authorised (docs/security.md invariant 8).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from nhigate.policy import Delegation, Grant, McpRule, Rule, ServiceConfig, TokenSubject

MCP_SERVICE = ServiceConfig(
    namespace="payments",
    name="payments-api",
    backend_service="api",
    backend_port=8080,
    mcp_endpoints=("/mcp",),
)
TOOLS = ["get_weather", "search_docs", "delete_all", "search_admin"]
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def mcp_grant(name: str, subject: str, *, tools: tuple[str, ...] = (), **kw: Any) -> Grant:
    rule = Rule(frozenset(), (), McpRule(tools=tools, resources=kw.pop("resources", ())))
    delegation = kw.pop("delegation", None)
    return Grant(
        name=name,
        subjects=(TokenSubject(issuer="ci", subject=subject, delegation=delegation),),
        rules=(rule,),
        **kw,
    )


GRANTS = (
    mcp_grant("payments/agent", "agent-1", tools=("get_weather", "search_*")),
    mcp_grant("payments/viewer", "viewer", tools=("get_weather",)),
    # A path grant covering everything must not reach the MCP endpoint.
    Grant(
        name="payments/admin-http",
        subjects=(TokenSubject(issuer="ci", subject="http-admin"),),
        rules=(Rule(frozenset({"*"}), ("/**",)),),
    ),
)


def rpc(method: str, request_id: object = 1, **params: Any) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params:
        message["params"] = params
    return json.dumps(message).encode()


def tools_list_result(request_id: object) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "result": {"tools": [{"name": t, "inputSchema": {"type": "object"}} for t in TOOLS]},
    }


class Backend:
    """The MCP backend's behaviour, switchable per test."""

    def __init__(self) -> None:
        self.sse = False
        self.slow: asyncio.Event | None = None
        self.get_events: list[bytes] = []
        self.session_id = "sess-1"
        self.list_content_type = "application/json"


async def _backend_handler(backend: Backend, request: web.Request) -> web.StreamResponse:
    if request.method == "GET":
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        for event in backend.get_events:
            await stream.write(event)
        await stream.write_eof()
        return stream
    if request.method == "DELETE":
        return web.Response(status=200)
    message = json.loads(await request.read())
    if isinstance(message, list) or "id" not in message:
        return web.Response(status=202)
    if message["method"] == "initialize":
        result: dict[str, Any] = {
            "jsonrpc": "2.0",
            "id": message["id"],
            "result": {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}},
        }
        return web.json_response(result, headers={"Mcp-Session-Id": backend.session_id})
    if message["method"] == "tools/list":
        result = tools_list_result(message["id"])
    else:
        result = {"jsonrpc": "2.0", "id": message["id"], "result": {"echo": message.get("params")}}
    if not backend.sse:
        if message["method"] == "tools/list":
            body = orjson.dumps(result)
            return web.Response(body=body, headers={"Content-Type": backend.list_content_type})
        return web.json_response(result)
    stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await stream.prepare(request)
    await stream.write(b": keep-alive\n\n")
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
    await stream.write(b"event: message\ndata: " + orjson.dumps(progress) + b"\n\n")
    if backend.slow is not None:
        await backend.slow.wait()
    payload = orjson.dumps(result)
    # Split the event across writes and lines, with CRLF endings.
    await stream.write(b"id: 7\r\ndata: " + payload[:10])
    await asyncio.sleep(0.01)
    await stream.write(payload[10:] + b"\r\n\r")
    await asyncio.sleep(0.01)
    await stream.write(b"\n")
    await stream.write_eof()
    return stream


@pytest.fixture
async def mcp(signing_key: Any, kit: SimpleNamespace) -> AsyncIterator[SimpleNamespace]:
    backend = Backend()

    async def handler(request: web.Request) -> web.StreamResponse:
        return await _backend_handler(backend, request)

    upstream, upstream_runner = await kit.start_upstream(handler)
    harness, runner = await kit.start_proxy(
        upstream.url, key=signing_key, upstream=upstream, policy_grants=None, max_body_bytes=4096
    )
    harness.set_policy(GRANTS, service=MCP_SERVICE)
    yield SimpleNamespace(proxy=harness, upstream=upstream, backend=backend)
    await harness.session.close()
    await runner.cleanup()
    await upstream_runner.cleanup()


async def post(
    env: SimpleNamespace, body: bytes, sub: str = "agent-1", path: str = "/mcp", **headers: str
) -> tuple[int, Any, aiohttp.ClientResponse]:
    proxy = env.proxy
    all_headers = {**JSON_HEADERS, **proxy.auth(sub), **headers}
    async with proxy.session.post(proxy.url + path, data=body, headers=all_headers) as resp:
        raw = await resp.read()
        return resp.status, raw, resp


def sse_messages(raw: bytes) -> list[Any]:
    messages = []
    for event in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
        if data:
            messages.append(orjson.loads(b"\n".join(data)))
    return messages


# --- per-tool decisions -----------------------------------------------------------------------


async def test_allowed_tool_call_forwards_exactly_the_authorised_bytes(
    mcp: SimpleNamespace,
) -> None:
    body = (
        b'{ "jsonrpc":"2.0",  "id": "a1", "method": "tools/call",\n'
        b' "params": {"name": "get_weather", "arguments": {"city": "Z\\u00fcrich"}} }'
    )
    status, raw, _ = await post(mcp, body)
    assert status == 200, raw
    assert mcp.upstream.requests[-1].body == body
    assert mcp.upstream.last_header("Content-Length") == [str(len(body))]
    records = await mcp.proxy.wait_audit(1)
    assert records[-1]["decision"] == "allow"
    assert records[-1]["mcp"] == {"method": "tools/call", "tool": "get_weather"}
    assert records[-1]["grant"] == "payments/agent"


async def test_forbidden_tool_is_a_jsonrpc_error_with_the_request_id_and_403(
    mcp: SimpleNamespace,
) -> None:
    status, raw, resp = await post(mcp, rpc("tools/call", 42, name="delete_all"))
    assert status == 403
    assert resp.headers["Content-Type"].startswith("application/json")
    answer = orjson.loads(raw)
    assert answer["jsonrpc"] == "2.0"
    assert answer["id"] == 42
    assert answer["error"]["code"] == -32001
    assert answer["error"]["data"]["reason"] == "no_matching_grant"
    assert mcp.upstream.requests == []
    records = await mcp.proxy.wait_audit(1)
    assert records[-1]["decision"] == "deny"
    assert records[-1]["mcp"] == {"method": "tools/call", "tool": "delete_all"}


async def test_wildcard_patterns_and_other_identities(mcp: SimpleNamespace) -> None:
    assert (await post(mcp, rpc("tools/call", 1, name="search_docs")))[0] == 200
    assert (await post(mcp, rpc("tools/call", 2, name="search_docs"), sub="viewer"))[0] == 403
    assert (await post(mcp, rpc("tools/call", 3, name="get_weather"), sub="viewer"))[0] == 200


async def test_session_methods_need_an_mcp_grant_and_path_grants_do_not_reach_mcp(
    mcp: SimpleNamespace,
) -> None:
    for body in (rpc("initialize", 1, protocolVersion="2025-06-18"), rpc("ping", 2)):
        assert (await post(mcp, body))[0] == 200
    # "/**" with every method does not reach an MCP endpoint, in any spelling of its path.
    for path in ("/mcp", "/mcp/", "/MCP", "/mcp/anything", "/%6Dcp"):
        call = rpc("tools/call", 3, name="get_weather")
        status, raw, _ = await post(mcp, call, "http-admin", path)
        assert status == 403, (path, raw)
        assert orjson.loads(raw)["error"]["data"]["reason"] == "no_matching_grant"
    assert (await post(mcp, b"{}", "http-admin", "/other"))[0] == 202  # forwarded
    assert [r.raw_path for r in mcp.upstream.requests][-1] == "/other"


async def test_resource_and_prompt_and_completion_are_decided_on_what_they_name(
    mcp: SimpleNamespace,
) -> None:
    mcp.proxy.set_policy(
        (mcp_grant("payments/docs", "agent-1", resources=("file:///docs/*",)),),
        service=MCP_SERVICE,
    )
    assert (await post(mcp, rpc("resources/read", 1, uri="file:///docs/a.md")))[0] == 200
    assert (await post(mcp, rpc("resources/read", 2, uri="file:///etc/passwd")))[0] == 403
    assert (await post(mcp, rpc("prompts/get", 3, name="anything")))[0] == 403
    ref = {"type": "ref/resource", "uri": "file:///etc/x"}
    assert (await post(mcp, rpc("completion/complete", 4, ref=ref, argument={})))[0] == 403


# --- attacks on the request body ----------------------------------------------------------------


async def test_a_batch_hiding_one_forbidden_call_is_denied_whole(mcp: SimpleNamespace) -> None:
    batch = b"[" + rpc("tools/call", 1, name="get_weather") + b","
    batch += rpc("tools/call", 2, name="delete_all") + b","
    batch += b'{"jsonrpc":"2.0","method":"notifications/initialized"}]'
    status, raw, _ = await post(mcp, batch)
    assert status == 403
    answer = orjson.loads(raw)
    assert [e["id"] for e in answer] == [1, 2]
    assert all(e["error"]["code"] == -32001 for e in answer)
    assert mcp.upstream.requests == []
    allowed = b"[" + rpc("tools/call", 1, name="get_weather") + b"," + rpc("ping", 2) + b"]"
    assert (await post(mcp, allowed))[0] == 202
    assert mcp.upstream.requests[-1].body == allowed


@pytest.mark.parametrize(
    "body",
    [
        # duplicate keys: a parser keeping the last `name` would call delete_all
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        b'"params":{"name":"get_weather","name":"delete_all"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"tools/list",'
        b'"params":{"name":"get_weather"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_weather"},'
        b'"params":{"name":"delete_all"}}',
        # not JSON, or not strictly
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_weather","x":NaN}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_weather\xff"}}',
        b'\xef\xbb\xbf{"jsonrpc":"2.0","id":1,"method":"ping"}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_\\ud800x"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"ping"} {"jsonrpc":"2.0","id":2,"method":"ping"}',
        # not JSON-RPC 2.0, or a name that is not a string at params.name
        b'{"jsonrpc":"1.0","id":1,"method":"ping"}',
        b'{"jsonrpc":"2.0","id":null,"method":"ping"}',
        b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":{"name":"get_weather"}}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["get_weather"]}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        b'"params":{"arguments":{"name":"get_weather"}}}',
        b"[]",
        b'"tools/call"',
    ],
)
async def test_malformed_or_ambiguous_bodies_are_refused_before_the_backend(
    mcp: SimpleNamespace, body: bytes
) -> None:
    status, raw, _ = await post(mcp, body)
    assert status == 400, raw
    assert orjson.loads(raw)["error"]["code"] in (-32700, -32600)
    assert mcp.upstream.requests == []
    records = await mcp.proxy.wait_audit(1)
    assert records[-1]["reason"] == "mcp_rejected"


async def test_nested_name_does_not_stand_in_for_params_name(mcp: SimpleNamespace) -> None:
    body = (
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        b'"params":{"arguments":{"name":"get_weather"},"name":"delete_all"}}'
    )
    assert (await post(mcp, body))[0] == 403
    assert mcp.upstream.requests == []


async def test_unicode_escapes_are_decided_as_the_backend_decodes_them(
    mcp: SimpleNamespace,
) -> None:
    # "tools\u002fcall" *is* tools/call to every JSON parser: decided on delete_all, denied.
    escaped = b'{"jsonrpc":"2.0","id":1,"method":"tools\\u002fcall","params":{"name":"delete_all"}}'
    assert (await post(mcp, escaped))[0] == 403
    allowed = (
        b'{"jsonrpc":"2.0","id":2,"method":"tools\\u002fcall",'
        b'"params":{"name":"\\u0067et_weather"}}'
    )
    assert (await post(mcp, allowed))[0] == 200
    assert mcp.upstream.requests[-1].body == allowed  # forwarded as sent, escapes included
    assert len(mcp.upstream.requests) == 1


@pytest.mark.parametrize(
    "name",
    [
        "get_we\u0430ther",  # Cyrillic a
        "\uff47et_weather",  # full-width g
        "get_weather\u200b",  # zero-width space
        "get_weather ",
        "GET_WEATHER",
        "search_\u0430dmin",  # non-ASCII after a wildcard prefix
    ],
)
async def test_look_alike_tool_names_are_denied(mcp: SimpleNamespace, name: str) -> None:
    status, raw, _ = await post(mcp, rpc("tools/call", 1, name=name))
    assert status == 403, raw
    assert mcp.upstream.requests == []


@pytest.mark.parametrize("method", ["Tools/Call", "TOOLS/CALL", "tools/call ", "tools//call", "x"])
async def test_method_name_case_tricks_are_denied(mcp: SimpleNamespace, method: str) -> None:
    status, raw, _ = await post(mcp, rpc(method, 1, name="get_weather"))
    assert status == 403
    assert orjson.loads(raw)["error"]["data"]["reason"] == "mcp_method_not_allowed"
    assert mcp.upstream.requests == []


async def test_bodies_over_the_limit_are_refused_with_and_without_length(
    mcp: SimpleNamespace,
) -> None:
    big = rpc("tools/call", 1, name="get_weather", arguments={"x": "a" * 5000})
    assert (await post(mcp, big))[0] == 413

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    proxy = mcp.proxy
    headers = {**JSON_HEADERS, **proxy.auth("agent-1")}
    async with proxy.session.post(proxy.url + "/mcp", data=chunks(), headers=headers) as resp:
        assert resp.status == 413
    assert mcp.upstream.requests == []


async def test_chunked_body_is_authorised_whole_and_forwarded_with_its_length(
    mcp: SimpleNamespace,
) -> None:
    body = rpc("tools/call", 9, name="get_weather", arguments={"city": "Oslo"})

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 7):
            yield body[i : i + 7]

    proxy = mcp.proxy
    headers = {**JSON_HEADERS, **proxy.auth("agent-1")}
    async with proxy.session.post(proxy.url + "/mcp", data=chunks(), headers=headers) as resp:
        assert resp.status == 200
    seen = mcp.upstream.requests[-1]
    assert seen.body == body
    assert ("Content-Length", str(len(body))) in seen.headers
    assert not any(k.lower() == "transfer-encoding" for k, _ in seen.headers)


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/json; charset=utf-16", "text/event-stream",
     "application/jsonx", "multipart/form-data; boundary=x"],
)  # fmt: skip
async def test_wrong_or_missing_content_type_is_refused(
    mcp: SimpleNamespace, content_type: str | None
) -> None:
    proxy = mcp.proxy
    headers = {"Accept": "application/json, text/event-stream", **proxy.auth("agent-1")}
    if content_type is not None:
        headers["Content-Type"] = content_type
    body = rpc("tools/call", 1, name="delete_all")
    if content_type == "text/event-stream":  # a tool call smuggled as an SSE request body
        body = b"data: " + body + b"\n\n"
    async with proxy.session.post(
        proxy.url + "/mcp", data=body, headers=headers, skip_auto_headers=["Content-Type"]
    ) as resp:
        assert resp.status == 400
    assert mcp.upstream.requests == []


async def test_two_content_types_are_refused(mcp: SimpleNamespace) -> None:
    # A backend reading the last Content-Type must not see a different body type.
    proxy = mcp.proxy
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Type", "text/plain"),
        *proxy.auth("agent-1").items(),
    ]
    body = rpc("tools/call", 1, name="get_weather")
    async with proxy.session.post(proxy.url + "/mcp", data=body, headers=headers) as resp:
        assert resp.status == 400
    assert mcp.upstream.requests == []


async def test_jsonrpc_over_get_and_query_strings_are_refused(mcp: SimpleNamespace) -> None:
    proxy = mcp.proxy
    auth = proxy.auth("agent-1")
    body = rpc("tools/call", 1, name="delete_all")
    async with proxy.session.get(proxy.url + "/mcp", data=body, headers=auth) as resp:
        assert resp.status == 400
    async with proxy.session.get(
        proxy.url + "/mcp?method=tools/call&name=delete_all", headers=auth
    ) as resp:
        assert resp.status == 400
    async with proxy.session.put(proxy.url + "/mcp", data=body, headers=auth) as resp:
        assert resp.status == 400
    assert mcp.upstream.requests == []


async def test_mirrored_mcp_headers_must_agree_with_the_body(mcp: SimpleNamespace) -> None:
    body = rpc("tools/call", 1, name="get_weather")
    ok = await post(mcp, body, **{"Mcp-Method": "tools/call", "Mcp-Name": "get_weather"})
    assert ok[0] == 200
    encoded = "=?base64?Z2V0X3dlYXRoZXI=?="  # get_weather
    assert (await post(mcp, body, **{"Mcp-Method": "tools/call", "Mcp-Name": encoded}))[0] == 200
    status, raw, _ = await post(mcp, body, **{"Mcp-Name": "delete_all"})
    assert status == 400
    assert orjson.loads(raw)["error"]["code"] == -32020
    assert (await post(mcp, body, **{"Mcp-Method": "tools/list"}))[0] == 400
    assert len(mcp.upstream.requests) == 2


# --- filtered lists ---------------------------------------------------------------------------


def listed(answer: Any) -> list[str]:
    return [t["name"] for t in answer["result"]["tools"]]


async def test_tools_list_is_filtered_per_identity_in_json(mcp: SimpleNamespace) -> None:
    status, raw, _ = await post(mcp, rpc("tools/list", 5))
    assert status == 200
    assert listed(orjson.loads(raw)) == ["get_weather", "search_docs", "search_admin"]
    status, raw, _ = await post(mcp, rpc("tools/list", 6), sub="viewer")
    assert listed(orjson.loads(raw)) == ["get_weather"]
    records = await mcp.proxy.wait_audit(2)
    assert records[-1]["detail"] == "3 list items filtered"


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", ""])
async def test_a_list_answer_is_filtered_whatever_its_content_type(
    mcp: SimpleNamespace, content_type: str
) -> None:
    mcp.backend.list_content_type = content_type
    status, raw, _ = await post(mcp, rpc("tools/list", 5), sub="viewer")
    assert status == 200
    assert listed(orjson.loads(raw)) == ["get_weather"]


async def test_tools_list_is_filtered_in_a_slow_sse_stream(mcp: SimpleNamespace) -> None:
    mcp.backend.sse = True
    mcp.backend.slow = asyncio.Event()
    proxy = mcp.proxy
    headers = {**JSON_HEADERS, **proxy.auth("viewer")}
    body = rpc("tools/list", 8)
    async with proxy.session.post(proxy.url + "/mcp", data=body, headers=headers) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        # The progress notification arrives while the backend is still working.
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 2.0)
        first += await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 2.0)
        assert b"notifications/progress" in first
        mcp.backend.slow.set()
        rest = await resp.read()
    messages = sse_messages(first + rest)
    assert listed(messages[-1]) == ["get_weather"]
    assert messages[-1]["id"] == 8
    assert b"delete_all" not in rest
    assert b"id: 7" in rest


async def test_get_stream_filters_list_results_by_shape_and_drops_ambiguous_events(
    mcp: SimpleNamespace,
) -> None:
    replayed = orjson.dumps(tools_list_result(99))
    dup = b'{"jsonrpc":"2.0","id":98,"result":{"tools":[{"name":"get_weather"}],'
    dup += b'"tools":[{"name":"delete_all"}]}}'
    request = b'{"jsonrpc":"2.0","id":"s1","method":"sampling/createMessage","params":{}}'
    mcp.backend.get_events = [
        b"data: " + replayed + b"\n\n",
        b"data: " + dup + b"\n\n",
        b"data: " + request + b"\n\n",
    ]
    proxy = mcp.proxy
    headers = {"Accept": "text/event-stream", **proxy.auth("viewer")}
    async with proxy.session.get(proxy.url + "/mcp", headers=headers) as resp:
        assert resp.status == 200
        raw = await resp.read()
    messages = sse_messages(raw)
    assert listed(messages[0]) == ["get_weather"]
    assert messages[1]["method"] == "sampling/createMessage"  # the duplicate-key event dropped
    assert len(messages) == 2
    assert b"delete_all" not in raw


# --- sessions ---------------------------------------------------------------------------------


async def test_session_ids_are_bound_to_the_identity_that_received_them(
    mcp: SimpleNamespace,
) -> None:
    status, _, resp = await post(mcp, rpc("initialize", 1, protocolVersion="2025-06-18"))
    assert status == 200
    session = resp.headers["Mcp-Session-Id"]
    ok = await post(mcp, rpc("tools/call", 2, name="get_weather"), **{"Mcp-Session-Id": session})
    assert ok[0] == 200
    stolen = await post(
        mcp, rpc("tools/call", 3, name="get_weather"), sub="viewer", **{"Mcp-Session-Id": session}
    )
    assert stolen[0] == 403
    assert orjson.loads(stolen[1])["error"]["data"]["reason"] == "mcp_session_mismatch"


# --- delegation chains ------------------------------------------------------------------------


async def test_actor_chains_are_constrained_per_subject(mcp: SimpleNamespace) -> None:
    mcp.proxy.set_policy(
        (
            mcp_grant(
                "payments/on-behalf",
                "alice",
                tools=("get_weather",),
                delegation=Delegation(actors=("agent-*",), max_depth=2),
            ),
            mcp_grant("payments/direct", "bob", tools=("get_weather",)),
        ),
        service=MCP_SERVICE,
    )
    call = rpc("tools/call", 1, name="get_weather")

    async def reason(sub: str, act: Any = None) -> tuple[int, str | None]:
        extra = {} if act is None else {"act": act}
        proxy = mcp.proxy
        headers = {**JSON_HEADERS, "Authorization": f"Bearer {proxy.token(sub, **extra)}"}
        async with proxy.session.post(proxy.url + "/mcp", data=call, headers=headers) as resp:
            body = orjson.loads(await resp.read())
            return resp.status, body.get("error", {}).get("data", {}).get("reason")

    assert await reason("alice") == (200, None)
    assert await reason("alice", {"sub": "agent-7"}) == (200, None)
    assert await reason("alice", {"sub": "agent-7", "act": {"sub": "agent-8"}}) == (200, None)
    deep = {"sub": "agent-7", "act": {"sub": "agent-8", "act": {"sub": "agent-9"}}}
    assert await reason("alice", deep) == (403, "delegation_too_deep")
    assert await reason("alice", {"sub": "rogue"}) == (403, "actor_not_allowed")
    assert await reason("bob", {"sub": "agent-7"}) == (403, "delegation_not_allowed")
    records = await mcp.proxy.wait_audit(6)
    assert records[1]["identity"]["actors"] == ["agent-7"]
    assert records[3]["identity"]["actors"] == ["agent-7", "agent-8", "agent-9"]


async def test_malformed_act_claims_are_invalid_tokens(mcp: SimpleNamespace) -> None:
    proxy = mcp.proxy
    for act in ("agent-7", {"client_id": "x"}, {"sub": ""}, {"sub": "a", "act": ["b"]}):
        headers = {**JSON_HEADERS, "Authorization": f"Bearer {proxy.token('alice', act=act)}"}
        async with proxy.session.post(proxy.url + "/mcp", data=rpc("ping"), headers=headers) as r:
            assert r.status == 401


async def test_overrides_cannot_reach_or_leave_an_mcp_endpoint(mcp: SimpleNamespace) -> None:
    # Even for a backend declared to honour overrides: MCP rules cannot authorise another
    # method or path, and a path rule must not reach /mcp through X-Original-URL.
    service = replace(MCP_SERVICE, authorise_path_overrides=True, authorise_method_overrides=True)
    mcp.proxy.set_policy(GRANTS, service=service)
    call = rpc("tools/call", 1, name="get_weather")
    status, _, _ = await post(mcp, call, **{"X-Original-URL": "/admin"})
    assert status == 400
    status, _, _ = await post(mcp, call, **{"X-HTTP-Method-Override": "DELETE"})
    assert status == 400
    smuggled = rpc("tools/call", 2, name="delete_all")
    status, _, _ = await post(mcp, smuggled, "http-admin", "/v1/x", **{"X-Original-URL": "/MCP"})
    assert status == 400
    assert mcp.upstream.requests == []
    records = await mcp.proxy.wait_audit(3)
    assert {r["reason"] for r in records} == {"override_rejected"}
