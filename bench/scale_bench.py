"""Proxy throughput and memory vs grant count, and a 10k-grant reload under load.

    .venv/bin/python bench/scale_bench.py [--grants 10,1000,10000,100000] [--duration 4]
        [--repeat 3] [--connections 32] [--reload-grants 10000] [--reloads 3] [--json PATH]

Loopback only, every run bounded. An nginx upstream and wrk run on CPU 1, the proxy on CPU 0.

- Throughput: for each grant count one nhigate process loads a policy document of that many
  grants exactly as a cluster replica does (decode + compile of the ConfigMap's `policy.json`)
  and serves a valid ES256 token (one grant of them) while wrk runs; median of `--repeat` runs.
  Reported: req/s, p99, proxy CPU per request, and the proxy's RSS after warm-up; RSS per 1k
  grants is the slope of RSS against grant count (least squares).
- Reload under load: `nhigate proxy --resources DIR` (standalone) with `--reload-grants`
  RouteGrants in DIR (1k per file); wrk runs for a bounded time, sized from the measured reload
  cost, while one grants file is rewritten `--reloads` times (atomic rename, new `reason` on
  its grants, so the version changes; the proxy re-reads the whole directory).
  Reported: every non-2xx and socket error wrk saw (0 means no request failed or was
  dropped), p99/max latency against a run without reloads, the time from each rewrite until
  `/metrics` counts the reload (includes the proxy's 1 s directory poll), and the in-process
  cost of the standalone reload (YAML load + compile) timed on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from proxy_bench import UPSTREAM_BODY, start_nginx  # bench/ is on sys.path for scripts

ROOT = Path(__file__).resolve().parent.parent
PROXY_CPU = "0"
LOAD_CPU = "1"
ISSUER = "https://scale.bench"
AUDIENCE = "bench-api"
NAMESPACE = "bench"
SERVICE = "bench-api"
REQUEST_PATH = "/v1/items/123"
GRANTS_PER_FILE = 1000
"""Resource files are capped at 4 MiB; 1k grants per file is ~0.3 MiB."""
NHIGATE = str(Path(sys.executable).with_name("nhigate"))

WRK_SCRIPT = """
wrk.headers["Authorization"] = "Bearer {token}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %d %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, timeout: float = 2.0) -> int:
    """Status of a GET, 0 when the connection fails."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0


def wait_until(what: str, check: Any, timeout: float) -> float:
    """Poll `check()` every 20 ms until truthy; return the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.02)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(url: str, script: Path, connections: int, duration: float) -> dict[str, float]:
    """One bounded wrk run (1 thread, on LOAD_CPU); counts and latencies in ms."""
    cmd = ["taskset", "-c", LOAD_CPU, shutil.which("wrk") or "/usr/bin/wrk", "-t1"]
    cmd += [f"-c{connections}", f"-d{math.ceil(duration)}s", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=duration + 30)
    line = next(x for x in out.stdout.splitlines() if x.startswith("WRK "))
    requests, micros, errors, non2xx, p50, p99, peak = (int(v) for v in line.split()[1:])
    return {
        "requests": requests,
        "rps": requests / (micros / 1e6),
        "errors": errors,
        "non2xx": non2xx,
        "p50_ms": p50 / 1000,
        "p99_ms": p99 / 1000,
        "max_ms": peak / 1000,
    }


