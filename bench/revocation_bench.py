"""Revocation latency on a real API server: API call returns -> the proxy first answers 403.

    .venv/bin/python bench/revocation_bench.py [--trials 50] [--json PATH]

Starts its own control plane (etcd + kube-apiserver + kube-controller-manager on 127.0.0.1,
built by hack/, via tests/cluster.py), installs the CRDs, and runs the controller
(`nhigate controller --namespace NS`), one proxy replica exactly as its Deployment runs it
(`nhigate proxy --kube ...`, watching its policy ConfigMap through the API and reporting a
Lease) and an aiohttp backend, all on 127.0.0.1. Four scenarios, `--trials` each:

- `delete-grant`: apply a RouteGrant, wait until the token is allowed, then DELETE the grant;
- `revoke-jti`: a fresh token (new `jti`) under a standing grant is allowed; then CREATE a
  Revocation `{tokenId: <jti>}`;
- `delete-serviceaccount`: (re)create ServiceAccount `bench-sa`, granted by a standing
  `serviceAccount` RouteGrant through an IdentityIssuer of the `kubernetes: {}` form; a token
  from the TokenRequest API (`kubectl create token`) is allowed; then DELETE the account
  (the proxy answers 401 `identity_retired`);
- `delete-pod`: a pod running as `bench-sa` (an object; no node runs it) and a token bound
  to it (`--bound-object-kind Pod`) is allowed; then DELETE the pod (401 `identity_retired`).

The clock starts when the API call returns and stops at the first 403 (401 for the last
two) from the proxy, which
is polled every `--poll-ms` (bounded at 10 s per trial; a trial that never sees 403 fails the
run). 200 ms of quiet precede each trial. The controller's CPU seconds and peak RSS are
recorded too. Everything is stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from cluster import (  # noqa: E402
    ControlPlane,
    build_binaries,
    crd_manifests,
    create_namespace,
    install_crds,
    start_control_plane,
    stop_control_plane,
)
from controller_harness import (  # noqa: E402
    ControllerProcess,
    backend_service,
    protected_service,
    route_grant,
)
from nhigate.k8s import (  # noqa: E402
    CONFIGMAPS,
    PODS,
    REVOCATIONS,
    ROUTEGRANTS,
    SERVICEACCOUNTS,
    KubeClient,
)

JSON = dict[str, Any]
API = "nhigate.io/v1alpha1"
ISSUER_URL = "https://ci.example"
AUDIENCE = "nhigate"
BENCH_ACCOUNT = "bench-sa"
POLICY_CONFIGMAP = "nhigate-api-policy"
TRIAL_TIMEOUT_S = 10.0


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Issuer:
    """An ES256 key standing in for a CI system's token issuer."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())

    def resource(self, namespace: str, name: str = "ci") -> JSON:
        """The IdentityIssuer with this key inline."""
        numbers = self.key.public_key().public_numbers()

        def b64(n: int) -> str:
            return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

        jwk = {"kty": "EC", "crv": "P-256", "x": b64(numbers.x), "y": b64(numbers.y), "kid": "b"}
        return {
            "apiVersion": API,
            "kind": "IdentityIssuer",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"issuer": ISSUER_URL, "audiences": [AUDIENCE], "jwks": {"keys": [jwk]}},
        }

    def token(self, subject: str, jti: str | None = None) -> str:
        """A 10-minute ES256 token for `subject` (with `jti` when given)."""
        now = int(time.time())
        claims: JSON = {"iss": ISSUER_URL, "aud": AUDIENCE, "sub": subject}
        claims.update(iat=now, exp=now + 600)
        if jti is not None:
            claims["jti"] = jti
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": "b"})


@contextlib.contextmanager
def control_plane(work: Path) -> Iterator[ControlPlane]:
    """A fresh control plane with the CRDs installed; stopped on exit."""
    cp = start_control_plane(work / "control-plane", build_binaries())
    try:
        install_crds(cp, crd_manifests())
        yield cp
    finally:
        stop_control_plane(cp)


