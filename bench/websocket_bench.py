"""WebSocket message relay cost: through nhigate vs straight to the backend, in one run.

    .venv/bin/python bench/websocket_bench.py [--duration 4] [--connections 8] [--repeat 3]
        [--sizes 64,16384] [--json results.json]

Loopback only, bounded. The backend is aiohttp's own WebSocket echo server in a process of
its own (pinned to CPU 1 when `taskset` exists); nhigate runs in another (pinned to CPU 0)
with a policy declaring `/ws` and granting GET on it; the load is aiohttp's WebSocket client
in this process: `--connections` open connections, each sending a binary message of `--size`
bytes and waiting for its echo, for `--duration` seconds per run (median run by CPU kept).

Cases, side by side for each size:
- `direct`: the client connects to the backend;
- `relay`: through a bare uvloop TCP relay (two `asyncio.Protocol`s copying bytes, no HTTP,
  no checks; pinned to CPU 0 like nhigate): the floor any Python relay pays per message;
- `nhigate`: the client connects through the proxy (the handshake is authenticated and
  decided once per connection; after that the proxy relays bytes).

Reported per case: echoes/s (one echo = one message each way), p50/p99 round-trip latency,
CPU (user + system from /proc) per echo of the backend and of the proxy, and for nhigate the
ratios to direct. The proxy's CPU per relayed message is half its CPU per echo.

Then `--idle N` connections are opened through nhigate and held: the proxy's resident memory
(VmRSS from /proc) per open connection, and its CPU per second while they sit idle (the
re-check timer and nothing else).
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


def serve_backend(port: int) -> None:
    """aiohttp's WebSocket server echoing every message."""
    from aiohttp import WSMsgType, web

    async def echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            elif msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    print("ready", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def serve_nhigate(backend_port: int, port: int) -> None:
    """nhigate declaring /ws as a WebSocket path, with a grant for GET /ws."""
    from nhigate.policy import Rule

    rules = {"ws": (Rule(frozenset({"GET"}), ("/ws",)),)}
    serve_granted_proxy(backend_port, port, rules, websocket_paths=("/ws",))


def serve_relay(backend_port: int, port: int) -> None:
    """A bare TCP relay on uvloop: what relaying bytes costs with nothing else."""
    import uvloop

    class Side(asyncio.Protocol):
        def __init__(self) -> None:
            self.peer: Side | None = None
            self.transport: asyncio.Transport | None = None
            self.pending: list[bytes] = []

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            peer = self.peer
            if peer is not None and peer.transport is not None:
                peer.transport.write(data)
            else:
                self.pending.append(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.peer is not None and self.peer.transport is not None:
                self.peer.transport.close()

    class Front(Side):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            asyncio.get_running_loop().create_task(self.connect())

        async def connect(self) -> None:
            loop = asyncio.get_running_loop()
            _, back = await loop.create_connection(Side, "127.0.0.1", backend_port)
            back.peer, self.peer = self, back
            assert back.transport is not None
            for data in self.pending:
                back.transport.write(data)
            self.pending.clear()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Front, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


async def load(
    url: str, token: str, size: int, connections: int, duration: float
) -> tuple[int, list[float]]:
    """Echo round trips for `duration` s on `connections` WebSockets: (echoes, latencies)."""
    import aiohttp

    payload = os.urandom(size)
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {token}"}

    async with aiohttp.ClientSession() as session:
        sockets = [
            await session.ws_connect(url, headers=headers, max_msg_size=0)
            for _ in range(connections)
        ]
        stop = time.perf_counter() + duration

        async def one(ws: aiohttp.ClientWebSocketResponse) -> None:
            while time.perf_counter() < stop:
                start = time.perf_counter()
                await ws.send_bytes(payload)
                msg = await ws.receive()
                if msg.data != payload:
                    raise RuntimeError(f"echo mismatch: {msg.type}")
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(one(ws) for ws in sockets))
        for ws in sockets:
            await ws.close()
    return len(latencies), latencies


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def idle_cost(url: str, token: str, pid: int, count: int) -> dict[str, float]:
    """Proxy memory per open connection and CPU while `count` connections sit idle."""
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=0)  # the default pool stops at 100 connections
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.sleep(1.0)  # let the proxy settle after the load
        before = rss_kib(pid)
        sockets = [await session.ws_connect(url, headers=headers) for _ in range(count)]
        await asyncio.sleep(1.0)
        after = rss_kib(pid)
        cpu_before = cpu_seconds(pid)
        await asyncio.sleep(3.0)
        idle_cpu = (cpu_seconds(pid) - cpu_before) / 3.0
        for ws in sockets:
            await ws.close()
    return {
        "connections": count,
        "rss_before_mib": before / 1024,
        "rss_after_mib": after / 1024,
        "kib_per_connection": (after - before) / count,
        "idle_cpu_percent": idle_cpu * 100,
    }


