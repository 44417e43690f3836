"""The API server stops for 25 s and returns (SIGSTOP/SIGCONT of kube-apiserver).

A controller process and a `nhigate proxy --kube` process run against the session's real
control plane. While kube-apiserver is frozen (its sockets stay open, nothing answers):

- the proxy keeps serving its last policy: allowed stays allowed, denied stays denied (an
  ungranted method, an unknown subject, a revoked token), and it stays ready;
- a grant whose `expiresAt` passes during the outage is denied on the proxy's own clock
  (the controller cannot publish a new policy then), with audit reason `grant_expired`.

After SIGCONT: the controller converges (the expired grant's status says Expired and it
leaves the compiled policy; deleting a grant denies it at the proxy within seconds; the
remaining grant is Enforced 1/1), and the proxy's Lease is renewed. The API server is always
continued in a `finally`, so a failure never leaves the session's control plane frozen.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cluster import ControlPlane
from controller_harness import (
    JSON,
    ControllerProcess,
    ProxyProcess,
    apply_all,
    backend_service,
    condition,
    eventually,
    free_port,
    protected_service,
    route_grant,
)
from nhigate.k8s import CONFIGMAPS, LEASES, NAMESPACES, ROUTEGRANTS, KubeClient
from nhigate.policy import unpack_document

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

OUTAGE_S = 25.0
EXPIRES_INTO_OUTAGE_S = 10
"""The expiring grant's `expiresAt` is about this far into the outage."""
SETUP_SLACK_S = 5
"""Seconds allowed between creating the expiring grant and stopping the API server."""
POLL_INTERVAL_S = 0.5
AUDIENCE = "nhigate"
ISSUER_URL = "https://ci.example"
KID = "faults"
POLICY_CONFIGMAP = "nhigate-api-policy"
REPLICA = "faults-0"
LEASE = f"nhigate-api-{REPLICA}"
LEAKED_JTI = "leaked-deployer-token"


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def jwks_of(key: ec.EllipticCurvePrivateKey) -> JSON:
    numbers = key.public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

    x, y = b64(numbers.x), b64(numbers.y)
    return {"keys": [{"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": KID, "alg": "ES256"}]}


def token_for(key: ec.EllipticCurvePrivateKey, subject: str, jti: str | None = None) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER_URL, "aud": AUDIENCE, "sub": subject, "iat": now, "exp": now + 900}
    if jti is not None:
        claims["jti"] = jti
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": KID})