@contextlib.contextmanager
def nginx_upstream(workdir: Path) -> Iterator[int]:
    """A tiny nginx answering 200 on every path, pinned to LOAD_CPU; yields its port."""
    port = free_port()
    proc = start_nginx(workdir, "upstream", UPSTREAM_BODY.format(port=port), LOAD_CPU)
    try:
        wait_until("nginx upstream", lambda: http_status(f"http://127.0.0.1:{port}/") == 200, 10)
        yield port
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class Signer:
    """An ES256 issuer key: its public JWK Set and tokens for any subject."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> dict[str, Any]:
        numbers = self.key.public_key().public_numbers()

        def b64(n: int) -> str:
            return jwt.utils.base64url_encode(n.to_bytes(32, "big")).decode()

        jwk = {"kty": "EC", "crv": "P-256", "x": b64(numbers.x), "y": b64(numbers.y)}
        return {"keys": [{**jwk, "kid": "scale", "alg": "ES256", "use": "sig"}]}

    def token(self, subject: str) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "iat": now, "exp": now + 3000}
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": "scale"})


def write_script(path: Path, token: str) -> Path:
    path.write_text(WRK_SCRIPT.format(token=token))
    return path


# --- throughput and memory vs grant count --------------------------------------------------


def policy_bytes(signer: Signer, grants: int, upstream_port: int) -> bytes:
    """The encoded policy document (ConfigMap `policy.json`) with `grants` grants."""
    from nhigate.policy import (
        Grant,
        IssuerConfig,
        Rule,
        ServiceConfig,
        TokenSubject,
        encode_document,
        make_document,
    )

    issuer = IssuerConfig(
        name="scale",
        issuer=ISSUER,
        audiences=(AUDIENCE,),
        algorithms=("ES256",),
        max_token_lifetime_seconds=3600,
        clock_skew_seconds=30,
        jwks=signer.jwks(),
    )
    grant_list = [
        Grant(
            name=f"{NAMESPACE}/grant-{i:06d}",
            subjects=(TokenSubject(issuer="scale", subject=f"client-{i}"),),
            rules=(Rule(frozenset({"GET"}), (f"/v1/svc{i}/**", "/v1/items/*")),),
        )
        for i in range(grants)
    ]
    service = ServiceConfig(NAMESPACE, SERVICE, "api", upstream_port)
    return encode_document(make_document(service, (issuer,), grant_list, ()))


def serve_document(path: Path, upstream_port: int, port: int, admin_port: int) -> None:
    """Child process: load `path` as a replica loads its ConfigMap, then serve."""
    from nhigate.proxy import server
    from nhigate.proxy.policy_source import PolicyHolder, compile_document_bytes
    from nhigate.proxy.settings import ProxySettings, Upstream

    holder = PolicyHolder()
    holder.swap(compile_document_bytes(path.read_bytes()))
    settings = ProxySettings(
        upstream=Upstream("http", "127.0.0.1", upstream_port),
        listen_port=port,
        admin_port=admin_port,
        audit_log=os.devnull,
    )
    server.run(settings, holder=holder)


def throughput_case(
    workdir: Path,
    signer: Signer,
    upstream: int,
    grants: int,
    connections: int,
    duration: float,
    repeat: int,
) -> dict[str, Any]:
    """Start a proxy with `grants` grants, measure RSS and `repeat` wrk runs, stop it."""
    document = workdir / f"policy-{grants}.json"
    document.write_bytes(policy_bytes(signer, grants, upstream))
    port, admin = free_port(), free_port()
    cmd = ["taskset", "-c", PROXY_CPU, sys.executable, __file__, "--serve-document"]
    cmd += [str(document), str(upstream), str(port), str(admin)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        load_s = wait_until(
            f"proxy with {grants} grants",
            lambda: http_status(f"http://127.0.0.1:{admin}/readyz") == 200,
            240,
        )
        document.unlink()
        script = write_script(workdir / f"wrk-{grants}.lua", signer.token(f"client-{grants // 2}"))
        url = f"http://127.0.0.1:{port}{REQUEST_PATH}"
        run_wrk(url, script, 4, 1)  # warm up: token cache, upstream pool
        rss = rss_kib(proc.pid)
        runs = []
        for _ in range(repeat):
            before = cpu_seconds(proc.pid)
            run = run_wrk(url, script, connections, duration)
            run["cpu_us"] = (cpu_seconds(proc.pid) - before) * 1e6 / max(1, run["requests"])
            runs.append(run)
        runs.sort(key=lambda r: r["rps"])
        best = runs[len(runs) // 2]
        return {
            "grants": grants,
            "connections": connections,
            "rps": best["rps"],
            "rps_runs": [r["rps"] for r in runs],
            "p50_ms": best["p50_ms"],
            "p99_ms": best["p99_ms"],
            "cpu_us": statistics.median(r["cpu_us"] for r in runs),
            "failed": sum(r["non2xx"] + r["errors"] for r in runs),
            "rss_mib": rss / 1024,
            "startup_s": load_s,
        }
    finally:
        stop(proc)


def slope_per_1k(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of y against x, scaled to per 1,000 x."""
    if len(points) < 2:
        return 0.0
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    num = sum((x - mean_x) * (y - mean_y) for x, y in points)
    den = sum((x - mean_x) ** 2 for x, _ in points)
    return num / den * 1000 if den else 0.0


# --- reload under load -----------------------------------------------------------------------


