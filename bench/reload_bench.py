"""CPU of a policy reload of 10k grants, exactly as a cluster replica does it.

    python bench/reload_bench.py [--grants 10000] [--runs 5] [--json out.json]

What `ClusterSource` runs when its policy ConfigMap changes: the ConfigMap's base64
`binaryData["policy.json.gz"]` → base64 decode → gunzip → decode → compile, with the
`GrantReuse` and the previous `Policy` it keeps between reloads. Each run is a fresh Python
process (cold caches, as a replica that just started) that loads version 1, then reloads
each scenario's version against the policy it holds, in order:

- first: version 1 into an empty replica (start-up, not a reload)
- one-changed: one grant's `reason` changed
- one-added: one grant added in the middle (every later grant's position shifts)
- 1%-changed: 100 grants changed, spread over the document

CPU is `time.process_time()` around the call, plus the young and middle garbage-collector
generations collected right after it (the passes over what the reload allocated belong to
its cost; left alone they run at the next allocations). Reported: the median of `--runs`
processes, and the load average. Run with `PYTHONPATH=<other checkout>/src` to measure a tree
from before reuse existed (the script then calls the old one-argument path).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from decide_bench import NOW, SERVICE, spread_grants

from nhigate.policy import Grant, Rule, TokenSubject, make_document, pack_document

SCENARIOS = ("first", "one-changed", "one-added", "1%-changed")

_CHILD = """
import gc, json, sys, time
from nhigate.proxy import policy_source
versions = json.load(open(sys.argv[1]))
try:
    from nhigate.policy import GrantReuse
    reuse, held = GrantReuse(), [None]
    def reload(packed):
        held[0] = policy_source._compile_packed(packed, reuse, held[0])
except ImportError:  # a tree from before reuse: what a replica did then
    def reload(packed):
        policy_source._compile_packed(packed)
out = {}
for name, packed in versions:
    gc.collect()
    start = time.process_time()
    reload(packed)
    gc.collect(0)
    gc.collect(1)
    out[name] = (time.process_time() - start) * 1000
print(json.dumps(out))
"""


def _packed(grants: list[Grant]) -> str:
    return base64.b64encode(pack_document(make_document(SERVICE, [], grants, []))).decode()


def versions(n: int) -> list[tuple[str, str]]:
    """(scenario, base64 packed document): each scenario is reloaded after the one before."""
    grants, _ = spread_grants(n)
    one_changed = list(grants)
    one_changed[n // 2] = dataclasses.replace(one_changed[n // 2], reason="changed")
    added = Grant(
        f"bench/g{n // 2:06d}a",
        (TokenSubject("idp", "client-7"),),
        (Rule(frozenset({"GET"}), ("/added",)),),
        expires_at=NOW + 3600,
    )
    percent = [
        dataclasses.replace(g, reason="bulk") if i % 100 == 0 else g
        for i, g in enumerate([*one_changed, added])
    ]
    return [
        ("first", _packed(grants)),
        ("one-changed", _packed(one_changed)),
        ("one-added", _packed([*one_changed, added])),
        ("1%-changed", _packed(percent)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grants", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5, help="fresh processes (median reported)")
    parser.add_argument("--json", help="write results to this file")
    args = parser.parse_args(argv)

    runs: dict[str, list[float]] = {name: [] for name in SCENARIOS}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "versions.json"
        path.write_text(json.dumps(versions(args.grants)))
        load_before = os.getloadavg()
        for _ in range(args.runs):
            child = subprocess.run(
                [sys.executable, "-c", _CHILD, str(path)],
                check=True,
                capture_output=True,
                text=True,
                timeout=300,
            )
            for name, ms in json.loads(child.stdout).items():
                runs[name].append(ms)
        load_after = os.getloadavg()
    result = {
        "grants": args.grants,
        "runs": args.runs,
        "load_average_1m": [load_before[0], load_after[0]],
        "cpu_ms": {name: ms for name, ms in runs.items()},
        "median_cpu_ms": {name: statistics.median(ms) for name, ms in runs.items()},
    }
    print(f"reload of {args.grants} grants as a replica, CPU ms, median of {args.runs} processes")
    print(f"load average (1 min) {load_before[0]:.2f} -> {load_after[0]:.2f}")
    for name in SCENARIOS:
        values = " ".join(f"{v:.0f}" for v in runs[name])
        print(f"  {name:<12} {result['median_cpu_ms'][name]:>6.0f}   ({values})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