def process_state(pid: int) -> str:
    """The one-letter state in /proc/PID/stat (R, S, T for stopped, ...)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def apiserver_pid(cp: ControlPlane) -> int:
    """The kube-apiserver's pid among the control plane's, checked by its command name."""
    for pid in cp.pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "kube-apiserver":
                return pid
    raise AssertionError(f"no kube-apiserver among the control plane's pids {cp.pids}")


@contextlib.contextmanager
def api_server_frozen(pid: int) -> Iterator[None]:
    """SIGSTOP kube-apiserver for the block; SIGCONT it however the block ends."""
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 5
        while process_state(pid) != "T":
            assert time.monotonic() < deadline, "kube-apiserver did not stop"
            time.sleep(0.01)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture
def frozen_safely(control_plane: ControlPlane) -> Iterator[int]:
    """The kube-apiserver pid; continued again at teardown whatever happened (idempotent)."""
    pid = apiserver_pid(control_plane)
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@dataclass
class Caller:
    """Calls the proxy as one token subject; remembers every (status, request id)."""

    http: aiohttp.ClientSession
    base: str
    token: str
    seen: list[tuple[float, int, str]] = field(default_factory=list)

    async def call(self, method: str = "GET", path: str = "/v1/items/1") -> int:
        headers = {"Authorization": f"Bearer {self.token}"}
        timeout = aiohttp.ClientTimeout(total=5)
        async with self.http.request(
            method, self.base + path, headers=headers, timeout=timeout
        ) as resp:
            body = json.loads(await resp.read())
            self.seen.append((time.time(), resp.status, str(body["request_id"])))
            return resp.status


async def test_api_server_outage(
    control_plane: ControlPlane,
    controller: ControllerProcess,
    kube: KubeClient,
    namespace: str,
    upstream: int,
    frozen_safely: int,
    tmp_path: Path,
) -> None:
    ns = namespace
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = {
        "apiVersion": "nhigate.io/v1alpha1",
        "kind": "IdentityIssuer",
        "metadata": {"name": "ci", "namespace": ns},
        "spec": {"issuer": ISSUER_URL, "audiences": [AUDIENCE], "jwks": jwks_of(key)},
    }
    stays = route_grant(ns, "stays", subject="deployer")
    doomed = route_grant(ns, "doomed", subject="doomed")
    revocation = {
        "apiVersion": "nhigate.io/v1alpha1",
        "kind": "Revocation",
        "metadata": {"name": "leaked", "namespace": ns},
        "spec": {"tokenId": LEAKED_JTI, "reason": "a deployer token was leaked"},
    }
    await apply_all(
        kube, issuer, backend_service(ns), protected_service(ns), stays, doomed, revocation
    )
    await eventually(
        lambda: kube.get(CONFIGMAPS, POLICY_CONFIGMAP, ns),
        what="policy ConfigMap",
        controller=controller,
    )
    proxy = ProxyProcess(
        control_plane,
        ns,
        POLICY_CONFIGMAP,
        upstream=f"http://127.0.0.1:{upstream}",
        port=free_port(),
        admin_port=free_port(),
        work_dir=tmp_path,
        replica=REPLICA,
    )
    proxy.start()
    try:
        await _scenario(control_plane, controller, proxy, kube, ns, key, frozen_safely)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- proxy log\n{proxy.log_tail()}") from None
    finally:
        proxy.stop()
    assert controller.proc is not None
    assert controller.proc.poll() is None, f"controller exited\n{controller.log_tail()}"


async def _scenario(
    cp: ControlPlane,
    controller: ControllerProcess,
    proxy: ProxyProcess,
    kube: KubeClient,
    ns: str,
    key: ec.EllipticCurvePrivateKey,
    pid: int,
) -> None:
    base = f"http://127.0.0.1:{proxy.port}"
    async with aiohttp.ClientSession() as http:
        deployer = Caller(http, base, token_for(key, "deployer"))
        temp = Caller(http, base, token_for(key, "temp"))
        doomed = Caller(http, base, token_for(key, "doomed"))
        stranger = Caller(http, base, token_for(key, "stranger"))
        leaked = Caller(http, base, token_for(key, "deployer", jti=LEAKED_JTI))

        async def ready() -> bool:
            try:
                async with http.get(f"http://127.0.0.1:{proxy.admin_port}/readyz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        async def status_is(caller: Caller, wanted: int, method: str = "GET") -> bool:
            return await caller.call(method) == wanted

        await eventually(ready, within=60, what="proxy ready", controller=controller)
        await eventually(lambda: status_is(deployer, 200), within=20, what="deployer allowed")
        await eventually(lambda: status_is(doomed, 200), within=20, what="doomed allowed")
        assert await leaked.call("GET") == 403, "revoked token allowed before the outage"
        await eventually(
            lambda: _lease_renewed_after(kube, ns, 0), within=20, what="first Lease report"
        )

        await eventually(
            lambda: _grant_condition(kube, ns, "stays", "Enforced", "True"),
            within=20,
            what="grant stays Enforced before the outage",
            controller=controller,
        )

        # A grant that expires ~EXPIRES_INTO_OUTAGE_S into the outage (whole seconds: metav1.Time).
        expires_at = math.ceil(time.time()) + SETUP_SLACK_S + EXPIRES_INTO_OUTAGE_S
        expiring = route_grant(ns, "expiring", subject="temp", expiresAt=rfc3339(expires_at))
        await apply_all(kube, expiring)
        await eventually(lambda: status_is(temp, 200), within=5, what="temp allowed before expiry")

        stopped_at = time.time()
        assert expires_at - stopped_at >= 3, "setup was too slow: expiry would precede the outage"
        counts = {"polls": 0}
        with api_server_frozen(pid):
            assert await _api_unreachable(cp), "kube-apiserver still answers while stopped"
            while time.time() - stopped_at < OUTAGE_S:
                now = time.time()
                counts["polls"] += 1
                assert await deployer.call("GET") == 200, "allowed request denied during outage"
                assert await deployer.call("DELETE") == 403, "denied request allowed in outage"
                assert await stranger.call("GET") == 403, "stranger allowed during outage"
                assert await leaked.call("GET") == 403, "revoked token allowed during outage"
                assert await doomed.call("GET") == 200, "doomed grant lost during outage"
                got = await temp.call("GET")
                if now < expires_at - 0.5:
                    assert got == 200, f"expiring grant denied {expires_at - now:.1f}s early"
                elif now >= expires_at + 0.5:
                    assert got == 403, f"expired grant allowed {now - expires_at:.1f}s late"
                assert await ready(), "proxy became unready while the API server was away"
                await asyncio.sleep(POLL_INTERVAL_S)
            assert await _api_unreachable(cp), "kube-apiserver answered during the outage"
        resumed_at = time.time()

        await eventually(lambda: _api_answers(kube), within=30, what="API server back")
        back_at = time.time()
        await eventually(
            lambda: _lease_renewed_after(kube, ns, resumed_at),
            within=20,
            what="Lease renewed after the outage",
        )
        lease_at = time.time()
        expired = await eventually(
            lambda: _grant_condition(kube, ns, "expiring", "Active", "False"),
            within=40,
            what="expiring grant Active=False after the outage",
            controller=controller,
        )
        assert condition(expired, "Active")["reason"] == "Expired"
        await eventually(
            lambda: _policy_grants(kube, ns, {f"{ns}/stays", f"{ns}/doomed"}),
            within=20,
            what="expired grant dropped from the compiled policy",
            controller=controller,
        )
        converged_at = time.time()

        deleted_at = time.monotonic()
        await kube.delete(ROUTEGRANTS, "doomed", ns)
        await eventually(
            lambda: status_is(doomed, 403),
            within=5,
            interval=0.02,
            what="deleted grant denied after the outage",
            controller=controller,
        )
        revoke_s = time.monotonic() - deleted_at
        assert await deployer.call("GET") == 200
        assert await deployer.call("DELETE") == 403
        assert await leaked.call("GET") == 403
        enforced = await eventually(
            lambda: _policy_then_enforced(kube, ns),
            within=20,
            what="grant stays Enforced at the new policy",
            controller=controller,
        )
        assert enforced["status"]["enforcedReplicas"] == "1/1"

        await _check_expiry_audit(proxy, temp, expires_at)
        await _check_reasons(proxy, leaked, {"revoked"})
        await _check_reasons(proxy, stranger, {"no_matching_grant"})

    print(
        f"\noutage {resumed_at - stopped_at:.1f} s, {counts['polls']} polls x 7 requests; "
        f"API answering {back_at - resumed_at:.1f} s after SIGCONT; Lease renewed after "
        f"{lease_at - resumed_at:.1f} s; controller converged (Expired, policy) after "
        f"{converged_at - resumed_at:.1f} s; delete -> 403 in {revoke_s * 1000:.0f} ms"
    )


async def _check_expiry_audit(proxy: ProxyProcess, temp: Caller, expires_at: float) -> None:
    """Denials of the expired grant were decided on the proxy's clock: `grant_expired`."""
    late = {rid for at, status, rid in temp.seen if at >= expires_at + 0.5}
    assert late, "no request of the expiring grant after its expiry"

    async def audited() -> dict[str, JSON] | None:
        by_id = {r["request_id"]: r for r in proxy.audit_records()}
        return by_id if late <= by_id.keys() else None

    records = await eventually(audited, within=5, what="audit records of the expired grant")
    reasons = {records[rid]["reason"] for rid in late}
    # During the outage the proxy still held the grant: its own clock said expired. After the
    # controller dropped it from the policy, no grant matches at all.
    assert reasons <= {"grant_expired", "no_matching_grant"}, reasons
    assert "grant_expired" in reasons, reasons


