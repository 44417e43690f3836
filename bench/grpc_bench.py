"""gRPC unary calls per core: through nhigate (HTTP/2 in and out) vs straight to the backend.

    .venv/bin/python bench/grpc_bench.py [--duration 4] [--concurrency 32] [--repeat 3]
        [--size 64] [--only direct] [--json results.json]

Loopback only, bounded. The backend is grpcio's asyncio server running the Echo test service
(tests/proxy/grpc_peer.py, stubs generated from tests/proxy/protos/ at start) in a process of
its own (pinned to CPU 1 when `taskset` exists); nhigate runs in another (pinned to CPU 0),
started with `--upstream-protocol http2` (HTTP/2 on the proxied port, h2c to the backend)
and a grant allowing `POST /nhigate.test.Echo/Unary`. The load is grpcio's asyncio client in
this process, one channel (one HTTP/2 connection) per case:

- `concurrent`: `--concurrency` callers issuing Unary calls back to back on that channel for
  `--duration` seconds (calls/s, CPU per call);
- `latency`: one caller, one call at a time (p50/p99 round trip).

Cases side by side: `direct` (the client calls the backend) and `nhigate` (through the
proxy; the bearer token is verified once, then served from the proxy's token cache).
Each call carries a `--size`-byte payload echoed back and the same `authorization` metadata in
both cases. Reported per case and load: calls/s, p50/p99 latency, CPU (user + system from
/proc) per call of the backend and of the proxy, failed calls; for nhigate the proxy's calls
per core (1e6 / proxy CPU µs per call) and the ratios to direct. The median run by CPU of
`--repeat` runs is kept. CPU numbers are only meaningful on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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

METHOD = "/nhigate.test.Echo/Unary"
CASES = ("direct", "nhigate")
CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),  # never through an http_proxy from the environment
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


# --- children -----------------------------------------------------------------------------------


def serve_backend(port: int) -> None:
    """grpcio's asyncio server with the Echo service (h2c)."""
    from grpc_peer import main as serve

    serve(["--port", str(port)])


def serve_nhigate(backend_port: int, port: int) -> None:
    """nhigate speaking HTTP/2 both ways, with a grant for the Unary method."""
    from nhigate.policy import Rule

    rules = {"grpc": (Rule(frozenset({"POST"}), (METHOD,)),)}
    serve_granted_proxy(backend_port, port, rules, upstream_protocol="http2")


# --- load ----------------------------------------------------------------------------------------


async def load(
    port: int, token: str, size: int, concurrency: int, duration: float
) -> tuple[int, list[float], int]:
    """Unary calls on one channel for `duration` s: (calls, latencies in s, failed calls)."""
    import grpc
    from grpc_peer import load_test_service

    pb2, pb2_grpc = load_test_service()
    metadata = (("authorization", f"Bearer {token}"),)
    request = pb2.EchoRequest(text="bench", payload=os.urandom(size))
    latencies: list[float] = []
    failed = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        stub = pb2_grpc.EchoStub(channel)
        await stub.Unary(request, metadata=metadata, timeout=10)  # connected before timing
        stop = time.perf_counter() + duration

        async def caller() -> None:
            nonlocal failed
            while time.perf_counter() < stop:
                start = time.perf_counter()
                try:
                    reply = await stub.Unary(request, metadata=metadata, timeout=10)
                except grpc.aio.AioRpcError:
                    failed += 1
                    continue
                if reply.payload != request.payload:
                    raise RuntimeError("echo mismatch")
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(latencies), latencies, failed


