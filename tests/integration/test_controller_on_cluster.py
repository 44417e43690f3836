"""The controller against a real kube-apiserver: owned objects, policy, status, deletion, restart.

Each test runs the real `nhigate controller` process scoped to a fresh namespace. There is no
kubelet: proxy Deployments never get running pods, so replica reports are written as Leases by
the tests exactly as a proxy replica would write them.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
from typing import Any

import pytest

from cluster import ControlPlane, KubectlError
from controller_harness import (
    ControllerProcess,
    apply_all,
    backend_pod,
    backend_service,
    condition,
    eventually,
    issuer,
    protected_service,
    route_grant,
)
from nhigate.k8s import (
    CONFIGMAPS,
    DEPLOYMENTS,
    EVENTS,
    IDENTITYISSUERS,
    INGRESSES,
    LEASES,
    NETWORKPOLICIES,
    PDBS,
    PROTECTEDSERVICES,
    ROLEBINDINGS,
    ROLES,
    ROUTEGRANTS,
    SECRETS,
    SERVICEACCOUNTS,
    SERVICES,
    KubeClient,
    ResourceRef,
)

pytestmark = pytest.mark.cluster

OWNED: list[tuple[ResourceRef, str]] = [
    (SERVICEACCOUNTS, "nhigate-api"),
    (ROLES, "nhigate-api"),
    (ROLEBINDINGS, "nhigate-api"),
    (DEPLOYMENTS, "nhigate-api"),
    (SERVICES, "nhigate-api"),
    (PDBS, "nhigate-api"),
    (CONFIGMAPS, "nhigate-api-policy"),
    (NETWORKPOLICIES, "nhigate-api-isolation"),
    (SECRETS, "nhigate-api-assertion-key"),
    (CONFIGMAPS, "nhigate-api-assertion-jwks"),
]


async def policy_of(kube: KubeClient, ns: str, ps: str = "api") -> dict[str, Any] | None:
    cm = await kube.get(CONFIGMAPS, f"nhigate-{ps}-policy", ns)
    if cm is None:
        return None
    doc: dict[str, Any] = json.loads(
        gzip.decompress(base64.b64decode(cm["binaryData"]["policy.json.gz"]))
    )
    doc["_annotation"] = cm["metadata"]["annotations"]["nhigate.io/policy-version"]
    return doc


def grant_names(doc: dict[str, Any]) -> list[str]:
    return sorted(g["name"] for g in doc["grants"])


async def setup_service(kube: KubeClient, ns: str, **ps_spec: Any) -> None:
    await apply_all(
        kube,
        issuer(ns),
        backend_service(ns),
        backend_pod(ns),
        protected_service(ns, identityAssertion={"enabled": True}, **ps_spec),
    )


def renew(ns: str, replica: str, version: str, duration: int = 15) -> dict[str, Any]:
    """The Lease a proxy replica writes (docs/architecture.md, data flow step 6 "Report")."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": f"nhigate-api-{replica}",
            "namespace": ns,
            "labels": {"nhigate.io/protected-service": "api"},
            "annotations": {"nhigate.io/policy-version": version},
        },
        "spec": {"holderIdentity": replica, "leaseDurationSeconds": duration, "renewTime": now},
    }