def proc_usage(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) and peak RSS (VmHWM, MiB) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak = rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return {"cpu_s": cpu, "peak_rss_mib": peak, "rss_mib": rss}


def controller_pid(controller: ControllerProcess) -> int:
    """The controller's process id (it is started directly, not through a shell)."""
    assert controller.proc is not None
    return controller.proc.pid


@contextlib.asynccontextmanager
async def upstream() -> AsyncIterator[int]:
    """A backend answering 200 with the path on every request; yields its port."""

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


def start_proxy(
    cp: ControlPlane, ns: str, upstream_port: int, port: int, admin: int, log: Path
) -> subprocess.Popen[bytes]:
    """`nhigate proxy --kube ...` as the proxy Deployment runs it, with the admin kubeconfig."""
    cmd = [sys.executable, "-m", "nhigate.cli.main", "proxy", "--kube"]
    cmd += ["--kubeconfig", cp.kubeconfig, "--namespace", ns]
    cmd += ["--policy-configmap", POLICY_CONFIGMAP, "--replica-name", "bench-0"]
    cmd += ["--upstream", f"http://127.0.0.1:{upstream_port}"]
    cmd += ["--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"]
    cmd += ["--audit-log", os.devnull]
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=cp.env())


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 20 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def wait_for(what: str, probe: Any, within: float, interval: float = 0.05) -> Any:
    """Await `probe()` until truthy; RuntimeError after `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            value = await probe()
            if value:
                return value
        await asyncio.sleep(interval)
    raise RuntimeError(f"timed out after {within:.0f} s waiting for {what}")


class Stack:
    """Controller + one `--kube` proxy replica + backend in one namespace of a control plane."""

    def __init__(self, cp: ControlPlane, kube: KubeClient, work: Path) -> None:
        self.cp = cp
        self.kube = kube
        self.work = work
        self.namespace = create_namespace(cp, "bench")
        self.issuer = Issuer()
        self.controller = ControllerProcess(cp, self.namespace, work / "controller.log")
        self.proxy: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.admin = free_port()

    async def apply(self, *objects: JSON) -> None:
        """Server-side apply as the bench's field manager."""
        for obj in objects:
            await self.kube.apply(obj, field_manager="nhigate-bench")

    async def start(self, upstream_port: int) -> None:
        """Issuer, backend Service, ProtectedService `api`; controller; proxy ready."""
        ns = self.namespace
        discovery = json.loads(await self.kube.get_raw("/.well-known/openid-configuration"))
        cluster_issuer = {
            "apiVersion": API,
            "kind": "IdentityIssuer",
            "metadata": {"name": "cluster", "namespace": ns},
            "spec": {"issuer": discovery["issuer"], "kubernetes": {}, "audiences": [AUDIENCE]},
        }
        await self.apply(
            self.issuer.resource(ns),
            cluster_issuer,
            backend_service(ns),
            protected_service(ns, issuers=["ci", "cluster"]),
        )
        self.controller.start()
        try:
            await wait_for(
                "the policy ConfigMap",
                lambda: self.kube.get(CONFIGMAPS, POLICY_CONFIGMAP, ns),
                120,
                0.1,
            )
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.controller.log_tail()}") from None
        self.proxy = start_proxy(
            self.cp, ns, upstream_port, self.port, self.admin, self.work / "proxy.log"
        )

        async def ready() -> bool:
            url = f"http://127.0.0.1:{self.admin}/readyz"
            async with aiohttp.ClientSession() as http, http.get(url) as resp:
                return resp.status == 200

        await wait_for("the proxy to load its policy", ready, 120, 0.1)

    def stop(self) -> None:
        """Stop the proxy and the controller."""
        if self.proxy is not None:
            stop_process(self.proxy)
        self.controller.stop()


async def status_of(http: aiohttp.ClientSession, url: str, token: str) -> int:
    """Status of one GET through the proxy."""
    async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
        await resp.read()
        return int(resp.status)


