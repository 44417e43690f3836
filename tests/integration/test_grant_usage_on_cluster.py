"""Grant usage and governance on a real kube-apiserver, with the real controller and a real
`nhigate proxy --kube` process reporting through its Lease.

- Requests allowed by the proxy appear in RouteGrant `status.usage` (lastUsed, counts, the
  rule's shapes); a grant nobody uses turns `Unused=True` after the (short) idle period.
- A restarted proxy carries its counts on: no request is lost or counted twice.
- Under steady traffic the controller writes a grant's status at a bounded rate.
- A ProtectedService's grantPolicy refuses grants that break it, naming the rule, keeps them
  out of the compiled policy, and re-judges them when it changes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
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
from nhigate.k8s import CONFIGMAPS, ROUTEGRANTS, KubeClient
from nhigate.policy import unpack_document

pytestmark = pytest.mark.cluster

AUDIENCE = "nhigate"
ISSUER_URL = "https://ci.example"
KID = "usage"
POLICY_CONFIGMAP = "nhigate-api-policy"
UNUSED_AFTER_S = 15
# Longer than a proxy's report can take to reach status under load (Lease renewal + sync):
# with 6 s a used grant was once already, correctly, idle when its first status was read.
WRITE_INTERVAL_S = 10


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _issuer(ns: str, key: ec.EllipticCurvePrivateKey) -> JSON:
    numbers = key.public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

    jwk = {"kty": "EC", "crv": "P-256", "x": b64(numbers.x), "y": b64(numbers.y), "kid": KID}
    return {
        "apiVersion": "nhigate.io/v1alpha1",
        "kind": "IdentityIssuer",
        "metadata": {"name": "ci", "namespace": ns},
        "spec": {"issuer": ISSUER_URL, "audiences": [AUDIENCE], "jwks": {"keys": [jwk]}},
    }


def _token(key: ec.EllipticCurvePrivateKey, subject: str) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER_URL, "aud": AUDIENCE, "sub": subject, "iat": now, "exp": now + 900}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": KID})


@pytest.fixture
def usage_controller(
    control_plane: ControlPlane, crds_installed: list[str], namespace: str, tmp_path: Path
) -> Iterator[ControllerProcess]:
    """The controller with a short idle period and usage write interval."""
    proc = ControllerProcess(
        control_plane,
        namespace,
        tmp_path / "controller.log",
        extra_args=[
            "--unused-after",
            str(UNUSED_AFTER_S),
            "--usage-write-interval",
            str(WRITE_INTERVAL_S),
        ],
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _grant(kube: KubeClient, ns: str, name: str) -> JSON | None:
    found: JSON | None = await kube.get(ROUTEGRANTS, name, ns)
    return found


async def _calls(
    http: aiohttp.ClientSession, base: str, token: str, paths: list[str], expect: int = 200
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    for path in paths:
        async with http.get(base + path, headers=headers) as resp:
            assert resp.status == expect, (path, resp.status, await resp.text())


def _proxy(cp: ControlPlane, ns: str, upstream: int, tmp_path: Path) -> ProxyProcess:
    return ProxyProcess(
        cp,
        ns,
        POLICY_CONFIGMAP,
        upstream=f"http://127.0.0.1:{upstream}",
        port=free_port(),
        admin_port=free_port(),
        work_dir=tmp_path,
        replica="usage-0",
    )


async def _ready(http: aiohttp.ClientSession, proxy: ProxyProcess) -> bool:
    try:
        async with http.get(f"http://127.0.0.1:{proxy.admin_port}/readyz") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def test_usage_reaches_status_survives_a_proxy_restart_and_idle_grants_turn_unused(
    control_plane: ControlPlane,
    usage_controller: ControllerProcess,
    kube: KubeClient,
    namespace: str,
    upstream: int,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    ns, ctl = namespace, usage_controller
    key = ec.generate_private_key(ec.SECP256R1())
    await apply_all(
        kube,
        _issuer(ns, key),
        backend_service(ns),
        protected_service(ns),
        route_grant(ns, "used", subject="deployer"),
        route_grant(ns, "idle", subject="nobody"),
    )
    await eventually(
        lambda: kube.get(CONFIGMAPS, POLICY_CONFIGMAP, ns), what="policy ConfigMap", controller=ctl
    )
    proxy = _proxy(control_plane, ns, upstream, tmp_path)
    proxy.start()
    try:
        base = f"http://127.0.0.1:{proxy.port}"
        token = _token(key, "deployer")
        await eventually(lambda: _ready(http, proxy), within=60, what="proxy ready")
        await _calls(http, base, token, [f"/v1/items/{i}" for i in range(5)])

        async def used_with(count: int) -> JSON | None:
            grant = await _grant(kube, ns, "used")
            usage = ((grant or {}).get("status") or {}).get("usage") or {}
            return grant if usage.get("requests") == count and usage.get("lastUsed") else None

        grant = await eventually(
            lambda: used_with(5), within=30, what="5 requests in status.usage", controller=ctl
        )
        usage = grant["status"]["usage"]
        assert usage["rules"][0]["requests"] == 5
        assert usage["rules"][0]["shapes"] == ["GET /v1/items/*"]
        assert usage["complete"] is True
        assert condition(grant, "Unused")["status"] == "False"
        assert condition(grant, "Unused")["reason"] == "Used"

        async def unused(name: str) -> JSON | None:
            found = await _grant(kube, ns, name)
            return found if condition(found, "Unused").get("status") == "True" else None

        idle = await eventually(
            lambda: unused("idle"), within=45, what="idle grant Unused", controller=ctl
        )
        assert condition(idle, "Unused")["reason"] == "Idle"
        assert "never used" in condition(idle, "Unused")["message"]

        # A restart of the proxy: counts carry on, neither lost nor doubled.
        first_last_used = usage["lastUsed"]
        proxy.stop()
        proxy.start()
        await eventually(lambda: _ready(http, proxy), within=60, what="proxy ready again")
        await _calls(http, base, token, ["/v1/items/a", "/v1/items/b"])
        grant = await eventually(
            lambda: used_with(7), within=30, what="7 requests after the restart", controller=ctl
        )
        assert grant["status"]["usage"]["lastUsed"] >= first_last_used
        assert grant["status"]["usage"]["rules"][0]["shapes"] == [
            "GET /v1/items/*",
            "GET /v1/items/a",
            "GET /v1/items/b",
        ]

        # Traffic stops: after the idle period the used grant is Unused too.
        used = await eventually(
            lambda: unused("used"), within=60, what="used grant idle", controller=ctl
        )
        assert condition(used, "Unused")["reason"] == "Idle"
        assert used["status"]["usage"]["requests"] == 7
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- proxy log\n{proxy.log_tail()}") from None
    finally:
        proxy.stop()


async def _status_writes(
    kube: KubeClient, ns: str, name: str, seconds: float, resource_version: str
) -> list[float]:
    """Times of the writes that changed the grant's `status.usage`, seen by a watch."""
    seen: list[float] = []

    async def watch() -> None:
        last = None
        async for event in kube.watch(
            ROUTEGRANTS,
            ns,
            resource_version=resource_version,
            field_selector=f"metadata.name={name}",
            timeout_seconds=int(seconds) + 5,
        ):
            status = event.object.get("status")
            if event.type == "MODIFIED" and (status or {}).get("usage") != (last or {}).get(
                "usage"
            ):
                seen.append(time.monotonic())
            last = status

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(watch(), timeout=seconds)
    return seen


