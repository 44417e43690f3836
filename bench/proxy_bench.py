"""Proxy overhead in one run: direct upstream vs nginx vs HAProxy vs oauth2-proxy vs nhigate.

    .venv/bin/python bench/proxy_bench.py [--duration 4] [--repeat 1] [--grants 1000]
        [--connections 1,32] [--json results.json]

Loopback only, bounded (`duration` seconds per run, `repeat` runs per case, the
median kept). The upstream is an nginx returning a small fixed body; the proxy
under test is pinned to CPU 0, wrk and the upstream to CPU 1. Cases:

- `direct`: wrk straight at the upstream;
- `nginx`: an nginx reverse proxy (keep-alive upstream pool, one worker);
- `nhigate`: one nhigate process with a 1k-grant policy and a valid ES256 token
  (verified once, then served from the token cache); audit records serialised
  and written to /dev/null;
- `nhigate+audit`: the same with audit lines appended to a file and `/metrics`
  scraped every second;
- `haproxy+jwt`: HAProxy (Debian) verifying the same token with `jwt_verify` on every
  request, its claims and the same method/path/subject rule as ACLs (bench/peers.py);
- `oauth2-proxy`: oauth2-proxy (Go module, built once and cached) in JWT-bearer mode,
  with discovery + JWKS served by this process on 127.0.0.1;
- `python-floor`: bench/floor_proxy.py, the least a Python proxy on nhigate's stack (uvloop,
  asyncio protocols, httptools) does per request, checking nothing: the floor under nhigate.

Every proxy verifies the same ES256 token (one key, `iss` = the local issuer's URL), and
each one must refuse a forged token before it is measured. The HAProxy configuration and
the oauth2-proxy command line go into the JSON results (and so into report.md) verbatim.

Reported per case: req/s, p50/p99/p99.9 latency, the proxy's CPU (user + system,
from /proc) per request and the req/s one core would serve at that cost (robust on
a busy machine, unlike wall-clock req/s), the load average, and ratios to direct
and to nginx (added latency = case minus direct). Needs `nginx`, `wrk` and `haproxy` on
PATH (installed with apt-get when missing, as root), Go for oauth2-proxy and `taskset`
(util-linux).

`--instructions N` instead counts nhigate's user-space instructions per request over
N sequential requests under valgrind's callgrind: slow (minutes) but deterministic,
the number to compare two versions with on a machine other jobs keep busy. With
`--python-upstream` its upstream is a small Python keep-alive server in this process
(not counted) instead of nginx, for machines without nginx; compare counts only within
one kind of upstream.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import peers

ROOT = Path(__file__).resolve().parent.parent
PROXY_CPU = "0"
LOAD_CPU = "1"
ISSUER = "https://bench.issuer"
AUDIENCE = "bench-api"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now that this process has not handed out before: the kernel
    can give the same free port twice, and two servers started on it later leave the second
    unbound and its case measuring the first (a full run measured HAProxy's pid at 0 CPU)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


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
    p999_ms: float
    requests: int
    non2xx: int
    errors: int
    cpu_us: float = 0.0
    """CPU time (user + system) of the proxy process(es) per request: robust on a busy machine."""
    load: float = 0.0
    """1-minute load average when the case ran (2 means both cores busy)."""

    @property
    def rps_per_core(self) -> float:
        """Requests per second one core would serve at this CPU cost."""
        return 1e6 / self.cpu_us if self.cpu_us else 0.0


def user_system(pid: int) -> tuple[float, float]:
    """utime and stime of `pid`, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the given processes, in seconds."""
    return sum(sum(user_system(pid)) for pid in pids)


def with_children(pid: int) -> list[int]:
    """`pid` and its direct children (nginx master + worker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(int(c) for c in children)]