async def test_reconcile_creates_owned_objects_and_recompiles_on_grant_change(
    controller: ControllerProcess, kube: KubeClient, namespace: str
) -> None:
    ns = namespace
    await setup_service(kube, ns)
    await apply_all(kube, route_grant(ns, "deploy"))

    doc = await eventually(
        lambda: _policy_with(kube, ns, ["deploy"]),
        what="policy with the grant",
        controller=controller,
    )
    ps = await kube.get(PROTECTEDSERVICES, "api", ns)
    assert ps is not None
    uid = ps["metadata"]["uid"]
    for ref, name in OWNED:
        obj = await eventually(lambda r=ref, n=name: kube.get(r, n, ns), what=f"{ref.kind} {name}")
        owners = obj["metadata"].get("ownerReferences") or []
        assert [(o["uid"], o.get("controller")) for o in owners] == [(uid, True)], (ref.kind, name)
        labels = obj["metadata"]["labels"]
        assert labels["nhigate.io/protected-service"] == "api"
        managers = {f["manager"] for f in obj["metadata"].get("managedFields") or []}
        assert "nhigate" in managers, (ref.kind, name, managers)

    deployment = await kube.get(DEPLOYMENTS, "nhigate-api", ns)
    assert deployment is not None
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--policy-configmap") + 1] == "nhigate-api-policy"
    assert args[args.index("--upstream") + 1] == f"http://backend.{ns}.svc:80"
    assert container["securityContext"]["runAsNonRoot"] is True
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    netpol = await kube.get(NETWORKPOLICIES, "nhigate-api-isolation", ns)
    assert netpol is not None
    assert netpol["spec"]["podSelector"] == {"matchLabels": {"app": "backend"}}
    assert netpol["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 8080}]
    peers = netpol["spec"]["ingress"][0]["from"]
    assert peers[0]["podSelector"]["matchLabels"]["nhigate.io/protected-service"] == "api"

    role = await kube.get(ROLES, "nhigate-api", ns)
    assert role is not None
    cm_rule = next(r for r in role["rules"] if "configmaps" in r["resources"])
    assert cm_rule["resourceNames"] == ["nhigate-api-policy"]
    assert set(cm_rule["verbs"]) == {"get", "list", "watch"}

    # status: accepted, active, not enforced (no replica has reported anything)
    grant = await eventually(
        lambda: _with_condition(kube, ROUTEGRANTS, "deploy", ns, "Accepted", "True"),
        what="grant Accepted",
        controller=controller,
    )
    assert condition(grant, "Active")["status"] == "True"
    enforced = await eventually(
        lambda: _with_condition(kube, ROUTEGRANTS, "deploy", ns, "Enforced", "False"),
        what="grant Enforced status",
        controller=controller,
    )
    assert condition(enforced, "Enforced")["reason"] == "NoReplicas"
    ps = await eventually(
        lambda: _with_condition(kube, PROTECTEDSERVICES, "api", ns, "PolicyEnforced", "False"),
        what="PolicyEnforced",
        controller=controller,
    )
    assert condition(ps, "PolicyEnforced")["reason"] == "NoReplicas"
    assert condition(ps, "ProxyAvailable")["status"] == "False"  # no kubelet: no proxy pods
    assert ps["status"]["policyVersion"] == doc["_annotation"] == doc["version"]
    assert ps["status"]["endpoint"] == f"http://nhigate-api.{ns}.svc:8443"

    # update the grant: the policy version changes and carries the new rule
    await apply_all(kube, route_grant(ns, "deploy", paths=["/v2/**"]))

    async def new_version() -> dict[str, Any] | None:
        current = await policy_of(kube, ns)
        if current and current["version"] != doc["version"]:
            return current
        return None

    updated = await eventually(new_version, what="new policy version", controller=controller)
    paths = [p for g in updated["grants"] for r in g["rules"] for p in r["paths"]]
    assert paths == ["/v2/**"]

    # delete the ProtectedService: the garbage collector removes everything it owned
    await kube.delete(PROTECTEDSERVICES, "api", ns)

    async def all_gone() -> bool:
        return all([await kube.get(ref, name, ns) is None for ref, name in OWNED])

    await eventually(all_gone, within=60, what="owned objects garbage-collected")
    orphan = await eventually(
        lambda: _with_condition(kube, ROUTEGRANTS, "deploy", ns, "Accepted", "False"),
        what="grant rejected after target deletion",
        controller=controller,
    )
    accepted = condition(orphan, "Accepted")
    assert accepted["reason"] == "TargetNotFound"
    assert "spec.target.protectedService" in accepted["message"]


async def test_invalid_grants_are_rejected_with_the_field_named(
    controller: ControllerProcess,
    kube: KubeClient,
    namespace: str,
    control_plane: ControlPlane,
) -> None:
    ns = namespace
    await setup_service(kube, ns)

    # CEL rejects at admission: expiresAt before notBefore
    bad = route_grant(
        ns, "backwards", notBefore="2030-01-02T00:00:00Z", expiresAt="2030-01-01T00:00:00Z"
    )
    with pytest.raises(KubectlError) as info:
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(bad))
    assert "expiresAt must be after notBefore" in info.value.stderr
    # CEL rejects a subject with two identities
    two = route_grant(ns, "two")
    two["spec"]["subjects"][0]["spiffeId"] = "spiffe://example.org/x"
    with pytest.raises(KubectlError) as info:
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(two))
    assert "exactly one of serviceAccount, token or spiffeId" in info.value.stderr

    # the controller rejects what CEL cannot know
    await apply_all(
        kube,
        route_grant(ns, "no-target", target="missing"),
        route_grant(ns, "no-issuer", issuer_name="nobody"),
        route_grant(ns, "good"),
    )
    no_target = await eventually(
        lambda: _with_condition(kube, ROUTEGRANTS, "no-target", ns, "Accepted", "False"),
        what="no-target rejected",
        controller=controller,
    )
    assert condition(no_target, "Accepted")["reason"] == "TargetNotFound"
    assert "spec.target.protectedService" in condition(no_target, "Accepted")["message"]
    assert condition(no_target, "Enforced")["reason"] == "NotAccepted"
    no_issuer = await eventually(
        lambda: _with_condition(kube, ROUTEGRANTS, "no-issuer", ns, "Accepted", "False"),
        what="no-issuer rejected",
        controller=controller,
    )
    assert condition(no_issuer, "Accepted")["reason"] == "IssuerNotFound"
    assert "spec.subjects[0].token.issuer" in condition(no_issuer, "Accepted")["message"]

    doc = await eventually(
        lambda: _policy_with(kube, ns, ["good"]), what="policy", controller=controller
    )
    assert grant_names(doc) == [f"{ns}/good"]  # rejected grants never reach the policy

    async def rejected_event() -> bool:
        events, _ = await kube.list(EVENTS, ns)
        return any(
            e["reason"] == "Rejected" and e["involvedObject"]["name"] == "no-issuer" for e in events
        )

    await eventually(rejected_event, what="Rejected event")


