"""Run every nhigate benchmark and write OUT/report.md, OUT/*.png and OUT/results.json.

    .venv/bin/python bench/run.py [--out DIR] [--quick] [--repeat N] [--only a,b] [--skip a,b]

Parts (each a separate bench/ command, run in this order, each with a hard time limit, all
on 127.0.0.1): proxy (proxy_bench.py), instructions (proxy_bench.py --instructions),
decide (decide_bench.py), reload (reload_bench.py), token (token_bench.py),
scale (scale_bench.py), websocket (websocket_bench.py), revocation (revocation_bench.py),
reconcile (reconcile_bench.py), mcp (mcp_bench.py), grpc (grpc_bench.py).
A part that fails or times out is recorded with its error and the run goes on. Every part's
output is kept in OUT/logs/<part>.log and its JSON in OUT/raw/<part>.json.

OUT defaults to bench/out/ (git-ignored). `--quick` runs a reduced version for development
(a few minutes); the full run takes about 10-15 minutes on 2 cores. Needs nginx and wrk (Debian
packages) and the control-plane binaries (hack/build-control-plane.sh, cached once built).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable
PARTS = (
    "proxy",
    "instructions",
    "decide",
    "reload",
    "token",
    "scale",
    "websocket",
    "revocation",
    "reconcile",
    "mcp",
    "grpc",
)


@dataclass(frozen=True)
class Part:
    """One benchmark command, its time limit, and where its JSON lands."""

    name: str
    command: list[str]
    limit_s: float
    json_path: Path | None
    """None when the command prints a table instead (token_bench)."""
    runs: int = 1
    """Run the command this many times and merge (decide: per-call timings are noisy)."""


def plan(out: Path, quick: bool, repeat: int) -> list[Part]:
    """The commands of a full (or --quick) run."""
    raw = out / "raw"

    def script(name: str) -> str:
        return str(BENCH / name)

    duration = "2" if quick else "4"
    proxy = [PY, script("proxy_bench.py"), "--duration", duration, "--repeat", str(repeat)]
    proxy += ["--http1-server", "both"]  # `nhigate` (aiohttp) beside `nhigate-native`
    instructions = [PY, script("proxy_bench.py"), "--instructions", "1000"]
    instructions += ["--http1-server", "both"]  # each front end counted in turn
    decide = [PY, script("decide_bench.py")]
    decide += (
        ["--calls", "5000", "--repeat", "2"] if quick else ["--calls", "20000", "--repeat", "5"]
    )
    reload = [PY, script("reload_bench.py"), "--runs", "2" if quick else "5"]
    token = [PY, script("token_bench.py"), "--seconds", "0.1" if quick else "0.3"]
    scale = [PY, script("scale_bench.py"), "--duration", duration, "--repeat", str(repeat)]
    if quick:
        scale += ["--grants", "10,1000,10000", "--reload-grants", "2000", "--reloads", "2"]
        scale += ["--reload-duration", "6"]
    websocket = [PY, script("websocket_bench.py"), "--duration", duration, "--repeat", str(repeat)]
    revocation = [PY, script("revocation_bench.py"), "--trials", "10" if quick else "50"]
    reconcile = [PY, script("reconcile_bench.py"), "--grants", "200" if quick else "1000"]
    reconcile += ["--timeout", "120" if quick else "300"]
    mcp = [PY, script("mcp_bench.py"), "--duration", duration, "--repeat", str(repeat)]
    grpc = [PY, script("grpc_bench.py"), "--duration", duration, "--repeat", str(repeat)]
    return [
        Part("proxy", [*proxy, "--json", str(raw / "proxy.json")], 900, raw / "proxy.json"),
        Part(
            "instructions",
            [*instructions, "--json", str(raw / "instructions.json")],
            600,
            raw / "instructions.json",
        ),
        Part(
            "decide",
            [*decide, "--json", str(raw / "decide.json")],
            900,
            raw / "decide.json",
            runs=repeat,
        ),
        Part("reload", [*reload, "--json", str(raw / "reload.json")], 600, raw / "reload.json"),
        Part("token", token, 300, None),
        Part("scale", [*scale, "--json", str(raw / "scale.json")], 1200, raw / "scale.json"),
        Part(
            "websocket",
            [*websocket, "--json", str(raw / "websocket.json")],
            600,
            raw / "websocket.json",
        ),
        Part(
            "revocation",
            [*revocation, "--json", str(raw / "revocation.json")],
            900,
            raw / "revocation.json",
        ),
        Part(
            "reconcile",
            [*reconcile, "--json", str(raw / "reconcile.json")],
            900,
            raw / "reconcile.json",
        ),
        Part("mcp", [*mcp, "--json", str(raw / "mcp.json")], 600, raw / "mcp.json"),
        Part("grpc", [*grpc, "--json", str(raw / "grpc.json")], 600, raw / "grpc.json"),
    ]


def parse_token_table(stdout: str) -> dict[str, Any]:
    """token_bench.py's table -> {"columns": [...], "rows": [{"alg": .., column: µs}]}."""
    columns = ["sig only", "parse+claims", "nhigate cold", "nhigate cached", "PyJWT decode"]
    header = next((line for line in stdout.splitlines() if line.startswith("alg")), "")
    if not all(c in header for c in columns):
        raise ValueError(f"unexpected token_bench header: {header!r}")
    rows = []
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) == len(columns) + 2 and re.fullmatch(r"[A-Za-z]+[0-9]*", fields[0]):
            try:
                values = [float(f) for f in fields[1 : len(columns) + 1]]
            except ValueError:
                continue
            rows.append({"alg": fields[0], **dict(zip(columns, values, strict=True))})
    if not rows:
        raise ValueError("token_bench printed no rows")
    return {"benchmark": "token", "columns": columns, "rows": rows}