async def _check_reasons(proxy: ProxyProcess, caller: Caller, wanted: set[str]) -> None:
    """Every request `caller` made was audited with one of the `wanted` reasons."""
    ids = {rid for _, _, rid in caller.seen}

    async def audited() -> dict[str, JSON] | None:
        by_id = {r["request_id"]: r for r in proxy.audit_records()}
        return by_id if ids <= by_id.keys() else None

    records = await eventually(audited, within=5, what="audit records")
    assert {records[rid]["reason"] for rid in ids} == wanted


async def _api_unreachable(cp: ControlPlane) -> bool:
    """True when a fresh client gets no answer from the API server within 2 s."""
    client = await KubeClient.connect(cp.kubeconfig)
    try:
        async with asyncio.timeout(2):
            await client.get(NAMESPACES, "default")
    except TimeoutError:
        return True
    finally:
        await client.close()
    return False


async def _api_answers(kube: KubeClient) -> bool:
    try:
        async with asyncio.timeout(5):
            return await kube.get(NAMESPACES, "default") is not None
    except TimeoutError:
        return False


async def _lease_renewed_after(kube: KubeClient, ns: str, after: float) -> JSON | None:
    lease = await kube.get(LEASES, LEASE, ns)
    renewed = ((lease or {}).get("spec") or {}).get("renewTime")
    return lease if renewed and parse_time(renewed) > after else None


async def _grant_condition(
    kube: KubeClient, ns: str, name: str, type_: str, status: str
) -> JSON | None:
    obj = await kube.get(ROUTEGRANTS, name, ns)
    return obj if condition(obj, type_).get("status") == status else None


async def _policy_grants(kube: KubeClient, ns: str, names: set[str]) -> bool:
    configmap = await kube.get(CONFIGMAPS, POLICY_CONFIGMAP, ns)
    if configmap is None:
        return False
    document = unpack_document(base64.b64decode(configmap["binaryData"]["policy.json.gz"]))
    return {g.name for g in document.grants} == names


async def _policy_then_enforced(kube: KubeClient, ns: str) -> JSON | None:
    """Grant `stays` Enforced, the compiled policy holding only it (doomed is gone) and the
    proxy's Lease reporting that policy's version."""
    if not await _policy_grants(kube, ns, {f"{ns}/stays"}):
        return None
    configmap, lease = (
        await kube.get(CONFIGMAPS, POLICY_CONFIGMAP, ns),
        await kube.get(LEASES, LEASE, ns),
    )
    version = ((configmap or {}).get("metadata") or {}).get("annotations", {})
    reported = ((lease or {}).get("metadata") or {}).get("annotations", {})
    key = "nhigate.io/policy-version"
    if not version.get(key) or version.get(key) != reported.get(key):
        return None
    return await _grant_condition(kube, ns, "stays", "Enforced", "True")