async def test_enforcement_is_claimed_only_from_replica_reports(
    controller: ControllerProcess, kube: KubeClient, namespace: str
) -> None:
    ns = namespace
    await setup_service(kube, ns)
    await apply_all(kube, route_grant(ns, "deploy"))
    doc = await eventually(lambda: _policy_with(kube, ns, ["deploy"]), controller=controller)
    version = doc["version"]

    await apply_all(kube, renew(ns, "r1", version))
    ps = await eventually(
        lambda: _with_condition(kube, PROTECTEDSERVICES, "api", ns, "PolicyEnforced", "True"),
        what="PolicyEnforced True",
        controller=controller,
    )
    assert condition(ps, "PolicyEnforced")["message"] == f"1/1 replicas at {version}"
    assert ps["status"]["enforcedReplicas"] == "1/1"
    grant = await eventually(
        lambda: _with_condition(kube, ROUTEGRANTS, "deploy", ns, "Enforced", "True"),
        what="grant Enforced",
        controller=controller,
    )
    assert grant["status"]["enforcedReplicas"] == "1/1"

    # a second replica at a version this controller never compiled: nothing is claimed
    await apply_all(kube, renew(ns, "r2", "sha256:0000000000000000", duration=3))
    ps = await eventually(
        lambda: _with_condition(kube, PROTECTEDSERVICES, "api", ns, "PolicyEnforced", "False"),
        what="PolicyEnforced False",
        controller=controller,
    )
    assert condition(ps, "PolicyEnforced")["reason"] == "ReplicasBehind"
    grant = await eventually(
        lambda: _with_condition(kube, ROUTEGRANTS, "deploy", ns, "Enforced", "False"),
        controller=controller,
    )
    assert condition(grant, "Enforced")["reason"] == "Pending"
    assert grant["status"]["enforcedReplicas"] == "1/2"

    # r2 stops renewing: after its 3 s lease it no longer counts (no event says so)
    await apply_all(kube, renew(ns, "r1", version))
    await eventually(
        lambda: _with_condition(kube, ROUTEGRANTS, "deploy", ns, "Enforced", "True"),
        within=10,
        what="Enforced again after the stale lease expired",
        controller=controller,
    )
    await kube.delete(LEASES, "nhigate-api-r2", ns)


