"""Proxy overhead in one run: direct upstream vs nginx reverse proxy vs nhigate.

    .venv/bin/python bench/proxy_bench.py [--duration 5] [--grants 1000]

Loopback only, bounded (`duration` seconds per case). The upstream is an nginx
returning a small fixed body; the proxy under test (nginx or nhigate) is pinned
to CPU 0, wrk and the upstream to CPU 1. nhigate runs with a 1k-grant policy,
a valid ES256 token (verified once, then served from the token cache) and
audit lines written to a file. Needs `nginx` and `wrk` on PATH (Debian: apt-get
install -y nginx wrk) and `taskset` (util-linux).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROXY_CPU = "0"
LOAD_CPU = "1"
ISSUER = "https://bench.issuer"
AUDIENCE = "bench-api"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    {body}
}}
"""

UPSTREAM_BODY = """
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type application/json; return 200 '{{"ok":true}}'; }}
    }}
"""

PROXY_BODY = """
    upstream backend {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
        }}
    }}
"""


def start_nginx(workdir: Path, name: str, body: str, cpu: str) -> subprocess.Popen[bytes]:
    directory = workdir / name
    directory.mkdir()
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=directory, body=body))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return subprocess.Popen(
        ["taskset", "-c", cpu, nginx, "-c", str(conf), "-p", str(directory), "-e", "stderr"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@dataclass
class Result:
    name: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    cpu_us: float = 0.0
    """CPU time of the proxy process(es) per request (robust on a busy machine)."""


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the given processes, in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def with_children(pid: int) -> list[int]:
    """`pid` and its direct children (nginx master + worker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(int(c) for c in children)]


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(name: str, url: str, connections: int, duration: int, script: Path) -> Result:
    wrk = shutil.which("wrk") or "/usr/bin/wrk"
    cmd = ["taskset", "-c", LOAD_CPU, wrk, "-t1", f"-c{connections}", f"-d{duration}s"]
    cmd += ["--latency", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=duration + 30)
    text = out.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", text).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", text).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    return Result(name, connections, rps, p50, p99, int(bad.group(1)) if bad else 0)


def serve_nhigate(upstream_port: int, port: int, admin_port: int, grants: int, audit: str) -> None:
    """Child process: run nhigate with an in-memory 1k-grant policy (no API server needed)."""
    sys.path.insert(0, str(ROOT / "tests" / "proxy"))
    from jwt_factory import jwks_for, make_signing_key

    from nhigate.policy import (
        Grant,
        IssuerConfig,
        Rule,
        ServiceConfig,
        TokenSubject,
        compile_policy,
        make_document,
    )
    from nhigate.proxy import server
    from nhigate.proxy.policy_source import PolicyHolder
    from nhigate.proxy.settings import ProxySettings, Upstream

    key = make_signing_key("ES256", kid="bench")
    issuer = IssuerConfig(
        name="bench",
        issuer=ISSUER,
        audiences=(AUDIENCE,),
        algorithms=("ES256",),
        max_token_lifetime_seconds=7200,
        clock_skew_seconds=30,
        jwks=jwks_for(key),
    )
    grant_list = tuple(
        Grant(
            name=f"bench/grant-{i:04d}",
            subjects=(TokenSubject(issuer="bench", subject=f"client-{i}"),),
            rules=(Rule(methods=frozenset({"GET"}), paths=(f"/v1/svc{i}/**", "/v1/items/*")),),
        )
        for i in range(grants)
    )
    service = ServiceConfig(
        namespace="bench", name="bench-api", backend_service="api", backend_port=upstream_port
    )
    policy = compile_policy(make_document(service, (issuer,), grant_list, ()))
    from jwt_factory import claims_for, sign

    subject = f"client-{grants // 2}"
    token = sign(key, claims_for(ISSUER, AUDIENCE, subject, lifetime=3600))
    print(json.dumps({"token": token}), flush=True)
    settings = ProxySettings(
        upstream=Upstream("http", "127.0.0.1", upstream_port),
        listen_port=port,
        admin_port=admin_port,
        audit_log=audit,
    )
    holder = PolicyHolder()
    holder.swap(policy)
    server.run(settings, holder=holder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--grants", type=int, default=1000)
    parser.add_argument("--connections", default="1,32")
    parser.add_argument("--serve-nhigate", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_nhigate:
        up, port, admin, audit = args.serve_nhigate
        serve_nhigate(int(up), int(port), int(admin), args.grants, audit)
        return 0
    connections = [int(c) for c in args.connections.split(",")]
    processes: list[subprocess.Popen[Any]] = []
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="nhigate-bench-") as tmp:
        workdir = Path(tmp)
        try:
            up_port, nginx_port, nh_port, nh_admin = (free_port() for _ in range(4))
            processes.append(
                start_nginx(workdir, "upstream", UPSTREAM_BODY.format(port=up_port), LOAD_CPU)
            )
            body = PROXY_BODY.format(port=nginx_port, upstream=up_port)
            processes.append(start_nginx(workdir, "proxy", body, PROXY_CPU))
            audit = workdir / "audit.jsonl"
            serve = [str(up_port), str(nh_port), str(nh_admin), str(audit)]
            nh = subprocess.Popen(
                [
                    *("taskset", "-c", PROXY_CPU, sys.executable, __file__),
                    *("--grants", str(args.grants), "--serve-nhigate", *serve),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            processes.append(nh)
            assert nh.stdout is not None
            token = json.loads(nh.stdout.readline())["token"]
            for port in (up_port, nginx_port, nh_port):
                wait_port(port)
            script = workdir / "auth.lua"
            script.write_text(f'wrk.headers["Authorization"] = "Bearer {token}"\n')
            path = "/v1/items/123"
            cases = [
                ("direct", f"http://127.0.0.1:{up_port}{path}"),
                ("nginx", f"http://127.0.0.1:{nginx_port}{path}"),
                ("nhigate", f"http://127.0.0.1:{nh_port}{path}"),
            ]
            for name, url in cases:  # warm up: token cache, keep-alive pools
                run_wrk(name, url, 4, 1, script)
            watched = {
                "direct": with_children(processes[0].pid),
                "nginx": with_children(processes[1].pid),
                "nhigate": [nh.pid],
            }
            for conns in connections:
                for name, url in cases:
                    before = cpu_seconds(watched[name])
                    result = run_wrk(name, url, conns, args.duration, script)
                    used = cpu_seconds(watched[name]) - before
                    result.cpu_us = used * 1e6 / max(1.0, result.rps * args.duration)
                    results.append(result)
            audit_lines = sum(1 for _ in audit.open("rb")) if audit.exists() else 0
        finally:
            if os.environ.get("NHIGATE_BENCH_KEEP_AUDIT"):
                shutil.copy(audit, os.environ["NHIGATE_BENCH_KEEP_AUDIT"])
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
    report(results, audit_lines)
    return 0


def report(results: list[Result], audit_lines: int) -> None:
    print(
        f"{'case':<10}{'conns':>6}{'req/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'non2xx':>8}"
        f"{'cpu us/req':>12}{'req/s/core':>12}"
    )
    for r in results:
        per_core = 1e6 / r.cpu_us if r.cpu_us else 0.0
        print(
            f"{r.name:<10}{r.connections:>6}{r.rps:>11.0f}{r.p50_ms:>9.3f}{r.p99_ms:>9.3f}"
            f"{r.non2xx:>8}{r.cpu_us:>12.1f}{per_core:>12.0f}"
        )
    by = {(r.name, r.connections): r for r in results}
    for conns in sorted({r.connections for r in results}):
        direct, nginx, nh = (by[(n, conns)] for n in ("direct", "nginx", "nhigate"))
        print(
            f"c={conns}: nhigate/nginx req/s = {nh.rps / nginx.rps:.2f}, "
            f"added p50 nhigate {nh.p50_ms - direct.p50_ms:.3f} ms vs nginx "
            f"{nginx.p50_ms - direct.p50_ms:.3f} ms, added p99 nhigate "
            f"{nh.p99_ms - direct.p99_ms:.3f} ms vs nginx {nginx.p99_ms - direct.p99_ms:.3f} ms"
        )
    print(f"audit lines written by nhigate: {audit_lines}")


if __name__ == "__main__":
    sys.exit(main())