def resources_yaml(signer: Signer, upstream_port: int) -> str:
    """IdentityIssuer + backend-agnostic ProtectedService for the standalone proxy."""
    issuer = {
        "apiVersion": "nhigate.io/v1alpha1",
        "kind": "IdentityIssuer",
        "metadata": {"name": "scale", "namespace": NAMESPACE},
        "spec": {
            "issuer": ISSUER,
            "audiences": [AUDIENCE],
            "algorithms": ["ES256"],
            "jwks": signer.jwks(),
        },
    }
    service = {
        "apiVersion": "nhigate.io/v1alpha1",
        "kind": "ProtectedService",
        "metadata": {"name": SERVICE, "namespace": NAMESPACE},
        "spec": {"backend": {"service": "api", "port": upstream_port}, "issuers": ["scale"]},
    }
    return "\n---\n".join(json.dumps(doc) for doc in (issuer, service)) + "\n"


def grants_yaml(indices: range, generation: int) -> str:
    """RouteGrants `grant-<i>` for i in `indices`, one multi-document file (JSON is YAML)."""
    docs = []
    for i in indices:
        docs.append(
            json.dumps(
                {
                    "apiVersion": "nhigate.io/v1alpha1",
                    "kind": "RouteGrant",
                    "metadata": {"name": f"grant-{i:06d}", "namespace": NAMESPACE},
                    "spec": {
                        "target": {"protectedService": SERVICE},
                        "subjects": [{"token": {"issuer": "scale", "subject": f"client-{i}"}}],
                        "rules": [{"methods": ["GET"], "paths": [f"/v1/svc{i}/**", "/v1/items/*"]}],
                        "reason": f"scale bench generation {generation}",
                    },
                },
                separators=(",", ":"),
            )
        )
    return "\n---\n".join(docs) + "\n"


def reloads_loaded(admin: int) -> int:
    """`nhigate_proxy_policy_reloads_total{result="loaded"}` from /metrics."""
    url = f"http://127.0.0.1:{admin}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(r'nhigate_proxy_policy_reloads_total\{result="loaded"\} ([0-9.e+]+)', text)
    return int(float(match.group(1))) if match else 0


def standalone_reload_cost(directory: Path, repeat: int) -> dict[str, float]:
    """In-process wall and CPU ms of what the standalone reload does (YAML load + compile)."""
    from nhigate.policy import compile_policy
    from nhigate.proxy.policy_source import load_standalone_document

    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        compile_policy(load_standalone_document(directory, None, time.time()))
        walls.append((time.perf_counter() - wall) * 1000)
        cpus.append((time.process_time() - cpu) * 1000)
    return {"wall_ms": statistics.median(walls), "cpu_ms": statistics.median(cpus)}