WRK_SCRIPT = """
wrk.headers["Authorization"] = "Bearer {token}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("NHIGATE %d %d %d %d %d %d %d %d\\n", summary.requests,
    summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""
"""wrk's `done` hook prints the counts and the latency percentiles (microseconds) on one line."""


def run_wrk(name: str, url: str, connections: int, duration: float, script: Path) -> Result:
    wrk = shutil.which("wrk") or "/usr/bin/wrk"
    cmd = ["taskset", "-c", LOAD_CPU, wrk, "-t1", f"-c{connections}", f"-d{duration:g}s"]
    cmd += ["-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=duration + 30)
    line = next(x for x in out.stdout.splitlines() if x.startswith("NHIGATE "))
    requests, micros, errors, non2xx, p50, p99, p999, _ = (int(v) for v in line.split()[1:])
    return Result(
        name,
        connections,
        rps=requests / (micros / 1e6),
        p50_ms=p50 / 1000,
        p99_ms=p99 / 1000,
        p999_ms=p999 / 1000,
        requests=requests,
        non2xx=non2xx,
        errors=errors,
    )


def measure(
    name: str, url: str, pids: list[int], connections: int, duration: float, script: Path
) -> Result:
    """One wrk run against `url`, with the CPU the proxy `pids` spent serving it."""
    before = cpu_seconds(pids)
    result = run_wrk(name, url, connections, duration, script)
    used = cpu_seconds(pids) - before
    result.cpu_us = used * 1e6 / max(1, result.requests)
    result.load = os.getloadavg()[0]
    return result


def median_result(runs: list[Result]) -> Result:
    """The run with the median CPU per request (a busy machine only ever adds CPU)."""
    ordered = sorted(runs, key=lambda r: r.cpu_us)
    return ordered[len(ordered) // 2]


def serve_nhigate(
    upstream_port: int,
    port: int,
    admin_port: int,
    grants: int,
    audit: str,
    shared: Path | None,
    http1_server: str = "aiohttp",
) -> None:
    """Child process: run nhigate with an in-memory 1k-grant policy (no API server needed).

    `shared` is the JSON of `shared_token()` (the issuer, its JWKS and the bench token the
    peers verify too); without it nhigate makes its own key and token.
    """
    sys.path.insert(0, str(ROOT / "tests" / "proxy"))
    from jwt_factory import claims_for, jwks_for, make_signing_key, sign  # type: ignore[import-not-found]

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

    subject = f"client-{grants // 2}"
    if shared is not None:
        given = json.loads(shared.read_text())
        issuer_url, jwks, token = given["issuer"], given["jwks"], given["token"]
    else:
        key = make_signing_key("ES256", kid="bench")
        issuer_url, jwks = ISSUER, jwks_for(key)
        token = sign(key, claims_for(ISSUER, AUDIENCE, subject, lifetime=3600))
    issuer = IssuerConfig(
        name="bench",
        issuer=issuer_url,
        audiences=(AUDIENCE,),
        algorithms=("ES256",),
        max_token_lifetime_seconds=7200,
        clock_skew_seconds=30,
        jwks=jwks,
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
    print(json.dumps({"token": token}), flush=True)
    settings = ProxySettings(
        upstream=Upstream("http", "127.0.0.1", upstream_port),
        listen_port=port,
        admin_port=admin_port,
        audit_log=audit,
        http1_server=http1_server,  # type: ignore[arg-type]
    )
    holder = PolicyHolder()
    holder.swap(policy)
    server.run(settings, holder=holder)


def start_nhigate(
    up_port: int,
    port: int,
    admin: int,
    grants: int,
    audit: str,
    wrapper: tuple[str, ...] = (),
    shared: Path | None = None,
    http1_server: str = "aiohttp",
    script: Path = Path(__file__),
) -> tuple[subprocess.Popen[str], str]:
    """An nhigate child process pinned to the proxy CPU; returns it and its valid token.
    `script`: the proxy_bench.py whose `serve_nhigate` runs (another checkout's)."""
    serve = [str(up_port), str(port), str(admin), audit]
    return spawn_with_token(
        [
            *("taskset", "-c", PROXY_CPU, *wrapper, sys.executable, str(script)),
            *("--grants", str(grants), "--serve-nhigate", *serve),
            *(("--shared-token", str(shared)) if shared is not None else ()),
            *("--http1-server", http1_server),
        ]
    )


def spawn_with_token(command: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Start a `serve_nhigate` child; returns it and the token from its first output line."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert process.stdout is not None
    token = str(json.loads(process.stdout.readline())["token"])
    return process, token


FLOOR = "python-floor"
"""The case of bench/floor_proxy.py: what a Python proxy on nhigate's stack costs per request
before it authenticates, authorises or audits anything."""


def start_floor(
    up_port: int, port: int, wrapper: tuple[str, ...] = (), tasks: bool = False
) -> subprocess.Popen[bytes]:
    """bench/floor_proxy.py pinned to the proxy CPU (`tasks`: its `--tasks` shape)."""
    return subprocess.Popen(
        [
            *("taskset", "-c", PROXY_CPU, *wrapper, sys.executable),
            str(Path(__file__).parent / "floor_proxy.py"),
            *("--port", str(port), "--upstream-port", str(up_port)),
            *(("--tasks",) if tasks else ()),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class MetricsScraper:
    """Scrapes nhigate's `/metrics` once a second while a case runs (as Prometheus would)."""

    def __init__(self, admin_port: int) -> None:
        self._url = f"http://127.0.0.1:{admin_port}/metrics"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.scrapes = 0

    def __enter__(self) -> MetricsScraper:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            with urllib.request.urlopen(self._url, timeout=5) as resp:
                resp.read()
            self.scrapes += 1


def sequential_requests(port: int, token: str, count: int) -> int:
    """Send `count` GETs one after another on one keep-alive connection; returns non-200s."""
    request = (
        f"GET /v1/items/123 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()
    failed = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        for _ in range(count):
            sock.sendall(request)
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("proxy closed the connection")
                data += chunk
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep:
                    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                    if len(body) >= (int(length.group(1)) if length else 0):
                        break
            failed += not data.startswith(b"HTTP/1.1 200")
    return failed


class PythonUpstream:
    """A keep-alive HTTP/1.1 upstream answering `{"ok":true}`, on a thread of this process."""

    def __enter__(self) -> PythonUpstream:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Answer(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = b'{"ok":true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def callgrind_wrapper(workdir: Path) -> tuple[str, ...]:
    """The command prefix that runs a process under callgrind, its dumps in `workdir`."""
    workdir.mkdir(exist_ok=True)
    # String hashing is seeded per process: fix the seed, or counts differ run to run by ~0.3%.
    os.environ.setdefault("PYTHONHASHSEED", "0")
    return ("valgrind", "--tool=callgrind", f"--callgrind-out-file={workdir}/callgrind.out.%p")


def counted_requests(
    workdir: Path, process: subprocess.Popen[Any], port: int, token: str, count: int
) -> tuple[float, int]:
    """Instructions per request of `process` (under `callgrind_wrapper`) over `count`
    sequential requests after 50 warm-ups, and the non-200 answers; stops the process."""
    try:
        wait_port(port, timeout=600)
        sequential_requests(port, token, 50)
        control = shutil.which("callgrind_control") or "callgrind_control"
        subprocess.run([control, "-z", str(process.pid)], check=True, capture_output=True)
        failed = sequential_requests(port, token, count)
        subprocess.run([control, "-d", str(process.pid)], check=True, capture_output=True)
    finally:
        process.terminate()
        process.wait(timeout=60)
    dump = next(workdir.glob("callgrind.out.*.1"))
    totals = re.search(r"^totals:\s+(\d+)", dump.read_text(), re.M)
    assert totals is not None
    return int(totals.group(1)) / count, failed


def count_instructions(
    workdir: Path, up_port: int, grants: int, count: int, http1_server: str = "aiohttp"
) -> dict[str, Any]:
    """User-space instructions per proxied request of nhigate, under valgrind's callgrind.

    Deterministic (it does not move with the machine's load, unlike time): the proxy
    runs under callgrind, serves 50 warm-up requests, its counters are zeroed, then
    `count` sequential requests on one connection are counted. Kernel work (socket
    syscalls) is not included. Needs `valgrind` (Debian: apt-get install -y valgrind).
    """
    wrapper = callgrind_wrapper(workdir)
    port, admin = free_port(), free_port()
    process, token = start_nhigate(
        up_port, port, admin, grants, os.devnull, wrapper, http1_server=http1_server
    )
    per_request, failed = counted_requests(workdir, process, port, token, count)
    print(
        f"nhigate ({http1_server} HTTP/1.1 front end) user-space instructions per request "
        f"(callgrind, {count} requests): {per_request:,.0f}; non-200: {failed}"
    )
    return {
        "instructions_per_request": per_request,
        "requests": count,
        "non200": failed,
        "http1_server": http1_server,
    }


def count_floor_instructions(
    workdir: Path, up_port: int, count: int, tasks: bool
) -> dict[str, Any]:
    """`count_instructions` of bench/floor_proxy.py (the same requests; it checks no token)."""
    port = free_port()
    process = start_floor(up_port, port, callgrind_wrapper(workdir), tasks)
    per_request, failed = counted_requests(workdir, process, port, "none", count)
    label = FLOOR + (" --tasks" if tasks else "")
    print(f"{label} user-space instructions per request: {per_request:,.0f}; non-200: {failed}")
    return {
        "instructions_per_request": per_request,
        "requests": count,
        "non200": failed,
        "proxy": label,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per run")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (median kept)")
    parser.add_argument("--grants", type=int, default=1000)
    parser.add_argument("--connections", default="1,32")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument(
        "--instructions",
        type=int,
        metavar="N",
        help="instead: count nhigate's instructions per request over N requests (callgrind)",
    )
    parser.add_argument(
        "--python-upstream",
        action="store_true",
        help="with --instructions: a Python upstream in this process instead of nginx",
    )
    parser.add_argument(
        "--http1-server",
        choices=("aiohttp", "native", "both"),
        default="aiohttp",
        help="nhigate's HTTP/1.1 front end (--http1-server); both: a `nhigate-native` case "
        "beside `nhigate` (throughput runs only)",
    )
    parser.add_argument(
        "--no-oauth2-proxy",
        action="store_true",
        help="leave oauth2-proxy out (it is built from the Go module proxy on first use)",
    )
    parser.add_argument("--serve-nhigate", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--shared-token", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_nhigate:
        up, port, admin, audit = args.serve_nhigate
        serve_nhigate(
            int(up), int(port), int(admin), args.grants, audit, args.shared_token, args.http1_server
        )
        return 0
    if args.instructions and args.python_upstream and args.http1_server == "both":
        parser.error("--python-upstream counts one front end: --http1-server aiohttp or native")
    if args.instructions and args.python_upstream:
        with tempfile.TemporaryDirectory(prefix="nhigate-bench-") as tmp, PythonUpstream() as up:
            counted = count_instructions(
                Path(tmp), up.port, args.grants, args.instructions, args.http1_server
            )
        if args.json is not None:
            args.json.write_text(json.dumps({"benchmark": "proxy", **counted}, indent=2) + "\n")
        return 0
    if args.instructions:
        peers.ensure_packages({"nginx": "nginx", "valgrind": "valgrind"})
        with tempfile.TemporaryDirectory(prefix="nhigate-bench-") as tmp:
            up_port = free_port()
            upstream = start_nginx(
                Path(tmp), "upstream", UPSTREAM_BODY.format(port=up_port), LOAD_CPU
            )
            try:
                wait_port(up_port)
                fronts = (
                    ("aiohttp", "native") if args.http1_server == "both" else (args.http1_server,)
                )
                each = [
                    count_instructions(Path(tmp) / f, up_port, args.grants, args.instructions, f)
                    for f in fronts
                ]
                if args.http1_server == "both":  # what the stack costs before nhigate's work
                    each += [
                        count_floor_instructions(
                            Path(tmp) / f"floor-{tasks}", up_port, args.instructions, tasks
                        )
                        for tasks in (False, True)
                    ]
                counted = (
                    each[0]
                    if len(each) == 1
                    else {"requests": args.instructions, "front_ends": each}
                )
            finally:
                upstream.terminate()
                upstream.wait(timeout=10)
        if args.json is not None:
            args.json.write_text(json.dumps({"benchmark": "proxy", **counted}, indent=2) + "\n")
        return 0
    peers.ensure_packages()
    connections = [int(c) for c in args.connections.split(",")]
    oauth2_proxy = None if args.no_oauth2_proxy else peers.oauth2_proxy_binary()
    processes: list[subprocess.Popen[Any]] = []
    results: list[Result] = []
    audit_lines = 0
    scrapes = 0
    key = bench_key()
    with (
        tempfile.TemporaryDirectory(prefix="nhigate-bench-") as tmp,
        peers.OidcIssuer(jwks_of(key)) as oidc,
    ):
        workdir = Path(tmp)
        audit = workdir / "audit.jsonl"
        token = shared_token(key, oidc.issuer, f"client-{args.grants // 2}")
        shared = workdir / "shared-token.json"
        shared.write_text(json.dumps({"issuer": oidc.issuer, "jwks": jwks_of(key), "token": token}))
        pem = workdir / "issuer.pem"
        pem.write_bytes(key.public_pem())
        try:
            up_port, nginx_port, nh_port, nh_admin, nha_port, nha_admin, ha_port, o2_port = (
                free_port() for _ in range(8)
            )
            processes.append(
                start_nginx(workdir, "upstream", UPSTREAM_BODY.format(port=up_port), LOAD_CPU)
            )
            body = PROXY_BODY.format(port=nginx_port, upstream=up_port)
            processes.append(start_nginx(workdir, "proxy", body, PROXY_CPU))
            # "nhigate": audit records serialised and written to /dev/null, metrics never scraped.
            front = "aiohttp" if args.http1_server == "both" else args.http1_server
            nh, _ = start_nhigate(
                up_port, nh_port, nh_admin, args.grants, os.devnull, (), shared, front
            )
            processes.append(nh)
            # "nhigate+audit": audit lines appended to a file, /metrics scraped every second.
            nha, _ = start_nhigate(
                up_port, nha_port, nha_admin, args.grants, str(audit), (), shared, front
            )
            processes.append(nha)
            native: subprocess.Popen[str] | None = None
            nhn_port = free_port()
            if args.http1_server == "both":  # the same as "nhigate", on the native front end
                native, _ = start_nhigate(
                    up_port, nhn_port, free_port(), args.grants, os.devnull, (), shared, "native"
                )
                processes.append(native)
            floor_port = free_port()
            floor = start_floor(up_port, floor_port)
            processes.append(floor)
            haproxy_config = peers.haproxy_config(
                port=ha_port,
                upstream=up_port,
                pem=pem,
                issuer=oidc.issuer,
                audience=AUDIENCE,
                subject=f"client-{args.grants // 2}",
            )
            haproxy = peers.start_haproxy(workdir, haproxy_config, PROXY_CPU)
            processes.append(haproxy)
            o2_args = peers.oauth2_proxy_args(
                port=o2_port, upstream=up_port, issuer=oidc.issuer, audience=AUDIENCE
            )
            o2: subprocess.Popen[Any] | None = None
            if oauth2_proxy is not None:
                o2 = peers.start_oauth2_proxy(oauth2_proxy, o2_args, PROXY_CPU)
                processes.append(o2)
                wait_port(o2_port)
            for port in (up_port, nginx_port, nh_port, nha_port, ha_port, floor_port):
                wait_port(port)
            if native is not None:
                wait_port(nhn_port)
            script = workdir / "auth.lua"
            script.write_text(WRK_SCRIPT.format(token=token))
            path = "/v1/items/123"
            cases = [
                ("direct", up_port),
                ("nginx", nginx_port),
                ("haproxy+jwt", ha_port),
                *((("oauth2-proxy", o2_port),) if o2 is not None else ()),
                ("nhigate", nh_port),
                ("nhigate+audit", nha_port),
            ]
            if native is not None:
                cases.append(("nhigate-native", nhn_port))
            for process in processes:  # a server that could not bind its port has exited
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args!r} exited ({process.returncode}) early")
            for name, port in cases[2:]:  # each authenticating proxy must refuse a forged token
                require_refusal(name, port, path, forged(token))
            cases.append((FLOOR, floor_port))  # authenticates nothing: no refusal to check
            for name, port in cases:  # warm up: token cache, keep-alive pools
                run_wrk(name, f"http://127.0.0.1:{port}{path}", 4, 1, script)
            watched = {
                "direct": with_children(processes[0].pid),
                "nginx": with_children(processes[1].pid),
                "haproxy+jwt": [haproxy.pid],
                "oauth2-proxy": [o2.pid] if o2 is not None else [],
                "nhigate": [nh.pid],
                "nhigate+audit": [nha.pid],
                FLOOR: [floor.pid],
            }
            if native is not None:
                watched["nhigate-native"] = [native.pid]
            scraper = MetricsScraper(nha_admin)
            for conns in connections:
                # Round-robin: each repeat runs every case once, so a burst of other work on
                # the machine lands on one run of several cases, not on all runs of one.
                runs: dict[str, list[Result]] = {name: [] for name, _ in cases}
                for _ in range(args.repeat):
                    for name, port in cases:
                        url = f"http://127.0.0.1:{port}{path}"
                        with scraper if name == "nhigate+audit" else contextlib.nullcontext():
                            runs[name].append(
                                measure(name, url, watched[name], conns, args.duration, script)
                            )
                results.extend(median_result(runs[name]) for name, _ in cases)
            scrapes = scraper.scrapes
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
            if audit.exists():
                audit_lines = sum(1 for _ in audit.open("rb"))
                if os.environ.get("NHIGATE_BENCH_KEEP_AUDIT"):
                    shutil.copy(audit, os.environ["NHIGATE_BENCH_KEEP_AUDIT"])
    summary = report(results, audit_lines, scrapes)
    summary["peers"] = {
        "haproxy+jwt": {"version": peers.haproxy_version(), "config": haproxy_config},
        "oauth2-proxy": {
            "version": peers.oauth2_proxy_version(oauth2_proxy) if oauth2_proxy else "not run",
            "module": f"{peers.OAUTH2_PROXY_MODULE}@{peers.OAUTH2_PROXY_VERSION}",
            "command": ["oauth2-proxy", *o2_args],
            "env": {"GOMAXPROCS": "1"},
        },
    }
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def bench_key() -> Any:
    """The ES256 signing key of the bench issuer (tests/proxy/jwt_factory.py's TestKey)."""
    sys.path.insert(0, str(ROOT / "tests" / "proxy"))
    from jwt_factory import make_signing_key

    return make_signing_key("ES256", kid="bench")


def jwks_of(key: Any) -> dict[str, Any]:
    return {"keys": [dict(key.public_jwk)]}


def shared_token(key: Any, issuer: str, subject: str) -> str:
    """The one valid token every proxy verifies: ES256, `iss` = the local issuer, 1 h."""
    from jwt_factory import claims_for, sign

    return str(sign(key, claims_for(issuer, AUDIENCE, subject, lifetime=3600)))


def forged(token: str) -> str:
    """`token` with its signature's last bytes changed: the same claims, not signed by the key."""
    head, payload, signature = token.split(".")
    return f"{head}.{payload}.{signature[:-4]}{'AAAA' if signature[-4:] != 'AAAA' else 'BBBB'}"


def require_refusal(name: str, port: int, path: str, token: str) -> None:
    """Fail the bench if the proxy `name` forwards a request with a forged token."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        status_line = sock.recv(65536).split(b"\r\n", 1)[0].decode(errors="replace")
    if status_line.split()[1:2] not in (["401"], ["403"]):
        raise RuntimeError(f"{name} did not refuse a forged token: {status_line!r}")


def ratios(results: list[Result]) -> list[dict[str, Any]]:
    """Per connection count: each proxy against direct and against nginx."""
    by = {(r.name, r.connections): r for r in results}
    out: list[dict[str, Any]] = []
    for conns in sorted({r.connections for r in results}):
        direct, nginx = by[("direct", conns)], by[("nginx", conns)]
        for name in dict.fromkeys(r.name for r in results if r.name != "direct"):
            r = by[(name, conns)]
            out.append(
                {
                    "case": name,
                    "connections": conns,
                    "rps_vs_direct": r.rps / direct.rps,
                    "rps_vs_nginx": r.rps / nginx.rps,
                    "rps_per_core_vs_nginx": r.rps_per_core / nginx.rps_per_core,
                    "cpu_vs_nginx": r.cpu_us / nginx.cpu_us,
                    "added_p50_ms": r.p50_ms - direct.p50_ms,
                    "added_p99_ms": r.p99_ms - direct.p99_ms,
                    "added_p999_ms": r.p999_ms - direct.p999_ms,
                    "added_p99_vs_nginx": (r.p99_ms - direct.p99_ms)
                    / max(1e-3, nginx.p99_ms - direct.p99_ms),
                }
            )
    return out


def report(results: list[Result], audit_lines: int, scrapes: int) -> dict[str, Any]:
    """Print the table and the ratios; return everything as a JSON-ready dict."""
    print(
        f"{'case':<15}{'conns':>6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}"
        f"{'non2xx':>8}{'cpu us/req':>12}{'req/s/core':>12}{'load':>6}"
    )
    for r in results:
        print(
            f"{r.name:<15}{r.connections:>6}{r.rps:>9.0f}{r.p50_ms:>9.3f}{r.p99_ms:>9.3f}"
            f"{r.p999_ms:>10.3f}{r.non2xx + r.errors:>8}{r.cpu_us:>12.1f}"
            f"{r.rps_per_core:>12.0f}{r.load:>6.1f}"
        )
    rows = ratios(results)
    for row in rows:
        print(
            f"c={row['connections']:<3} {row['case']:<14} req/s x{row['rps_vs_direct']:.2f} direct"
            f" x{row['rps_vs_nginx']:.2f} nginx; req/s/core x{row['rps_per_core_vs_nginx']:.2f}"
            f" nginx; added p50 {row['added_p50_ms']:.3f} ms, p99 {row['added_p99_ms']:.3f} ms,"
            f" p99.9 {row['added_p999_ms']:.3f} ms"
        )
    print(f"audit lines written by nhigate+audit: {audit_lines}; metrics scrapes: {scrapes}")
    return {
        "benchmark": "proxy",
        "cpus": {"proxy": PROXY_CPU, "load_and_upstream": LOAD_CPU},
        "results": [{**asdict(r), "rps_per_core": r.rps_per_core} for r in results],
        "ratios": rows,
        "audit_lines": audit_lines,
        "metrics_scrapes": scrapes,
    }


if __name__ == "__main__":
    sys.exit(main())
