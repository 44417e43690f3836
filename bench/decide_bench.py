"""decide() latency vs number of grants, plus build, reload and packed-size numbers.

    python bench/decide_bench.py [--json out.json] [--calls N]

Build/reload times at 10k grants are the best of --repeat runs, as wall and CPU (process)
time: on a shared machine the CPU time is the steadier of the two. "reload" is what a
proxy replica does when the policy ConfigMap changes: unpack (gunzip) + decode + compile.

Per-call latency is measured with perf_counter_ns around each decide() call
(timer overhead, ~0.1 us, included). Requests are a mix of allowed and denied
(wrong path, wrong method, expired grant) for identities that hold grants.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from nhigate.policy import (
    Facts,
    Grant,
    Identity,
    IdentityKind,
    Policy,
    Rule,
    ServiceConfig,
    TokenSubject,
    compile_policy,
    decide,
    decode_document,
    encode_document,
    make_document,
    pack_document,
    unpack_document,
)

NOW = 1_800_000_000.0
SERVICE = ServiceConfig("bench", "bench-api", "bench", 8080)


def spread_grants(n: int) -> tuple[list[Grant], list[str]]:
    """n grants over ~n/5 subjects, each with an exact, a `*` and a `/**` pattern."""
    subjects = [f"client-{i}" for i in range(max(1, n // 5))]
    grants = []
    for i in range(n):
        sub = subjects[i % len(subjects)]
        grants.append(
            Grant(
                name=f"bench/g{i:06d}",
                subjects=(TokenSubject("idp", sub),),
                rules=(
                    Rule(frozenset({"GET", "HEAD"}), (f"/v1/res{i}", f"/v1/res{i}/*/history")),
                    Rule(frozenset({"*"}), (f"/v2/team{i % 97}/res{i}/**",)),
                ),
                expires_at=NOW - 1 if i % 10 == 9 else NOW + 3600,
                tenant=None,
            )
        )
    return grants, subjects


def one_subject_grants(n: int) -> tuple[list[Grant], list[str]]:
    """n grants all on ONE subject: the worst bucket."""
    grants = [
        Grant(
            name=f"bench/g{i:06d}",
            subjects=(TokenSubject("idp", "heavy"),),
            rules=(Rule(frozenset({"GET"}), (f"/svc/{i}/**", f"/api/*/item{i}")),),
            expires_at=NOW + 3600,
        )
        for i in range(n)
    ]
    return grants, ["heavy"]


def requests(grants: list[Grant], subjects: list[str], count: int, seed: int) -> list[Facts]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        g = rng.choice(grants)
        sub = g.subjects[0]
        assert isinstance(sub, TokenSubject)
        assert sub.subject is not None
        rule = g.rules[0]
        pattern = rng.choice((*rule.paths, g.rules[-1].paths[0]))
        path = pattern.replace("/**", "/a/b").replace("*", "x")
        kind = rng.random()
        if kind < 0.15:
            path = path + "-nope"
        method = "POST" if kind > 0.9 else "GET"
        identity = Identity(IdentityKind.JWT, "idp", rng.choice([sub.subject, *subjects[:3]]))
        out.append(Facts(identity=identity, method=method, path=path, now=NOW))
    return out


def measure(policy: Policy, facts: list[Facts]) -> dict[str, float]:
    for f in facts[:1000]:
        decide(policy, f)  # warm up
    gc.collect()
    gc.freeze()  # as a proxy should after loading a policy: the GC stops re-scanning it
    clock = time.perf_counter_ns
    samples = []
    allowed = 0
    for f in facts:
        start = clock()
        d = decide(policy, f)
        samples.append(clock() - start)
        allowed += d.allowed
    samples.sort()
    n = len(samples)
    return {
        "p50_us": samples[n // 2] / 1000,
        "p99_us": samples[int(n * 0.99)] / 1000,
        "max_us": samples[-1] / 1000,
        "mean_us": statistics.fmean(samples) / 1000,
        "allowed_fraction": allowed / n,
    }


def reload(data: bytes) -> Policy:
    """What a proxy replica does when the policy ConfigMap changes (JSON already inflated)."""
    return compile_policy(decode_document(data))


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """Best (wall ms, CPU ms) of `repeat` runs, each followed by a young-generation collection
    (the objects a build allocates are scanned once by the GC; that cost belongs to it)."""
    best_wall = best_cpu = math.inf
    for _ in range(repeat):
        gc.collect()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        gc.collect(0)
        best_wall = min(best_wall, (time.perf_counter() - start) * 1000)
        best_cpu = min(best_cpu, (time.process_time() - cpu) * 1000)
    return best_wall, best_cpu


def build_numbers(grants: list[Grant], repeat: int) -> dict[str, float]:
    """make/encode/decode/compile/pack times and sizes for one grant set."""
    doc = make_document(SERVICE, [], grants, [])
    data = encode_document(doc)
    packed = pack_document(doc)
    decoded = decode_document(data)
    fresh = partial(make_document, SERVICE, [], grants, [])
    steps: dict[str, Callable[[], Any]] = {
        "make_document": fresh,
        "make_and_encode": lambda: encode_document(fresh()),
        "encode_only": partial(encode_document, decoded),  # not from make: no cached bytes
        "decode": partial(decode_document, data),
        "compile": partial(compile_policy, doc),
        "reload": partial(reload, data),
        "reload_packed": lambda: compile_policy(unpack_document(packed)),
        "pack": partial(pack_document, doc),
    }
    row: dict[str, float] = {"document_bytes": len(data), "packed_bytes": len(packed)}
    for name, step in steps.items():
        row[f"{name}_ms"], row[f"{name}_cpu_ms"] = timed(step, repeat)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write results to this file")
    parser.add_argument("--calls", type=int, default=20_000, help="decide() calls per case")
    parser.add_argument("--repeat", type=int, default=5, help="runs per build/reload timing")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {"python": sys.version.split()[0], "calls": args.calls, "cases": []}
    cases: list[tuple[str, Callable[[int], tuple[list[Grant], list[str]]], int]] = [
        ("spread", spread_grants, 10),
        ("spread", spread_grants, 1_000),
        ("spread", spread_grants, 10_000),
        ("spread", spread_grants, 100_000),
        ("one-subject", one_subject_grants, 10_000),
    ]
    print(f"{'case':<12} {'grants':>8} {'p50 us':>8} {'p99 us':>8} {'max us':>9} {'allowed':>8}")
    for label, build, n in cases:
        grants, subjects = build(n)
        doc = make_document(SERVICE, [], grants, [])
        policy = compile_policy(doc)
        stats = measure(policy, requests(list(doc.grants), subjects, args.calls, seed=n))
        row = {"case": label, "grants": n, **stats}
        if label == "spread" and n in (1_000, 10_000):
            row.update(build_numbers(grants, args.repeat if n == 10_000 else 1))
        results["cases"].append(row)
        print(
            f"{label:<12} {n:>8} {stats['p50_us']:>8.2f} {stats['p99_us']:>8.2f} "
            f"{stats['max_us']:>9.1f} {stats['allowed_fraction']:>8.2f}"
        )
    for row in results["cases"]:
        if "packed_bytes" in row:
            print(
                f"at {row['grants']} grants: document {row['document_bytes'] / 1024:.0f} KiB, "
                f"packed {row['packed_bytes'] / 1024:.0f} KiB"
            )
    ten_k = next(r for r in results["cases"] if r["grants"] == 10_000)
    print("at 10k grants (best of --repeat; wall / CPU):")
    for name in (
        "make_document",
        "make_and_encode",
        "encode_only",
        "decode",
        "compile",
        "reload",
        "reload_packed",
        "pack",
    ):
        print(f"  {name:<16} {ten_k[name + '_ms']:>7.0f} ms / {ten_k[name + '_cpu_ms']:>5.0f} ms")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