async def cases(args: argparse.Namespace) -> dict[str, Any]:
    backend_port, port = free_port(), free_port()
    backend = spawn(__file__, ["--serve-backend", str(backend_port)], "1")
    proxy = spawn(__file__, ["--serve-nhigate", str(backend_port), str(port)], "0")
    relay_port = free_port()
    relay = spawn(__file__, ["--serve-relay", str(backend_port), str(relay_port)], "0")
    try:
        assert proxy.stdout is not None
        token = str(json.loads(proxy.stdout.readline())["token"])
        await wait_port(backend_port)
        await wait_port(port)
        await wait_port(relay_port)
        targets = {
            "direct": (f"http://127.0.0.1:{backend_port}/ws", None),
            "relay": (f"http://127.0.0.1:{relay_port}/ws", relay),
            "nhigate": (f"http://127.0.0.1:{port}/ws", proxy),
        }
        results: dict[str, Any] = {}
        for size in args.sizes:
            per_size: dict[str, Any] = {}
            for name, (url, middle) in targets.items():
                await load(url, token, size, args.connections, 0.5)  # warm up
                runs = []
                for _ in range(args.repeat):
                    backend_before = cpu_seconds(backend.pid)
                    proxy_before = cpu_seconds(middle.pid) if middle is not None else 0.0
                    count, latencies = await load(url, token, size, args.connections, args.duration)
                    backend_used = cpu_seconds(backend.pid) - backend_before
                    proxy_used = (
                        cpu_seconds(middle.pid) - proxy_before if middle is not None else 0.0
                    )
                    echoes = max(1, count)
                    runs.append(
                        {
                            "echoes": count,
                            "echoes_per_s": count / args.duration,
                            "p50_ms": percentile(latencies, 0.50) * 1000,
                            "p99_ms": percentile(latencies, 0.99) * 1000,
                            "backend_cpu_us_per_echo": backend_used * 1e6 / echoes,
                            "proxy_cpu_us_per_echo": proxy_used * 1e6 / echoes,
                        }
                    )
                runs.sort(key=lambda r: r["proxy_cpu_us_per_echo"] + r["backend_cpu_us_per_echo"])
                per_size[name] = runs[len(runs) // 2]
            direct = per_size["direct"]
            for name in ("relay", "nhigate"):
                through = per_size[name]
                through["proxy_cpu_us_per_message"] = through["proxy_cpu_us_per_echo"] / 2
                through["echoes_per_s_ratio"] = through["echoes_per_s"] / direct["echoes_per_s"]
                through["p50_ratio"] = through["p50_ms"] / direct["p50_ms"]
                through["added_p50_ms"] = through["p50_ms"] - direct["p50_ms"]
                through["added_p99_ms"] = through["p99_ms"] - direct["p99_ms"]
            per_size["nhigate"]["cpu_vs_relay"] = (
                per_size["nhigate"]["proxy_cpu_us_per_echo"]
                / per_size["relay"]["proxy_cpu_us_per_echo"]
            )
            results[str(size)] = per_size
        if args.idle:
            results["idle"] = await idle_cost(targets["nhigate"][0], token, proxy.pid, args.idle)
        return results
    finally:
        for child in (proxy, relay, backend):
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def table(results: dict[str, Any]) -> str:
    lines = [
        "| size | case | echoes/s | p50 ms | p99 ms | backend CPU µs/echo | proxy CPU µs/echo "
        "| proxy µs/message | echoes/s vs direct | CPU vs relay |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size, per_size in results.items():
        if size == "idle":
            continue
        for name, r in per_size.items():
            relay = r.get("proxy_cpu_us_per_message")
            ratio = r.get("echoes_per_s_ratio")
            vs_relay = r.get("cpu_vs_relay")
            lines.append(
                f"| {size} B | {name} | {r['echoes_per_s']:.0f} | {r['p50_ms']:.3f} | "
                f"{r['p99_ms']:.3f} | {r['backend_cpu_us_per_echo']:.1f} | "
                f"{r['proxy_cpu_us_per_echo']:.1f} | "
                f"{'' if relay is None else f'{relay:.1f}'} | "
                f"{'' if ratio is None else f'{ratio:.2f}'} | "
                f"{'' if vs_relay is None else f'{vs_relay:.2f}'} |"
            )
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-backend":
        serve_backend(int(sys.argv[2]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-relay":
        serve_relay(int(sys.argv[2]), int(sys.argv[3]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-nhigate":
        serve_nhigate(int(sys.argv[2]), int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[64, 16384]
    )
    parser.add_argument("--idle", type=int, default=500, help="idle connections (0: skip)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()
    results = asyncio.run(cases(args))
    report = {
        "results": results,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "options": {
            "duration": args.duration,
            "connections": args.connections,
            "repeat": args.repeat,
            "sizes": args.sizes,
        },
        "proxy_cpu_us_per_message_median": statistics.median(
            per_size["nhigate"]["proxy_cpu_us_per_message"]
            for size, per_size in results.items()
            if size != "idle"
        ),
    }
    print(table(results))
    if "idle" in results:
        idle = results["idle"]
        print(
            f"{idle['connections']} idle connections through nhigate: "
            f"{idle['kib_per_connection']:.1f} KiB RSS each "
            f"({idle['rss_before_mib']:.1f} -> {idle['rss_after_mib']:.1f} MiB), "
            f"{idle['idle_cpu_percent']:.2f}% CPU while idle"
        )
    print(f"load average before {load_before}, after {report['load_average']['after']}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