async def measure(
    port: int, token: str, args: argparse.Namespace, backend_pid: int, proxy_pid: int | None
) -> dict[str, Any]:
    """Both loads against one target: the median run by CPU of each."""
    await load(port, token, args.size, args.concurrency, 0.5)  # warm up: token cache, pools
    out: dict[str, Any] = {}
    for name, concurrency in (("concurrent", args.concurrency), ("latency", 1)):
        runs = []
        for _ in range(args.repeat):
            backend_before = cpu_seconds(backend_pid)
            proxy_before = cpu_seconds(proxy_pid) if proxy_pid is not None else 0.0
            count, latencies, failed = await load(
                port, token, args.size, concurrency, args.duration
            )
            backend_used = cpu_seconds(backend_pid) - backend_before
            proxy_used = cpu_seconds(proxy_pid) - proxy_before if proxy_pid is not None else 0.0
            calls = max(1, count)
            run: dict[str, Any] = {
                "concurrency": concurrency,
                "calls": count,
                "failed": failed,
                "calls_per_s": count / args.duration,
                "p50_ms": percentile(latencies, 0.50) * 1000,
                "p99_ms": percentile(latencies, 0.99) * 1000,
                "backend_cpu_us_per_call": backend_used * 1e6 / calls,
                "proxy_cpu_us_per_call": proxy_used * 1e6 / calls,
            }
            if proxy_pid is not None and proxy_used > 0:
                run["proxy_calls_per_core"] = count / proxy_used
            runs.append(run)
        runs.sort(key=lambda r: r["proxy_cpu_us_per_call"] + r["backend_cpu_us_per_call"])
        out[name] = runs[len(runs) // 2]
    return out


def compare(results: dict[str, Any]) -> None:
    """Add nhigate's ratios to direct, in place."""
    if "direct" not in results or "nhigate" not in results:
        return
    for name, through in results["nhigate"].items():
        direct = results["direct"][name]
        through["calls_per_s_ratio"] = through["calls_per_s"] / max(direct["calls_per_s"], 1e-9)
        through["added_p50_ms"] = through["p50_ms"] - direct["p50_ms"]
        through["added_p99_ms"] = through["p99_ms"] - direct["p99_ms"]


def stop(children: list[subprocess.Popen[str]]) -> None:
    for child in children:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


async def cases(args: argparse.Namespace) -> dict[str, Any]:
    backend_port = free_port()
    backend = spawn(__file__, ["--serve-backend", str(backend_port)], "1")
    children = [backend]
    try:
        assert backend.stdout is not None
        if backend.stdout.readline().strip() != "ready":
            raise RuntimeError("the gRPC backend did not start")
        await wait_port(backend_port)
        results: dict[str, Any] = {}
        token = "direct-calls-carry-the-same-metadata"
        if "direct" in args.only:
            results["direct"] = await measure(backend_port, token, args, backend.pid, None)
        if "nhigate" in args.only:
            port = free_port()
            proxy = spawn(__file__, ["--serve-nhigate", str(backend_port), str(port)], "0")
            children.append(proxy)
            assert proxy.stdout is not None
            token = str(json.loads(proxy.stdout.readline())["token"])
            await wait_port(port)
            results["nhigate"] = await measure(port, token, args, backend.pid, proxy.pid)
        compare(results)
        return results
    finally:
        stop(children[::-1])


def table(results: dict[str, Any]) -> str:
    lines = [
        "| case | load | calls/s | p50 ms | p99 ms | failed | backend CPU µs/call "
        "| proxy CPU µs/call | proxy calls/core | calls/s vs direct |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case, per_load in results.items():
        for name, r in per_load.items():
            per_core = r.get("proxy_calls_per_core")
            ratio = r.get("calls_per_s_ratio")
            lines.append(
                f"| {case} | {name} ({r['concurrency']}) | {r['calls_per_s']:.0f} | "
                f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['failed']} | "
                f"{r['backend_cpu_us_per_call']:.1f} | {r['proxy_cpu_us_per_call']:.1f} | "
                f"{'' if per_core is None else f'{per_core:.0f}'} | "
                f"{'' if ratio is None else f'{ratio:.2f}'} |"
            )
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-backend":
        serve_backend(int(sys.argv[2]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-nhigate":
        serve_nhigate(int(sys.argv[2]), int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="payload bytes per call")
    parser.add_argument(
        "--only",
        type=lambda v: v.split(","),
        default=list(CASES),
        help=f"comma-separated subset of {','.join(CASES)}",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if set(args.only) - set(CASES):
        parser.error(f"unknown cases: {sorted(set(args.only) - set(CASES))}")
    load_before = os.getloadavg()
    results = asyncio.run(cases(args))
    report = {
        "results": results,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "settings": {
            "duration_s": args.duration,
            "concurrency": args.concurrency,
            "repeat": args.repeat,
            "size": args.size,
        },
    }
    print(table(results))
    print(f"load average before {load_before}, after {report['load_average']['after']}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
