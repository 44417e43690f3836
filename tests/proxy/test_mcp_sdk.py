"""The official MCP Python SDK on both sides of the proxy, over Streamable HTTP.

Its `MCPServer` runs under uvicorn on 127.0.0.1 behind a real nhigate proxy; its
`Client` talks to the proxy with real signed tokens, in the handshake era
(`mode="legacy"`: initialize, Mcp-Session-Id, GET stream, DELETE) and in the
current per-request protocol (`mode="2026-07-28"`, `Mcp-Method`/`Mcp-Name` headers).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx2
import pytest
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer

from nhigate.policy import Grant, McpRule, Rule, ServiceConfig, TokenSubject

SERVICE = ServiceConfig("tools", "tools", "tools", 8080, mcp_endpoints=("/mcp",))
MODES = ["legacy", "2026-07-28"]


def tool_grant(name: str, subject: str, tools: tuple[str, ...]) -> Grant:
    return Grant(
        name=name,
        subjects=(TokenSubject(issuer="ci", subject=subject),),
        rules=(Rule(frozenset(), (), McpRule(tools=tools)),),
    )


WEATHER = tool_grant("tools/weather", "agent-1", ("get_weather", "search_*"))
VIEWER = tool_grant("tools/viewer", "viewer", ("get_weather",))


def build_server() -> MCPServer:
    server = MCPServer("tools")

    @server.tool()
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    @server.tool()
    def delete_all() -> str:
        """Delete everything."""
        return "deleted"

    @server.tool()
    def search_docs(query: str) -> str:
        """Search the docs."""
        return f"found {query}"

    return server


@pytest.fixture
async def stack(signing_key: Any, kit: SimpleNamespace) -> AsyncIterator[SimpleNamespace]:
    app = build_server().streamable_http_app()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    assert server.started, "the MCP server did not start"
    harness, runner = await kit.start_proxy(
        f"http://127.0.0.1:{port}", key=signing_key, policy_grants=None
    )
    harness.set_policy((WEATHER, VIEWER), service=SERVICE)
    try:
        yield SimpleNamespace(proxy=harness)
    finally:
        await harness.session.close()
        await runner.cleanup()
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


def client(env: SimpleNamespace, sub: str, mode: str) -> tuple[Any, Any]:
    http = httpx2.AsyncClient(headers=env.proxy.auth(sub), timeout=10)
    transport = streamable_http_client(env.proxy.url + "/mcp", http_client=http)
    return Client(transport, mode=mode, read_timeout_seconds=10), http


def texts(result: Any) -> list[str]:
    return [c.text for c in result.content if getattr(c, "type", "") == "text"]


@pytest.mark.parametrize("mode", MODES)
async def test_sdk_client_and_server_through_the_proxy(stack: SimpleNamespace, mode: str) -> None:
    mcp_client, http = client(stack, "agent-1", mode)
    async with http, mcp_client as session:
        listed = await session.list_tools()
        assert sorted(t.name for t in listed.tools) == ["get_weather", "search_docs"]
        result = await session.call_tool("get_weather", {"city": "Oslo"})
        assert texts(result) == ["sunny in Oslo"]
        with pytest.raises(Exception, match=r"forbidden") as denied:
            await session.call_tool("delete_all", {})
        assert type(denied.value).__name__ == "MCPError", repr(denied.value)
    records = await stack.proxy.wait_audit(3)
    calls = [r for r in records if r.get("mcp", {}).get("method") == "tools/call"]
    assert [(c["decision"], c["mcp"]["tool"]) for c in calls] == [
        ("allow", "get_weather"),
        ("deny", "delete_all"),
    ]


@pytest.mark.parametrize("mode", MODES)
async def test_tools_list_differs_per_identity(stack: SimpleNamespace, mode: str) -> None:
    mcp_client, http = client(stack, "viewer", mode)
    async with http, mcp_client as session:
        listed = await session.list_tools()
        assert [t.name for t in listed.tools] == ["get_weather"]
        with pytest.raises(Exception, match=r"forbidden"):
            await session.call_tool("search_docs", {"query": "x"})


@pytest.mark.parametrize("mode", MODES)
async def test_deleting_the_tool_grant_stops_the_next_call(
    stack: SimpleNamespace, mode: str
) -> None:
    mcp_client, http = client(stack, "agent-1", mode)
    async with http, mcp_client as session:
        assert texts(await session.call_tool("search_docs", {"query": "a"})) == ["found a"]
        # The grant is deleted: the controller publishes a policy without it.
        stack.proxy.set_policy(
            (tool_grant("tools/weather", "agent-1", ("get_weather",)), VIEWER), service=SERVICE
        )
        with pytest.raises(Exception, match=r"forbidden"):
            await session.call_tool("search_docs", {"query": "b"})
        assert texts(await session.call_tool("get_weather", {"city": "Rome"})) == ["sunny in Rome"]