async def first_status(
    http: aiohttp.ClientSession, url: str, token: str, want: int, poll_s: float, started: float
) -> float:
    """Poll until the proxy answers `want`; seconds since `started` (perf_counter)."""
    while True:
        if await status_of(http, url, token) == want:
            return time.perf_counter() - started
        if time.perf_counter() - started > TRIAL_TIMEOUT_S:
            raise RuntimeError(f"no {want} within {TRIAL_TIMEOUT_S:.0f} s")
        await asyncio.sleep(poll_s)


async def delete_grant_trials(
    stack: Stack, http: aiohttp.ClientSession, trials: int, poll_s: float
) -> list[float]:
    """Latency (s) from `DELETE routegrant` returning to the first 403."""
    url = f"http://127.0.0.1:{stack.port}/v1/items/42"
    token = stack.issuer.token("deleter")
    grant = route_grant(stack.namespace, "bench-delete", subject="deleter")
    out = []
    for _ in range(trials):
        await stack.apply(grant)
        await wait_for("allowed after grant", _is(http, url, token, 200), 30, 0.02)
        await asyncio.sleep(0.2)
        await stack.kube.delete(ROUTEGRANTS, "bench-delete", stack.namespace)
        returned = time.perf_counter()  # the clock starts when the API call returns
        out.append(await first_status(http, url, token, 403, poll_s, returned))
    return out


async def revoke_jti_trials(
    stack: Stack, http: aiohttp.ClientSession, trials: int, poll_s: float
) -> list[float]:
    """Latency (s) from `CREATE revocation {tokenId}` returning to the first 403."""
    url = f"http://127.0.0.1:{stack.port}/v1/items/42"
    ns = stack.namespace
    await stack.apply(route_grant(ns, "bench-revoke", subject="revoked"))
    out = []
    for i in range(trials):
        jti = uuid.uuid4().hex
        token = stack.issuer.token("revoked", jti=jti)
        await wait_for("allowed before revocation", _is(http, url, token, 200), 30, 0.02)
        await asyncio.sleep(0.2)
        revocation = {
            "apiVersion": API,
            "kind": "Revocation",
            "metadata": {"name": f"bench-jti-{i}", "namespace": ns},
            "spec": {"tokenId": jti, "reason": "revocation bench"},
        }
        await stack.kube.create(revocation)
        returned = time.perf_counter()
        out.append(await first_status(http, url, token, 403, poll_s, returned))
    for i in range(trials):
        with contextlib.suppress(Exception):
            await stack.kube.delete(REVOCATIONS, f"bench-jti-{i}", ns)
    return out


def create_token(stack: Stack, pod: str | None = None) -> str:
    """A TokenRequest token of `bench-sa` (bound to `pod` when given), 10 minutes."""
    args = ["create", "token", BENCH_ACCOUNT, "-n", stack.namespace, "--audience", AUDIENCE]
    args += ["--duration", "10m"]
    if pod is not None:
        args += ["--bound-object-kind", "Pod", "--bound-object-name", pod]
    return stack.cp.kubectl(*args).stdout.strip()


def bench_account(ns: str) -> JSON:
    """ServiceAccount `bench-sa`."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": BENCH_ACCOUNT, "namespace": ns},
    }


def bench_pod(ns: str, name: str) -> JSON:
    """A pod object running as `bench-sa` (no node runs it; its tokens can be bound to it)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "serviceAccountName": BENCH_ACCOUNT,
            "automountServiceAccountToken": False,
            "containers": [{"name": "client", "image": "client:bench"}],
        },
    }


async def account_grant(stack: Stack) -> None:
    """A standing RouteGrant for ServiceAccount `bench-sa`."""
    grant = route_grant(stack.namespace, "bench-account")
    grant["spec"]["subjects"] = [
        {"serviceAccount": {"namespace": stack.namespace, "name": BENCH_ACCOUNT}}
    ]
    await stack.apply(grant)