def merge_decide(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several decide_bench results -> one: per case the median of each latency statistic,
    the best (minimum) of each build/reload timing, and every run's p99 kept."""
    merged = dict(runs[0])
    cases = []
    for i, first in enumerate(runs[0]["cases"]):
        same = [run["cases"][i] for run in runs]
        row = dict(first)
        for key in first:
            values = [r[key] for r in same if isinstance(r.get(key), int | float)]
            if len(values) != len(same) or key == "grants":
                continue
            if key.endswith("_us") or key == "allowed_fraction":
                row[key] = statistics.median(values)
            elif key.endswith("_ms"):
                row[key] = min(values)
        row["p99_us_runs"] = [r["p99_us"] for r in same]
        cases.append(row)
    merged["cases"] = cases
    merged["runs"] = len(runs)
    return merged


def relative(arg: str) -> str:
    """`arg` with the checkout's absolute path dropped, so commands read as run from it."""
    return arg.removeprefix(f"{ROOT}/")


def run_part(part: Part, logs: Path) -> dict[str, Any]:
    """Run one part under its time limit; never raises."""
    log = logs / f"{part.name}.log"
    entry: dict[str, Any] = {
        "command": [shlex.quote(relative(arg)) for arg in part.command],
        "load_before": list(os.getloadavg()),
    }
    log.write_text("")
    started = time.monotonic()
    runs = f" ({part.runs} runs, merged)" if part.runs > 1 else ""
    print(f"==> {part.name}: {' '.join(entry['command'])}{runs}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        outputs: list[dict[str, Any]] = []
        for _ in range(part.runs):
            proc = subprocess.run(
                part.command,
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=part.limit_s / part.runs,
                check=False,
            )
            stderr = "\n--- stderr ---\n" + proc.stderr if proc.stderr else ""
            with log.open("a") as out:
                out.write(proc.stdout + stderr)
            if proc.returncode != 0 or part.json_path is None:
                break
            outputs.append(json.loads(part.json_path.read_text()))
        if proc.returncode != 0:
            entry.update(status="failed", error=(proc.stderr or proc.stdout)[-2000:])
        elif part.json_path is not None:
            result = outputs[0] if len(outputs) == 1 else merge_decide(outputs)
            part.json_path.write_text(json.dumps(result, indent=2) + "\n")
            entry.update(status="ok", result=result, runs=len(outputs))
        else:
            entry.update(status="ok", result=parse_token_table(proc.stdout))
            (logs.parent / "raw" / f"{part.name}.json").write_text(
                json.dumps(entry["result"], indent=2) + "\n"
            )
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        with log.open("a") as out:
            out.write(partial)
        entry.update(status="timeout", error=f"no result within {part.limit_s:.0f} s")
    except (OSError, ValueError) as exc:
        entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    entry["seconds"] = time.monotonic() - started
    entry["load_after"] = list(os.getloadavg())
    tail = "" if entry["status"] == "ok" else f": {entry['error'].strip().splitlines()[-1:]}"
    print(f"    {entry['status']} in {entry['seconds']:.0f} s{tail}", flush=True)
    return entry


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory, kernel, and the load average now."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    models = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return {
        "cores": os.cpu_count(),
        "cpu_model": models[0].strip() if models else platform.processor() or "unknown",
        "mem_total_gib": int(mem.group(1)) / 2**20 if mem else None,
        "kernel": platform.release(),
        "load_before": list(os.getloadavg()),
    }


def tool_version(cmd: list[str], pattern: str) -> str:
    """First match of `pattern` in a tool's version output, or 'not found'."""
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).exists():
        return "not found"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    match = re.search(pattern, proc.stdout + proc.stderr)
    return match.group(1) if match else "unknown"


