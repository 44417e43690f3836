"""What each stage of nhigate's request path costs, in instructions per request (callgrind).

    .venv/bin/python bench/stage_costs.py [--requests 1000] [--json out.json]

Counts the native front end as `proxy_bench.py --instructions` does (nginx upstream, one
keep-alive connection, 50 warm-ups, `PYTHONHASHSEED=0`), once as it is and once per stage
with that stage taken out of the child process, so each difference is what the stage costs:

- `audit`: the audit record is neither serialised nor queued (its metrics still are);
- `usage`: the per-grant usage counters for the Lease report are not kept;
- `metrics`: the per-decision counter and latency histogram are not observed;
- `decide`: the first authorisation's decision is reused for every later request;
- `upstream-headers`: the first upstream header list is reused;
- `response-headers`: the first filtered response header list is reused;
- `all`: every one of these at once.

The taken-out stages are a measuring device only (every request here is the same one); the
proxy is never run this way. What is left when all are out is the request plumbing (parsing,
the exchange objects, the upstream pool, the response) over bench/floor_proxy.py's floor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import proxy_bench as pb

STAGES = ("audit", "usage", "metrics", "decide", "upstream-headers", "response-headers")


def take_out(stages: set[str]) -> None:
    """Child process: replace each named stage before the proxy starts."""
    from nhigate.proxy import http1, metrics, pipeline, usage

    cls = pipeline.Pipeline
    if "audit" in stages:

        def record(self: Any, ex: Any, decision: str, reason: Any, grant: Any, *_: Any) -> None:
            elapsed = time.perf_counter() - ex.started
            self.state.metrics.observe_request(decision, reason.value, grant, elapsed)

        cls.record = record  # type: ignore[assignment,method-assign]
    if "usage" in stages:
        usage.UsageRecorder.record = lambda *_: None  # type: ignore[method-assign]
    if "metrics" in stages:
        metrics.ProxyMetrics.observe_request = lambda *_: None  # type: ignore[method-assign]
    if "decide" in stages:
        admit, decided = cls.admit, []

        def first_decision(self: Any, policy: Any, ex: Any, identity: Any, path: str) -> Any:
            if not decided:
                decided.append(admit(self, policy, ex, identity, path))
            ex.identity, ex.decision, ex.policy = identity, decided[0], policy
            return decided[0]

        cls.admit = first_decision  # type: ignore[method-assign]
    if "upstream-headers" in stages:
        build, built = cls.upstream_headers, []

        def first_headers(self: Any, *args: Any) -> Any:
            if not built:
                built.append(build(self, *args))
            return list(built[0])

        cls.upstream_headers = first_headers  # type: ignore[method-assign]
    if "response-headers" in stages:
        keep, kept = http1.response_header_lines, []

        def first_filtered(headers: Any) -> Any:
            if not kept:
                kept.append(keep(headers))
            return kept[0]

        http1.response_header_lines = first_filtered


def count(workdir: Path, up_port: int, stages: str, requests: int) -> float:
    """Instructions per request with `stages` (comma-separated, or empty) taken out."""
    port, admin = pb.free_port(), pb.free_port()
    process, token = pb.spawn_with_token(
        [
            *pb.callgrind_wrapper(workdir),
            *(sys.executable, __file__, "--serve", str(up_port), str(port), str(admin)),
            *("--take-out", stages),
        ]
    )
    per_request, failed = pb.counted_requests(workdir, process, port, token, requests)
    if failed:
        raise RuntimeError(f"{failed} requests failed with {stages or 'nothing'} taken out")
    return per_request


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--take-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        take_out(set(filter(None, args.take_out.split(","))))
        up, port, admin = args.serve
        pb.serve_nhigate(up, port, admin, 1000, os.devnull, None, "native")
        return 0
    pb.peers.ensure_packages({"nginx": "nginx", "valgrind": "valgrind"})
    with tempfile.TemporaryDirectory(prefix="nhigate-bench-") as tmp:
        workdir = Path(tmp)
        up_port = pb.free_port()
        upstream = pb.start_nginx(
            workdir, "upstream", pb.UPSTREAM_BODY.format(port=up_port), pb.LOAD_CPU
        )
        try:
            pb.wait_port(up_port)
            runs = [("as it is", ""), *((s, s) for s in STAGES), ("all", ",".join(STAGES))]
            counted: dict[str, float] = {}
            for label, stages in runs:
                counted[label] = count(
                    workdir / label.replace(" ", "-"), up_port, stages, args.requests
                )
                print(f"{label:<18} {counted[label]:>10,.0f}", flush=True)
        finally:
            upstream.terminate()
            upstream.wait(timeout=10)
    whole = counted["as it is"]
    costs = {label: whole - value for label, value in counted.items() if label != "as it is"}
    print("instructions per request each stage costs (as it is minus without it):")
    for label, cost in costs.items():
        print(f"  {label:<18} {cost:>10,.0f}  ({cost / whole:.1%})")
    if args.json is not None:
        result = {"benchmark": "stage_costs", "requests": args.requests, "counted": counted}
        args.json.write_text(json.dumps({**result, "costs": costs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