def reload_under_load(
    workdir: Path,
    signer: Signer,
    upstream: int,
    grants: int,
    reloads: int,
    min_duration: float,
    connections: int,
) -> dict[str, Any]:
    """wrk against a standalone proxy while its grants are rewritten `reloads` times.

    The grants live in files of GRANTS_PER_FILE; each rewrite replaces the first file (a new
    `reason` on its grants) by atomic rename, and the proxy re-reads the whole directory. The
    wrk run is sized from the measured reload cost so that every reload happens under load.
    """
    directory = workdir / "resources"
    directory.mkdir()
    (directory / "service.yaml").write_text(resources_yaml(signer, upstream))
    files = []
    for first in range(0, grants, GRANTS_PER_FILE):
        path = directory / f"grants-{first // GRANTS_PER_FILE:03d}.yaml"
        path.write_text(grants_yaml(range(first, min(grants, first + GRANTS_PER_FILE)), 0))
        files.append(path)
    cost = standalone_reload_cost(directory, repeat=1)
    duration = min(240.0, max(min_duration, reloads * (2 * cost["wall_ms"] / 1000 + 3) + 4))
    port, admin = free_port(), free_port()
    cmd = ["taskset", "-c", PROXY_CPU, NHIGATE, "proxy", "--resources", str(directory)]
    cmd += ["--upstream", f"http://127.0.0.1:{upstream}", "--listen", f"127.0.0.1:{port}"]
    cmd += ["--admin-listen", f"127.0.0.1:{admin}", "--audit-log", os.devnull]
    log = (workdir / "standalone-proxy.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        startup = wait_until(
            "standalone proxy ready",
            lambda: http_status(f"http://127.0.0.1:{admin}/readyz") == 200,
            300,
        )
        script = write_script(workdir / "reload.lua", signer.token(f"client-{grants // 2}"))
        url = f"http://127.0.0.1:{port}{REQUEST_PATH}"
        run_wrk(url, script, 4, 1)
        baseline = run_wrk(url, script, connections, min(duration, 6.0))
        write_to_served: list[float] = []
        under_load: list[bool] = []
        result: dict[str, Any] = {}
        failures: list[BaseException] = []

        def load() -> None:
            try:
                result.update(run_wrk(url, script, connections, duration))
            except BaseException as exc:  # re-raised below, in the main thread
                failures.append(exc)

        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(2.0)
        for generation in range(1, reloads + 1):
            seen = reloads_loaded(admin)
            staged = directory / ".staged"
            staged.write_text(grants_yaml(range(min(grants, GRANTS_PER_FILE)), generation))
            written = time.monotonic()
            os.replace(staged, files[0])
            wait_until("reload", partial(reloaded_since, admin, seen), duration + 60)
            write_to_served.append((time.monotonic() - written) * 1000)
            under_load.append(loader.is_alive())
            time.sleep(1.0)
        loader.join(timeout=duration + 60)
        if failures or not result:
            raise RuntimeError(f"wrk under reload failed: {failures}")
        return {
            "grants": grants,
            "reloads": reloads,
            "connections": connections,
            "duration_s": duration,
            "startup_s": startup,
            "reload_cpu_ms": cost["cpu_ms"],
            "reload_wall_ms": cost["wall_ms"],
            "write_to_served_ms": write_to_served,
            "all_reloads_under_load": all(under_load),
            "baseline": baseline,
            "under_reload": result,
            "failed_requests": int(result.get("non2xx", 0) + result.get("errors", 0)),
        }
    finally:
        stop(proc)
        log.close()


def reloaded_since(admin: int, seen: int) -> bool:
    """True once /metrics counts more successful reloads than `seen`."""
    return reloads_loaded(admin) > seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--grants", default="10,1000,10000,100000")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    parser.add_argument("--repeat", type=int, default=3, help="wrk runs per grant count")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--reload-grants", type=int, default=10_000)
    parser.add_argument("--reloads", type=int, default=3)
    parser.add_argument(
        "--reload-duration", type=float, default=12.0, help="minimum seconds of load"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--serve-document", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_document:
        doc, up, port, admin = args.serve_document
        serve_document(Path(doc), int(up), int(port), int(admin))
        return 0
    signer = Signer()
    with tempfile.TemporaryDirectory(prefix="nhigate-scale-") as tmp:
        workdir = Path(tmp)
        with nginx_upstream(workdir) as upstream:
            cases = []
            print(f"{'grants':>8}{'req/s':>9}{'p99 ms':>9}{'cpu us/req':>12}{'RSS MiB':>9}")
            for grants in (int(g) for g in args.grants.split(",")):
                row = throughput_case(
                    workdir, signer, upstream, grants, args.connections, args.duration, args.repeat
                )
                cases.append(row)
                print(
                    f"{grants:>8}{row['rps']:>9.0f}{row['p99_ms']:>9.2f}{row['cpu_us']:>12.1f}"
                    f"{row['rss_mib']:>9.1f}"
                )
            per_1k = slope_per_1k([(r["grants"], r["rss_mib"]) for r in cases])
            print(f"proxy RSS per 1k grants: {per_1k:.2f} MiB")
            reload = reload_under_load(
                workdir,
                signer,
                upstream,
                args.reload_grants,
                args.reloads,
                args.reload_duration,
                args.connections,
            )
    under = reload["under_reload"]
    print(
        f"reload of {reload['grants']} grants (standalone YAML): {reload['reload_wall_ms']:.0f} ms"
        f" wall / {reload['reload_cpu_ms']:.0f} ms CPU in-process; write->served "
        + ", ".join(f"{ms:.0f}" for ms in reload["write_to_served_ms"])
        + f" ms; failed requests during reloads: {reload['failed_requests']}"
        f" of {under.get('requests', 0)}; p99 {under.get('p99_ms', 0):.1f} ms"
        f" (baseline {reload['baseline']['p99_ms']:.1f}), max {under.get('max_ms', 0):.0f} ms"
    )
    summary = {
        "benchmark": "scale",
        "throughput": cases,
        "rss_mib_per_1k_grants": per_1k,
        "reload": reload,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