async def test_grant_expiry_flips_active_and_leaves_the_policy_on_time(
    controller: ControllerProcess, kube: KubeClient, namespace: str
) -> None:
    ns = namespace
    await setup_service(kube, ns)
    expires = time.time() + 6
    expires_text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
    await apply_all(kube, route_grant(ns, "short", expiresAt=expires_text))
    await eventually(lambda: _policy_with(kube, ns, ["short"]), controller=controller)
    grant = await eventually(
        lambda: _with_condition(kube, ROUTEGRANTS, "short", ns, "Active", "True"),
        controller=controller,
    )
    assert grant["status"]["expiresAt"] == expires_text
    expiry = int(expires)  # the second written to the spec

    await eventually(lambda: _policy_with(kube, ns, []), within=15, controller=controller)
    dropped_at = time.time()
    assert dropped_at - expiry < 2.0, f"expired grant dropped {dropped_at - expiry:.2f}s late"
    grant = await eventually(
        lambda: _with_condition(kube, ROUTEGRANTS, "short", ns, "Active", "False"),
        controller=controller,
    )
    assert condition(grant, "Active")["reason"] == "Expired"

    async def expired_event() -> bool:
        events, _ = await kube.list(EVENTS, ns)
        return any(e["reason"] == "Expired" for e in events)

    await eventually(expired_event, what="Expired event")


async def test_kubernetes_issuer_keys_are_fetched_and_inlined(
    controller: ControllerProcess, kube: KubeClient, namespace: str
) -> None:
    ns = namespace
    await apply_all(
        kube,
        issuer(ns, "cluster", kubernetes={}),
        issuer(ns, "broken", jwksUri="http://127.0.0.1:9/jwks.json"),
        backend_service(ns),
        protected_service(ns, issuers=["cluster"]),
    )
    ready = await eventually(
        lambda: _with_condition(kube, IDENTITYISSUERS, "cluster", ns, "Ready", "True"),
        what="kubernetes issuer Ready",
        controller=controller,
    )
    assert condition(ready, "Ready")["reason"] == "KeysLoaded"
    assert ready["status"]["keyCount"] >= 1
    broken = await eventually(
        lambda: _with_condition(kube, IDENTITYISSUERS, "broken", ns, "Ready", "False"),
        what="broken issuer not Ready",
        controller=controller,
    )
    assert condition(broken, "Ready")["reason"] == "FetchFailed"
    assert broken["status"]["keyCount"] == 0

    async def inlined() -> dict[str, Any] | None:
        doc = await policy_of(kube, ns)
        if doc and doc["issuers"] and doc["issuers"][0].get("jwks"):
            return doc
        return None

    doc = await eventually(inlined, what="kubernetes keys inline in the policy")
    assert len(doc["issuers"][0]["jwks"]["keys"]) == ready["status"]["keyCount"]


async def test_bypass_paths_appear_and_clear(
    controller: ControllerProcess, kube: KubeClient, namespace: str
) -> None:
    ns = namespace
    await setup_service(kube, ns)
    await eventually(
        lambda: _with_condition(kube, PROTECTEDSERVICES, "api", ns, "DirectPathBlocked", "True"),
        what="DirectPathBlocked True with only our isolation policy",
        controller=controller,
    )
    allow_all = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "allow-all", "namespace": ns},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]},
    }
    node_port = backend_service(ns, "direct", type="NodePort")
    node_port["spec"]["selector"] = {"app": "backend"}
    ingress = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": "straight-in", "namespace": ns},
        "spec": {
            "defaultBackend": {"service": {"name": "backend", "port": {"number": 80}}},
        },
    }
    for obj, ref in (
        (allow_all, NETWORKPOLICIES),
        (node_port, SERVICES),
        (ingress, None),
    ):
        await apply_all(kube, obj)
        kind, name = obj["kind"], obj["metadata"]["name"]
        started = time.monotonic()
        ps = await eventually(
            lambda k=kind, n=name: _bypass_has(kube, ns, k, n, present=True),
            what=f"{kind} {name} in bypassPaths",
            controller=controller,
        )
        assert time.monotonic() - started < 5
        assert condition(ps, "DirectPathBlocked")["reason"] == "BypassFound"
        if ref is None:
            await kube.delete(INGRESSES, name, ns)
        else:
            await kube.delete(ref, name, ns)
        await eventually(
            lambda k=kind, n=name: _bypass_has(kube, ns, k, n, present=False),
            what=f"{kind} {name} gone from bypassPaths",
            controller=controller,
        )

    async def warning() -> bool:
        events, _ = await kube.list(EVENTS, ns)
        return any(e["reason"] == "BypassFound" and e["type"] == "Warning" for e in events)

    await eventually(warning, what="BypassFound Warning event")
    await eventually(
        lambda: _with_condition(kube, PROTECTEDSERVICES, "api", ns, "DirectPathBlocked", "True"),
        what="DirectPathBlocked True again",
        controller=controller,
    )