async def delete_account_trials(
    stack: Stack, http: aiohttp.ClientSession, trials: int, poll_s: float
) -> list[float]:
    """Latency (s) from `DELETE serviceaccount` returning to the first 401."""
    url = f"http://127.0.0.1:{stack.port}/v1/items/42"
    await account_grant(stack)
    out = []
    for _ in range(trials):
        await stack.apply(bench_account(stack.namespace))
        token = create_token(stack)
        await wait_for("allowed before deletion", _is(http, url, token, 200), 30, 0.02)
        await asyncio.sleep(0.2)
        await stack.kube.delete(SERVICEACCOUNTS, BENCH_ACCOUNT, stack.namespace)
        returned = time.perf_counter()
        out.append(await first_status(http, url, token, 401, poll_s, returned))
    return out


async def delete_pod_trials(
    stack: Stack, http: aiohttp.ClientSession, trials: int, poll_s: float
) -> list[float]:
    """Latency (s) from `DELETE pod` returning to the first 401 for a token bound to it."""
    url = f"http://127.0.0.1:{stack.port}/v1/items/42"
    ns = stack.namespace
    await account_grant(stack)
    await stack.apply(bench_account(ns))
    out = []
    for i in range(trials):
        name = f"bench-client-{i}"
        await stack.apply(bench_pod(ns, name))
        token = create_token(stack, pod=name)
        await wait_for("allowed before deletion", _is(http, url, token, 200), 30, 0.02)
        await asyncio.sleep(0.2)
        await stack.kube.delete(PODS, name, ns)
        returned = time.perf_counter()
        out.append(await first_status(http, url, token, 401, poll_s, returned))
    return out


def _is(http: aiohttp.ClientSession, url: str, token: str, want: int) -> Any:
    async def probe() -> bool:
        return await status_of(http, url, token) == want

    return probe


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..1)."""
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def summarise(latencies_s: list[float]) -> dict[str, Any]:
    """p50/p90/p99/max in ms plus every sample (ms, in trial order)."""
    ms = [x * 1000 for x in latencies_s]
    ordered = sorted(ms)
    return {
        "trials": len(ms),
        "p50_ms": statistics.median(ordered),
        "p90_ms": percentile(ordered, 0.90),
        "p99_ms": percentile(ordered, 0.99),
        "max_ms": ordered[-1],
        "samples_ms": [round(x, 2) for x in ms],
    }


async def run(cp: ControlPlane, work: Path, trials: int, poll_s: float) -> dict[str, Any]:
    """Both scenarios against one stack."""
    kube = await KubeClient.connect(cp.kubeconfig)
    stack = Stack(cp, kube, work)
    try:
        async with upstream() as up:
            await stack.start(up)
            connector = aiohttp.TCPConnector(limit=1, force_close=False)
            async with aiohttp.ClientSession(connector=connector) as http:
                deleted = await delete_grant_trials(stack, http, trials, poll_s)
                revoked = await revoke_jti_trials(stack, http, trials, poll_s)
                accounts = await delete_account_trials(stack, http, trials, poll_s)
                pods = await delete_pod_trials(stack, http, trials, poll_s)
            usage = proc_usage(controller_pid(stack.controller))
    except BaseException:
        print(stack.controller.log_tail(), file=sys.stderr)
        raise
    finally:
        stack.stop()
        await kube.close()
    return {
        "benchmark": "revocation",
        "poll_ms": poll_s * 1000,
        "delete_grant": summarise(deleted),
        "revoke_jti": summarise(revoked),
        "delete_serviceaccount": summarise(accounts),
        "delete_pod": summarise(pods),
        "controller": usage,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--trials", type=int, default=50, help="trials per scenario")
    parser.add_argument("--poll-ms", type=float, default=5.0, help="pause between probes")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nhigate-revocation-") as tmp:
        work = Path(tmp)
        with control_plane(work) as cp:
            result = asyncio.run(run(cp, work, args.trials, args.poll_ms / 1000))
    for name in ("delete_grant", "revoke_jti", "delete_serviceaccount", "delete_pod"):
        row = result[name]
        print(
            f"{name:<21} {row['trials']} trials: p50 {row['p50_ms']:.0f} ms, "
            f"p99 {row['p99_ms']:.0f} ms, max {row['max_ms']:.0f} ms"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