def control_plane_bin_dir() -> Path | None:
    """The cached control-plane binaries (None when not built yet)."""
    proc = subprocess.run(
        [str(ROOT / "hack" / "control-plane-bin-dir")],
        capture_output=True,
        text=True,
        check=False,
    )
    return Path(proc.stdout.strip()) if proc.returncode == 0 else None


def versions() -> dict[str, str]:
    """Versions of everything measured or measuring."""
    out = {"python": platform.python_version()}
    for dist in ("nhigate", "aiohttp", "uvloop", "cryptography", "pyjwt", "kopf", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["nginx"] = tool_version(["nginx", "-v"], r"nginx/(\S+)")
    out["wrk"] = tool_version(["wrk", "-v"], r"wrk (\S+)")
    bin_dir = control_plane_bin_dir()
    if bin_dir is not None:
        out["kube-apiserver"] = tool_version(
            [str(bin_dir / "kube-apiserver"), "--version"], r"Kubernetes (\S+)"
        )
        out["etcd"] = tool_version([str(bin_dir / "etcd"), "--version"], r"etcd Version: (\S+)")
    else:
        out["kube-apiserver"] = "not built (hack/build-control-plane.sh)"
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "src"], check=False
    )
    out["nhigate commit"] = (commit.stdout.strip() or "unknown") + (
        " + uncommitted changes in src/" if dirty.returncode == 1 else ""
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=BENCH / "out")
    parser.add_argument("--quick", action="store_true", help="reduced run for development")
    parser.add_argument("--repeat", type=int, help="runs per measured case (default 3, quick 1)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--skip", help="comma-separated parts to leave out")
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    chosen = args.only.split(",") if args.only else list(PARTS)
    skipped = set(args.skip.split(",")) if args.skip else set()
    unknown = (set(chosen) | skipped) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {sorted(unknown)}")
    out: Path = args.out.resolve()
    (out / "raw").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": " ".join(
            shlex.quote(a) for a in [".venv/bin/python", "bench/run.py", *(argv or sys.argv[1:])]
        ),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "repeat": repeat,
        "machine": machine(),
        "versions": versions(),
        "parts": {},
    }
    for part in plan(out, args.quick, repeat):
        if part.name in chosen and part.name not in skipped:
            results["parts"][part.name] = run_part(part, out / "logs")
    results["machine"]["load_after"] = list(os.getloadavg())
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    sys.path.insert(0, str(BENCH))
    from report import write_report

    for path in write_report(results, out):
        print(path)
    failed = [name for name, entry in results["parts"].items() if entry["status"] != "ok"]
    if failed:
        print(f"parts not measured: {', '.join(failed)} (see {out / 'logs'})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
