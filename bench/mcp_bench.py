"""The added cost of MCP decisions: a `tools/call` (and a filtered `tools/list`) vs a plain request.

    .venv/bin/python bench/mcp_bench.py [--duration 4] [--connections 8] [--repeat 3]
        [--tools 20] [--json results.json]

Two measurements, loopback only, bounded:

1. `decision`: in process, the cost of the decision alone — `decide_request()` for a
   plain request vs reading an MCP body (strict JSON parse + JSON-RPC checks) plus the
   MCP decision, per call (median of `--repeat` runs of 20k calls).
2. `proxy`: one nhigate process (pinned to CPU 0 when `taskset` exists) in front of a
   minimal keep-alive HTTP upstream, driven by an asyncio client with `--connections`
   keep-alive connections for `--duration` seconds per case (the median run by CPU kept):
   - `plain`: `POST /v1/items/1` with the same JSON body as the tools/call, a path grant;
   - `tools/call`: `POST /mcp`, an MCP grant listing the tool;
   - `tools/list`: `POST /mcp`, the upstream answers `--tools` tools, half of them granted.
   Reported per case: req/s, p50/p99 latency, and the proxy's CPU (user + system from
   /proc) per request; the MCP cases also as the difference to `plain`.

No nginx or wrk needed (unlike proxy_bench.py). The token is verified once and then
served from the proxy's token cache, as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from processes import (
    cpu_seconds,
    free_port,
    percentile,
    serve_granted_proxy,
    spawn,
    wait_port,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "proxy"))

CALL = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "get_weather", "arguments": {"city": "Oslo", "units": "metric"}},
    }
).encode()
LIST = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).encode()


def tool_names(count: int) -> list[str]:
    return ["get_weather", *(f"tool_{i:03d}" for i in range(1, count))]


# --- children -----------------------------------------------------------------------------------


def serve_upstream(port: int, tools: int) -> None:
    """A minimal keep-alive HTTP/1.1 upstream: a fixed JSON-RPC result, or a tools list."""
    call_body = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}).encode()
    listed = [{"name": n, "inputSchema": {"type": "object"}} for n in tool_names(tools)]
    list_body = json.dumps({"jsonrpc": "2.0", "id": 2, "result": {"tools": listed}}).encode()

    def response(body: bytes) -> bytes:
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        return head.encode() + b"\r\n\r\n" + body

    answers = {True: response(list_body), False: response(call_body)}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length) if length else b""
                writer.write(answers[b'"tools/list"' in body])
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        print("ready", flush=True)
        await server.serve_forever()

    asyncio.run(main())


def serve_nhigate(upstream_port: int, port: int, tools: int) -> None:
    """nhigate with a policy: a path grant for /v1/items/* and an MCP grant on /mcp."""
    from nhigate.policy import McpRule, Rule

    granted = tuple(tool_names(tools)[: max(1, tools // 2)])
    rules = {
        "http": (Rule(frozenset({"POST"}), ("/v1/items/*",)),),
        "mcp": (Rule(frozenset(), (), McpRule(tools=granted)),),
    }
    serve_granted_proxy(upstream_port, port, rules, mcp_endpoints=("/mcp",))


# --- load ----------------------------------------------------------------------------------------


async def load(
    port: int, path: str, body: bytes, token: str, connections: int, duration: float
) -> tuple[int, list[float], int]:
    """Keep-alive POSTs for `duration` s: (requests, latencies in s, non-2xx answers)."""
    request = (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    bad = 0
    stop = time.perf_counter() + duration

    async def one() -> None:
        nonlocal bad
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < stop:
                start = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                bad += not 200 <= status < 300
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return len(latencies), latencies, bad


async def proxy_cases(args: argparse.Namespace) -> dict[str, Any]:
    up_port, port = free_port(), free_port()
    upstream = spawn(__file__, ["--serve-upstream", str(up_port), str(args.tools)], "1")
    proxy = spawn(__file__, ["--serve-nhigate", str(up_port), str(port), str(args.tools)], "0")
    try:
        assert proxy.stdout is not None
        token = str(json.loads(proxy.stdout.readline())["token"])
        await wait_port(up_port)
        await wait_port(port)
        cases = {
            "plain": ("/v1/items/1", CALL),
            "tools/call": ("/mcp", CALL),
            "tools/list": ("/mcp", LIST),
        }
        for path, body in cases.values():  # warm up: token cache, connection pool
            await load(port, path, body, token, args.connections, 0.5)
        results: dict[str, Any] = {}
        for name, (path, body) in cases.items():
            runs = []
            for _ in range(args.repeat):
                before = cpu_seconds(proxy.pid)
                count, latencies, bad = await load(
                    port, path, body, token, args.connections, args.duration
                )
                used = cpu_seconds(proxy.pid) - before
                runs.append(
                    {
                        "requests": count,
                        "rps": count / args.duration,
                        "p50_ms": percentile(latencies, 0.50) * 1000,
                        "p99_ms": percentile(latencies, 0.99) * 1000,
                        "cpu_us": used * 1e6 / max(1, count),
                        "non2xx": bad,
                    }
                )
            runs.sort(key=lambda r: r["cpu_us"])
            results[name] = runs[len(runs) // 2]
        for name in ("tools/call", "tools/list"):
            results[name]["added_cpu_us"] = results[name]["cpu_us"] - results["plain"]["cpu_us"]
            results[name]["added_p50_ms"] = results[name]["p50_ms"] - results["plain"]["p50_ms"]
            results[name]["added_p99_ms"] = results[name]["p99_ms"] - results["plain"]["p99_ms"]
        return results
    finally:
        for child in (proxy, upstream):
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


# --- in-process decision cost ---------------------------------------------------------------------


def decision_cost(repeat: int, calls: int = 20_000) -> dict[str, float]:
    """Per-call microseconds: plain `decide_request` vs MCP body parse + decision."""
    from nhigate.policy import (
        Grant,
        Identity,
        IdentityKind,
        McpRule,
        Rule,
        ServiceConfig,
        TokenSubject,
        compile_policy,
        make_document,
    )
    from nhigate.policy.decide import decide_request
    from nhigate.policy.mcp import mcp_scope
    from nhigate.proxy.mcp import parse_messages

    subject = (TokenSubject(issuer="bench", subject="agent"),)
    grants = [
        Grant(f"bench/g{i:04d}", (TokenSubject("bench", f"client-{i}"),),
              (Rule(frozenset({"GET"}), (f"/v1/svc{i}/**",)),))
        for i in range(1000)
    ]  # fmt: skip
    grants.append(Grant("bench/http", subject, (Rule(frozenset({"POST"}), ("/v1/items/*",)),)))
    grants.append(
        Grant("bench/mcp", subject, (Rule(frozenset(), (), McpRule(tools=("get_*", "search"))),))
    )
    service = ServiceConfig("bench", "bench-api", "api", 80, mcp_endpoints=("/mcp",))
    policy = compile_policy(make_document(service, (), grants, ()))
    identity = Identity(kind=IdentityKind.JWT, issuer="bench", subject="agent")
    now = time.time()

    def plain() -> None:
        for _ in range(calls):
            decide_request(policy, identity, "POST", "/v1/items/1", now, None)

    def mcp() -> None:
        for _ in range(calls):
            messages, _ = parse_messages(CALL)
            scope = mcp_scope(policy, identity, "/mcp", now, None)
            message = messages[0]
            assert message.kind is not None
            scope.decide(message.kind, message.name)

    out: dict[str, float] = {}
    for name, fn in (("plain_decide_us", plain), ("mcp_parse_and_decide_us", mcp)):
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e6 / calls)
        out[name] = statistics.median(samples)
    out["added_us"] = out["mcp_parse_and_decide_us"] - out["plain_decide_us"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tools", type=int, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve-upstream", nargs=2, metavar=("PORT", "TOOLS"))
    parser.add_argument("--serve-nhigate", nargs=3, metavar=("UPSTREAM", "PORT", "TOOLS"))
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(int(args.serve_upstream[0]), int(args.serve_upstream[1]))
        return 0
    if args.serve_nhigate:
        up, port, tools = (int(v) for v in args.serve_nhigate)
        serve_nhigate(up, port, tools)
        return 0
    result = {
        "decision": decision_cost(args.repeat),
        "proxy": asyncio.run(proxy_cases(args)),
        "load_average": os.getloadavg()[0],
        "settings": {
            "duration_s": args.duration,
            "connections": args.connections,
            "repeat": args.repeat,
            "tools": args.tools,
        },
    }
    d = result["decision"]
    print(
        f"decision: plain {d['plain_decide_us']:.2f} us, MCP parse+decide "
        f"{d['mcp_parse_and_decide_us']:.2f} us (+{d['added_us']:.2f} us)"
    )
    print(f"{'case':<12}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}{'+CPU us':>9}")
    for name, r in result["proxy"].items():
        added = r.get("added_cpu_us")
        extra = f"{added:>9.1f}" if added is not None else f"{'':>9}"
        print(
            f"{name:<12}{r['rps']:>9.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
            f"{r['cpu_us']:>12.1f}{extra}"
        )
    print(f"load average {result['load_average']:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
