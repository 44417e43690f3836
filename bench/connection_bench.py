"""What an idle client connection costs the proxy, and what refusing one over the bound costs.

    .venv/bin/python bench/connection_bench.py [--connections 1000] [--refusals 500] [--json P]

One in-process proxy (`ProxyRunner`, the real connection guard) on 127.0.0.1 with a
bound of `--connections`. Measured:

- Python heap per open, silent connection (tracemalloc, over `--connections` of them,
  client sockets excluded): what holding a connection costs besides its kernel buffers;
- with the bound reached, `--refusals` further connections, one at a time: wall time from
  `connect()` to the 503 and the close (p50/p99), and the proxy process's CPU per refusal
  (process CPU time, which includes the client's side of the connect, so it is an upper
  bound).

No nginx, no wrk; everything listens on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from aiohttp import web

from nhigate.proxy.audit import AuditLog
from nhigate.proxy.factory import create_app
from nhigate.proxy.metrics import ProxyMetrics
from nhigate.proxy.rejects import rejected_request_audit
from nhigate.proxy.runner import ProxyRunner
from nhigate.proxy.settings import ProxySettings, Upstream


async def _proxy(bound: int) -> tuple[ProxyRunner, int, ProxyMetrics]:
    settings = ProxySettings(
        upstream=Upstream("http", "127.0.0.1", 9),
        listen_port=0,
        admin_port=0,
        max_connections=bound,
        request_head_timeout=600.0,
    )
    metrics = ProxyMetrics()
    app = create_app(settings, metrics=metrics, audit=AuditLog(io.BytesIO()))
    runner = ProxyRunner(app, shutdown_timeout=1.0, **rejected_request_audit(app))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    return runner, port, metrics


async def _open(port: int, count: int, metrics: ProxyMetrics) -> list[socket.socket]:
    loop = asyncio.get_running_loop()
    held = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        held.append(sock)
    for _ in range(1000):  # at most 10 s for the proxy to accept them all
        if (metrics.registry.get_sample_value("nhigate_proxy_connections_open") or 0) >= count:
            return held
        await asyncio.sleep(0.01)
    raise RuntimeError("the proxy did not accept every connection within 10 s")


async def _refused_once(port: int) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = await reader.read()
    writer.close()
    elapsed = time.perf_counter() - started
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:40]
    return elapsed


async def measure(connections: int, refusals: int) -> dict[str, Any]:
    runner, port, metrics = await _proxy(connections)
    try:
        await asyncio.sleep(0.1)
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        held = await _open(port, connections, metrics)
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        own = [tracemalloc.Filter(False, socket.__file__), tracemalloc.Filter(False, __file__)]
        diff = after.filter_traces(own).compare_to(before.filter_traces(own), "filename")
        heap = sum(stat.size_diff for stat in diff)
        cpu_before = time.process_time()
        times = [await _refused_once(port) for _ in range(refusals)]
        cpu = time.process_time() - cpu_before
        refused = metrics.registry.get_sample_value("nhigate_proxy_connections_refused_total")
        for sock in held:
            sock.close()
    finally:
        await runner.cleanup()
    quantiles = statistics.quantiles(times, n=100)
    return {
        "benchmark": "connections",
        "connections": connections,
        "heap_bytes_per_connection": heap / connections,
        "refusals": refusals,
        "refused_counted": refused,
        "refusal_p50_ms": quantiles[49] * 1000,
        "refusal_p99_ms": quantiles[98] * 1000,
        "refusal_cpu_us_upper_bound": cpu / refusals * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--refusals", type=int, default=500)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = asyncio.run(measure(args.connections, args.refusals))
    print(
        f"{args.connections} idle connections: {result['heap_bytes_per_connection']:.0f} B "
        f"of Python heap each; refusal at the bound: p50 {result['refusal_p50_ms']:.3f} ms, "
        f"p99 {result['refusal_p99_ms']:.3f} ms, <= {result['refusal_cpu_us_upper_bound']:.0f} "
        f"µs CPU each (client included); counted {result['refused_counted']:.0f}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
