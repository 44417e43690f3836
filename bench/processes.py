"""Helpers shared by the benches that run their own parts as child processes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal


def spawn(script: str, args: list[str], cpu: str | None) -> subprocess.Popen[str]:
    """Run `script` again with `args` (a serving role), pinned to `cpu` when taskset exists."""
    prefix = ["taskset", "-c", cpu] if cpu is not None and shutil.which("taskset") else []
    return subprocess.Popen(
        [*prefix, sys.executable, script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


async def wait_port(port: int, within: float = 15.0) -> None:
    """Return once 127.0.0.1:`port` accepts a connection; raise after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile of `values` (nearest rank); NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


BENCH_ISSUER = "https://bench.issuer"
BENCH_AUDIENCE = "bench-api"


def serve_granted_proxy(
    backend_port: int,
    port: int,
    rules: Mapping[str, tuple[Any, ...]],
    *,
    upstream_protocol: Literal["http1", "http2"] = "http1",
    **service_options: Any,
) -> None:
    """Serve nhigate on `port` in front of 127.0.0.1:`backend_port` until killed.

    One ES256 issuer; one grant `bench/<name>` per `rules` entry, all for subject `agent`;
    `service_options` go to `ServiceConfig` (e.g. `websocket_paths`, `mcp_endpoints`). Prints
    `{"token": ...}`, a token those grants authorise, before it serves. Needs tests/proxy on
    sys.path (jwt_factory)."""
    from jwt_factory import claims_for, jwks_for, make_signing_key, sign

    from nhigate.policy import (
        Grant,
        IssuerConfig,
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
        issuer=BENCH_ISSUER,
        audiences=(BENCH_AUDIENCE,),
        algorithms=("ES256",),
        max_token_lifetime_seconds=7200,
        clock_skew_seconds=30,
        jwks=jwks_for(key),
    )
    subject = (TokenSubject(issuer="bench", subject="agent"),)
    grants = tuple(Grant(f"bench/{name}", subject, tuple(r)) for name, r in rules.items())
    service = ServiceConfig("bench", "bench-api", "api", backend_port, **service_options)
    policy = compile_policy(make_document(service, (issuer,), grants, ()))
    token = sign(key, claims_for(BENCH_ISSUER, BENCH_AUDIENCE, "agent", lifetime=3600))
    print(json.dumps({"token": token}), flush=True)
    settings = ProxySettings(
        upstream=Upstream("http", "127.0.0.1", backend_port),
        listen_port=port,
        admin_port=free_port(),
        audit_log="/dev/null",
        upstream_protocol=upstream_protocol,
    )
    holder = PolicyHolder()
    holder.swap(policy)
    server.run(settings, holder=holder)
