"""`nhigate access-review` over a million audit lines: wall time, CPU time, peak memory.

    .venv/bin/python bench/access_review_bench.py [--lines 1000000] [--json out.json] [--gzip]

Generates a realistic audit log with the proxy's own `audit_line` (50 grants on 5
services, 500 callers, ~90 % allowed requests with ids in their paths, ~10 % denials, one
line every ~10 ms of audit time) and matching resources, then runs the real CLI
(`nhigate access-review -o json`) in a child process per size: user+system CPU from the
child's own rusage (`os.wait4`), and the peak resident set as the child's `VmHWM` from
/proc/self/status, read by the child as it exits. (Not `ru_maxrss`: on Linux it counts the
parent's resident set shared between fork and exec, which here is the generator's.) Running
the same review over 1/10 of the lines shows the memory does not grow with the input; an
empty audit gives the interpreter-and-imports baseline.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nhigate.policy import Identity, IdentityKind
from nhigate.proxy.audit import audit_line

SERVICES = 5
GRANTS_PER_SERVICE = 10
CALLERS = 500
START = 1_780_000_000.0
AT = "2026-06-30T00:00:00Z"

ISSUER = """apiVersion: nhigate.io/v1alpha1
kind: IdentityIssuer
metadata: {name: idp, namespace: bench}
spec:
  issuer: https://idp.bench.example
  audiences: [bench]
  jwksUri: https://idp.bench.example/jwks
"""

SERVICE = """apiVersion: nhigate.io/v1alpha1
kind: ProtectedService
metadata: {name: svc-%(s)d, namespace: bench}
spec:
  backend: {service: svc-%(s)d, port: 8080}
  issuers: [idp]
"""

GRANT = """apiVersion: nhigate.io/v1alpha1
kind: RouteGrant
metadata: {name: g-%(s)d-%(g)d, namespace: bench}
spec:
  target: {protectedService: svc-%(s)d}
  subjects:
    - token: {issuer: idp, subject: caller-%(c1)d}
    - token: {issuer: idp, subject: caller-%(c2)d}
  rules:
    - methods: [GET, HEAD]
      paths: ["/v1/orders/**", "/v1/customers/*"]
    - methods: [POST, PUT, DELETE]
      paths: ["/v1/orders/*", "/v1/refunds"]
    - methods: ["*"]
      paths: ["/admin/**"]
%(expiry)s"""


def write_resources(directory: Path) -> list[tuple[str, str]]:
    """The YAML files; returns (grant name, subject) for each grant's first subject."""
    (directory / "issuer.yaml").write_text(ISSUER)
    grants = []
    for s in range(SERVICES):
        (directory / f"svc-{s}.yaml").write_text(SERVICE % {"s": s})
        for g in range(GRANTS_PER_SERVICE):
            c1 = (s * GRANTS_PER_SERVICE + g) % CALLERS
            c2 = (c1 + 250) % CALLERS
            expiry = '  expiresAt: "2027-01-01T00:00:00Z"\n' if g % 2 else ""
            values = {"s": s, "g": g, "c1": c1, "c2": c2, "expiry": expiry}
            (directory / f"grant-{s}-{g}.yaml").write_text(GRANT % values)
            grants.append((f"bench/g-{s}-{g}", f"caller-{c1}"))
    return grants


def write_audit(path: Path, lines: int, grants: list[tuple[str, str]], compress: bool) -> None:
    """`lines` audit lines, written in batches so generating them needs little memory."""
    rng = random.Random(7)
    identities = {
        sub: Identity(kind=IdentityKind.JWT, issuer="idp", subject=sub)
        for sub in {f"caller-{c}" for c in range(CALLERS)}
    }
    opener = gzip.open if compress else open
    with opener(path, "wb") as out:
        batch: list[bytes] = []
        for n in range(lines):
            now = START + n * 0.01
            grant, subject = grants[rng.randrange(len(grants))]
            identity = identities[subject]
            roll = rng.random()
            if roll < 0.6:
                method, target = "GET", f"/v1/orders/{rng.randrange(100000)}"
            elif roll < 0.8:
                method, target = "GET", f"/v1/orders/{rng.randrange(1000)}/items"
            elif roll < 0.9:
                method, target = "POST", "/v1/refunds"
            else:
                method, target = "DELETE", f"/v1/payments/{rng.randrange(1000)}"
            allowed = method != "DELETE"
            batch.append(
                audit_line(
                    now,
                    f"{n:016x}",
                    "allow" if allowed else "deny",
                    "allowed" if allowed else "no_matching_grant",
                    method,
                    target,
                    "http://svc:8080",
                    200 if allowed else 403,
                    rng.random() * 2,
                    "sha256:0123456789abcdef",
                    identity,
                    grant if allowed else None,
                )
            )
            if len(batch) >= 10000:
                out.write(b"".join(batch))
                batch.clear()
        out.write(b"".join(batch))


CHILD = """
import sys
from nhigate.cli.main import main
code = main(sys.argv[1:])
sys.stdout.flush()
with open("/proc/self/status") as status:
    sys.stderr.write(next(line for line in status if line.startswith("VmHWM:")))
sys.exit(code)
"""
"""Runs the CLI, then reports its own peak resident set (kB) on stderr."""


def measure(resources: Path, audit: Path) -> dict[str, float]:
    """Run the CLI on `audit` in a child process; its wall time, CPU time and peak RSS."""
    command = [sys.executable, "-c", CHILD, "access-review", "-r", str(resources)]
    command += ["--at", AT, "-o", "json", str(audit)]
    started = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors)
        assert child.stdout is not None
        output = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        errors.seek(0)
        peak_kib = int(errors.read().decode().rsplit("VmHWM:", 1)[1].split()[0])
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode not in (0, 1):
        raise SystemExit(f"access-review failed with exit code {child.returncode}")
    report = json.loads(output)
    return {
        "records": report["audit"]["records"],
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mib": round(peak_kib / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--gzip", action="store_true", help="gzip the generated audit")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nhigate-review-bench-") as tmp:
        root = Path(tmp)
        resources = root / "resources"
        resources.mkdir()
        grants = write_resources(resources)
        suffix = ".jsonl.gz" if args.gzip else ".jsonl"
        results: dict[str, Any] = {"lines": args.lines, "gzip": args.gzip, "runs": {}}
        for lines in (0, args.lines // 10, args.lines):
            audit = root / f"audit-{lines}{suffix}"
            started = time.perf_counter()
            write_audit(audit, lines, grants, args.gzip)
            generated = time.perf_counter() - started
            run = measure(resources, audit)
            run["audit_mib"] = round(audit.stat().st_size / 2**20, 1)
            run["generate_s"] = round(generated, 1)
            if lines:  # above the empty audit's CPU: imports and resources are not per line
                above = run["cpu_s"] - results["runs"]["0"]["cpu_s"]
                run["cpu_us_per_line"] = round(above / lines * 1e6, 2)
            results["runs"][str(lines)] = run
            print(f"{lines:>9} lines: {json.dumps(run)}", flush=True)
            audit.unlink()
        results["load_average"] = os.getloadavg()
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