async def test_status_writes_under_steady_traffic_are_rate_limited(
    control_plane: ControlPlane,
    usage_controller: ControllerProcess,
    kube: KubeClient,
    namespace: str,
    upstream: int,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    ns, ctl = namespace, usage_controller
    key = ec.generate_private_key(ec.SECP256R1())
    await apply_all(
        kube,
        _issuer(ns, key),
        backend_service(ns),
        protected_service(ns),
        route_grant(ns, "busy", subject="deployer"),
    )
    await eventually(
        lambda: kube.get(CONFIGMAPS, POLICY_CONFIGMAP, ns), what="policy ConfigMap", controller=ctl
    )
    proxy = _proxy(control_plane, ns, upstream, tmp_path)
    proxy.start()
    try:
        base = f"http://127.0.0.1:{proxy.port}"
        token = _token(key, "deployer")
        await eventually(lambda: _ready(http, proxy), within=60, what="proxy ready")
        await _calls(http, base, token, ["/v1/items/0"])

        async def first_use() -> JSON | None:
            grant = await _grant(kube, ns, "busy")
            usage = ((grant or {}).get("status") or {}).get("usage") or {}
            return grant if usage.get("lastUsed") else None

        grant = await eventually(first_use, within=30, what="first use", controller=ctl)
        window = 30.0
        stop = asyncio.Event()

        async def traffic() -> int:
            sent = 0
            while not stop.is_set():
                await _calls(http, base, token, [f"/v1/items/{sent}"])
                sent += 1
                await asyncio.sleep(0.05)
            return sent

        sender = asyncio.create_task(traffic())
        writes = await _status_writes(
            kube, ns, "busy", window, grant["metadata"]["resourceVersion"]
        )
        stop.set()
        sent = await sender
        per_minute = len(writes) * 60 / window
        print(f"steady traffic: {sent} requests in {window:.0f} s, {len(writes)} usage writes")
        # Lease renewals every 5 s would mean 6 writes in 30 s; the interval allows 3 (+1 edge).
        assert len(writes) <= window / WRITE_INTERVAL_S + 1, (writes, per_minute)
        assert sent > 100
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- proxy log\n{proxy.log_tail()}") from None
    finally:
        proxy.stop()


async def test_grant_policy_refuses_grants_names_the_rule_and_re_judges_on_change(
    usage_controller: ControllerProcess, kube: KubeClient, namespace: str
) -> None:
    ns, ctl = namespace, usage_controller
    key = ec.generate_private_key(ec.SECP256R1())
    now = time.time()
    policy = {"maxDuration": "1h", "requireReason": True}
    await apply_all(
        kube,
        _issuer(ns, key),
        backend_service(ns),
        protected_service(ns, grantPolicy=policy),
        route_grant(ns, "long", expiresAt=_rfc3339(now + 7200), reason="migration"),
        route_grant(ns, "no-reason", expiresAt=_rfc3339(now + 1800)),
        route_grant(ns, "good", expiresAt=_rfc3339(now + 1800), reason="deploys, OPS-14"),
    )

    async def refused(name: str, reason: str) -> JSON | None:
        grant = await _grant(kube, ns, name)
        accepted = condition(grant, "Accepted")
        return grant if accepted.get("reason") == reason else None

    long = await eventually(
        lambda: refused("long", "DurationTooLong"), what="long refused", controller=ctl
    )
    assert condition(long, "Accepted")["status"] == "False"
    assert "grantPolicy.maxDuration (1h)" in condition(long, "Accepted")["message"]
    no_reason = await eventually(
        lambda: refused("no-reason", "ReasonRequired"), what="no-reason refused", controller=ctl
    )
    assert "spec.reason" in condition(no_reason, "Accepted")["message"]
    await eventually(lambda: refused("good", "Accepted"), what="good accepted", controller=ctl)

    async def compiled(names: set[str]) -> bool:
        cm = await kube.get(CONFIGMAPS, POLICY_CONFIGMAP, ns)
        if cm is None:
            return False
        doc = unpack_document(base64.b64decode(cm["binaryData"]["policy.json.gz"]))
        return {g.name for g in doc.grants} == {f"{ns}/{n}" for n in names}

    await eventually(lambda: compiled({"good"}), what="only good compiled", controller=ctl)

    # The owner relaxes the policy: the refused grants are judged again and compiled.
    await apply_all(kube, protected_service(ns, grantPolicy={"maxDuration": "3h"}))
    await eventually(lambda: refused("long", "Accepted"), what="long accepted", controller=ctl)
    await eventually(
        lambda: compiled({"good", "long", "no-reason"}), what="all compiled", controller=ctl
    )


async def test_grant_policy_schema_refuses_a_bad_duration(
    crds_installed: list[str], kube: KubeClient, namespace: str
) -> None:
    from nhigate.k8s import KubeError

    with pytest.raises(KubeError) as refused:
        await apply_all(kube, protected_service(namespace, grantPolicy={"maxDuration": "0s"}))
    assert "must be longer than 0s" in str(refused.value)