async def test_restart_mid_reconcile_converges_without_duplicates(
    controller: ControllerProcess, kube: KubeClient, namespace: str
) -> None:
    ns = namespace
    await setup_service(kube, ns)
    await apply_all(kube, *(route_grant(ns, f"g{i}", subject=f"s{i}") for i in range(5)))
    await eventually(lambda: kube.get(CONFIGMAPS, "nhigate-api-policy", ns), within=30)
    controller.kill()  # mid-reconcile: grants are still being judged
    await apply_all(kube, route_grant(ns, "late"))
    controller.start()

    names = ["late"] + [f"g{i}" for i in range(5)]
    await eventually(lambda: _policy_with(kube, ns, names), within=60, controller=controller)
    for name in names:
        await eventually(
            lambda n=name: _with_condition(kube, ROUTEGRANTS, n, ns, "Accepted", "True"),
            controller=controller,
        )
    secret = await kube.get(SECRETS, "nhigate-api-assertion-key", ns)
    assert secret is not None
    # restart again: the assertion key is kept, nothing is duplicated or orphaned
    controller.stop()
    controller.start()
    await eventually(
        lambda: _with_condition(kube, PROTECTEDSERVICES, "api", ns, "PolicyEnforced", "False"),
        controller=controller,
    )
    await asyncio.sleep(2)  # let the resumed controller run its full reconcile
    after = await kube.get(SECRETS, "nhigate-api-assertion-key", ns)
    assert after is not None
    assert after["data"] == secret["data"]
    selector = "nhigate.io/protected-service=api"
    for ref in (SERVICEACCOUNTS, ROLES, ROLEBINDINGS, DEPLOYMENTS, SERVICES, PDBS, NETWORKPOLICIES):
        items, _ = await kube.list(ref, ns, label_selector=selector)
        assert [i["metadata"]["name"] for i in items] == [
            "nhigate-api-isolation" if ref is NETWORKPOLICIES else "nhigate-api"
        ], ref.kind
    cms, _ = await kube.list(CONFIGMAPS, ns, label_selector=selector)
    assert sorted(i["metadata"]["name"] for i in cms) == [
        "nhigate-api-assertion-jwks",
        "nhigate-api-policy",
    ]
    ps = await kube.get(PROTECTEDSERVICES, "api", ns)
    assert ps is not None
    annotations = ps["metadata"].get("annotations") or {}
    assert any(k.startswith("nhigate.io/") for k in annotations), annotations  # kopf's state
    assert not ps["metadata"].get("finalizers")


# --- helpers ---------------------------------------------------------------------------------


async def _policy_with(kube: KubeClient, ns: str, names: list[str]) -> dict[str, Any] | None:
    doc = await policy_of(kube, ns)
    if doc is not None and grant_names(doc) == sorted(f"{ns}/{n}" for n in names):
        return doc
    return None


async def _with_condition(
    kube: KubeClient, ref: ResourceRef, name: str, ns: str, type_: str, status: str
) -> dict[str, Any] | None:
    obj = await kube.get(ref, name, ns)
    if obj is not None and condition(obj, type_).get("status") == status:
        return obj
    return None


async def _bypass_has(
    kube: KubeClient, ns: str, kind: str, name: str, *, present: bool
) -> dict[str, Any] | None:
    ps = await kube.get(PROTECTEDSERVICES, "api", ns)
    if ps is None:
        return None
    paths = (ps.get("status") or {}).get("bypassPaths") or []
    found = any(p["kind"] == kind and p["name"] == name for p in paths)
    return ps if found == present else None
