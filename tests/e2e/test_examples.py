"""Every YAML under examples/ applied to a real API server, reconciled, and enforced.

The examples are applied with the built `kubectl apply --server-side`, as a user would apply
them, after one textual change: `namespace: payments` becomes the test's own namespace (so
runs are isolated). The controller reconciles them; then one `nhigate proxy --kube` process
serves the compiled policy in front of an upstream on 127.0.0.1 and is called with tokens
signed by the demo key (examples/demo-keys/, DEMO ONLY), exactly as the demo does.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml

from cluster import REPO_ROOT, ControlPlane
from controller_harness import (
    JSON,
    ControllerProcess,
    ProxyProcess,
    condition,
    eventually,
    free_port,
)
from nhigate.k8s import (
    CONFIGMAPS,
    DEPLOYMENTS,
    IDENTITYISSUERS,
    NETWORKPOLICIES,
    PROTECTEDSERVICES,
    REVOCATIONS,
    ROUTEGRANTS,
    SERVICES,
    KubeClient,
    ResourceRef,
)
from nhigate.policy import unpack_document

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

EXAMPLES_DIR = REPO_ROOT / "examples"
EXAMPLE_NAMESPACE = "payments"
DEMO_KEY = EXAMPLES_DIR / "demo-keys" / "demo-issuer-es256.key.pem"
DEMO_KID = "demo-issuer-2025"
DEMO_ISSUER_URL = "https://issuer.demo.nhigate.example"
DEMO_AUDIENCE = "payments-api"
SERVICE = "payments-api"
POLICY_CONFIGMAP = f"nhigate-{SERVICE}-policy"
CI_SUBJECT = "repo:acme/payments:ref:refs/heads/main"
AGENT_SUBJECT = "agent:invoice-reconciler"
LEAKED_JTI = "3f1c9a52-leaked-demo-token"

# What the examples define, by (kind, name): the test below checks each one's outcome, and
# test_every_example_is_applied fails when a file or document is added without a check here.
EXPECTED = {
    ("IdentityIssuer", "demo-issuer"),
    ("ProtectedService", SERVICE),
    ("RouteGrant", "ci-deploy"),
    ("RouteGrant", "invoice-agent"),
    ("Revocation", "leaked-agent-token"),
}
_NAMESPACE_LINE = re.compile(rf"^(\s*namespace:\s*){EXAMPLE_NAMESPACE}\s*$", re.MULTILINE)


def example_files() -> list[Path]:
    """Every YAML file under examples/ (recursively), sorted."""
    return sorted(
        p for p in EXAMPLES_DIR.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml")
    )


def in_namespace(text: str, namespace: str) -> str:
    """The example text with every `namespace: payments` line moved to `namespace`."""
    return _NAMESPACE_LINE.sub(lambda m: f"{m.group(1)}{namespace}", text)


def documents(text: str) -> list[JSON]:
    """The non-empty YAML documents of `text`."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def namespace_fields(node: Any) -> list[str]:
    """The value of every `namespace` field anywhere in `node`."""
    if isinstance(node, dict):
        own = [str(v) for k, v in node.items() if k == "namespace" and not isinstance(v, dict)]
        return own + [x for v in node.values() for x in namespace_fields(v)]
    if isinstance(node, list):
        return [x for v in node for x in namespace_fields(v)]
    return []


def demo_token(subject: str, claims: dict[str, str], *, jti: str | None = None) -> str:
    """A token from the demo issuer of examples/issuer.yaml (its private key is public)."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": DEMO_ISSUER_URL,
        "aud": DEMO_AUDIENCE,
        "sub": subject,
        "iat": now,
        "exp": now + 600,
        "jti": jti or str(uuid.uuid4()),
        **claims,
    }
    return jwt.encode(payload, DEMO_KEY.read_bytes(), algorithm="ES256", headers={"kid": DEMO_KID})


def test_every_example_is_applied() -> None:
    """The glob of examples/ is exactly what the e2e test applies and checks: nothing forgotten."""
    files = example_files()
    assert {p.name for p in files} == {
        "grant-agent.yaml",
        "grant-ci-deploy.yaml",
        "issuer.yaml",
        "protected-service.yaml",
        "revocation.yaml",
    }, "a new example needs its own assertions in test_examples_reconcile_and_enforce"
    found = {(d["kind"], d["metadata"]["name"]) for p in files for d in documents(p.read_text())}
    assert found == EXPECTED
    for path in files:
        for doc in documents(in_namespace(path.read_text(), "t-rewritten")):
            assert doc["metadata"]["namespace"] == "t-rewritten", f"{path} kept its namespace"
            assert set(namespace_fields(doc)) == {"t-rewritten"}, f"{path}: a namespace was kept"


def apply_examples(cp: ControlPlane, namespace: str) -> set[tuple[str, str]]:
    """`kubectl apply --server-side` every example (plus the backend Service) into `namespace`;
    returns the (kind, name) of everything the API server accepted."""
    backend = (
        f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {SERVICE}\n  namespace: {namespace}\n"
        "spec:\n  selector: {app: payments-api}\n"
        "  ports: [{name: http, port: 8080, targetPort: 8080, protocol: TCP}]\n"
    )
    texts = [backend] + [in_namespace(p.read_text(), namespace) for p in example_files()]
    out = cp.kubectl(
        "apply", "--server-side", "--field-manager=nhigate-examples", "-o", "name", "-f", "-",
        input="\n---\n".join(texts),
    ).stdout  # fmt: skip
    kinds = {
        "identityissuer": "IdentityIssuer",
        "protectedservice": "ProtectedService",
        "routegrant": "RouteGrant",
        "revocation": "Revocation",
        "service": "Service",
    }
    applied = set()
    for line in out.split():
        resource, _, name = line.partition("/")
        applied.add((kinds.get(resource.split(".", 1)[0], resource), name))
    return applied


async def test_examples_reconcile_and_enforce(
    control_plane: ControlPlane,
    controller: ControllerProcess,
    kube: KubeClient,
    namespace: str,
    upstream: int,
    tmp_path: Path,
) -> None:
    ns = namespace
    started = time.monotonic()
    applied = apply_examples(control_plane, ns)
    assert applied == EXPECTED | {("Service", SERVICE)}

    async def with_condition(ref: ResourceRef, name: str, type_: str, status: str) -> JSON | None:
        obj = await kube.get(ref, name, ns)
        return obj if condition(obj, type_).get("status") == status else None

    issuer = await eventually(
        lambda: with_condition(IDENTITYISSUERS, "demo-issuer", "Ready", "True"),
        what="IdentityIssuer demo-issuer Ready",
        controller=controller,
    )
    assert issuer["status"]["keyCount"] == 1
    for grant in ("ci-deploy", "invoice-agent"):
        obj = await eventually(
            lambda g=grant: with_condition(ROUTEGRANTS, g, "Accepted", "True"),  # type: ignore[misc]
            what=f"RouteGrant {grant} Accepted",
            controller=controller,
        )
        active = condition(obj, "Active")
        assert active.get("status") == "True", f"{grant}: {active}"
        assert condition(obj, "Accepted")["reason"] == "Accepted"
    revocation = await eventually(
        lambda: with_condition(REVOCATIONS, "leaked-agent-token", "Accepted", "True"),
        what="Revocation leaked-agent-token Accepted",
        controller=controller,
    )
    assert revocation["status"]["observedGeneration"] == revocation["metadata"]["generation"]

    # The ProtectedService's owned objects, each controlled by it.
    ps = await kube.get(PROTECTEDSERVICES, SERVICE, ns)
    assert ps is not None
    owned = {
        "Deployment": (DEPLOYMENTS, f"nhigate-{SERVICE}"),
        "Service": (SERVICES, f"nhigate-{SERVICE}"),
        "NetworkPolicy": (NETWORKPOLICIES, f"nhigate-{SERVICE}-isolation"),
        "ConfigMap": (CONFIGMAPS, POLICY_CONFIGMAP),
    }
    for kind, (ref, name) in owned.items():
        obj = await eventually(
            lambda r=ref, n=name: kube.get(r, n, ns),  # type: ignore[misc]
            what=f"{kind} {name}",
            controller=controller,
        )
        owners = obj["metadata"].get("ownerReferences") or []
        assert [(o["kind"], o["name"], o["uid"], o.get("controller")) for o in owners] == [
            ("ProtectedService", SERVICE, ps["metadata"]["uid"], True)
        ], f"{kind} {name} owners: {owners}"
    deployment = await kube.get(DEPLOYMENTS, f"nhigate-{SERVICE}", ns)
    assert deployment is not None
    assert deployment["spec"]["replicas"] == 2
    netpol = await kube.get(NETWORKPOLICIES, f"nhigate-{SERVICE}-isolation", ns)
    assert netpol is not None
    assert netpol["spec"]["podSelector"] == {"matchLabels": {"app": "payments-api"}}

    # The compiled policy carries both grants and the revocation.
    configmap = await kube.get(CONFIGMAPS, POLICY_CONFIGMAP, ns)
    assert configmap is not None
    document = unpack_document(base64.b64decode(configmap["binaryData"]["policy.json.gz"]))
    assert {g.name for g in document.grants} == {f"{ns}/ci-deploy", f"{ns}/invoice-agent"}
    assert [(r.name, r.token_id) for r in document.revocations] == [
        (f"{ns}/leaked-agent-token", LEAKED_JTI)
    ]
    assert [i.issuer for i in document.issuers] == [DEMO_ISSUER_URL]
    assert document.service.name == SERVICE
    reconciled = time.monotonic() - started

    proxy = ProxyProcess(
        control_plane,
        ns,
        POLICY_CONFIGMAP,
        upstream=f"http://127.0.0.1:{upstream}",
        port=free_port(),
        admin_port=free_port(),
        work_dir=tmp_path,
    )
    proxy.start()
    try:
        await _enforce(proxy, ns, document.version)
    finally:
        proxy.stop()
    print(
        f"\nexamples: applied + reconciled in {reconciled:.1f} s, "
        f"whole test {time.monotonic() - started:.1f} s"
    )


async def _enforce(proxy: ProxyProcess, ns: str, version: str) -> None:
    base = f"http://127.0.0.1:{proxy.port}"
    ci = demo_token(CI_SUBJECT, {"job": "deploy"})
    leaked = demo_token(AGENT_SUBJECT, {"team": "finance-ops"}, jti=LEAKED_JTI)
    agent = demo_token(AGENT_SUBJECT, {"team": "finance-ops"})
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            try:
                async with http.get(f"http://127.0.0.1:{proxy.admin_port}/readyz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        async def call(method: str, path: str, token: str) -> tuple[int, str]:
            """(status, request id): a denial's JSON body and the upstream's echo both carry it."""
            headers = {"Authorization": f"Bearer {token}"}
            async with http.request(method, base + path, headers=headers) as resp:
                body = json.loads(await resp.read())
                return resp.status, str(body["request_id"])

        try:
            await eventually(ready, within=60, what="proxy ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{proxy.log_tail()}") from None

        outcomes = {
            "ci GET": (await call("GET", "/v1/payments/1", ci), 200, "allowed"),
            "ci DELETE": (await call("DELETE", "/v1/payments/1", ci), 403, "no_matching_grant"),
            "leaked GET": (await call("GET", "/v1/payments/1", leaked), 403, "revoked"),
            "agent GET": (await call("GET", "/v1/payments/1", agent), 200, "allowed"),
            "agent invoices": (await call("GET", "/v1/invoices/7/lines", agent), 200, "allowed"),
            "agent POST": (await call("POST", "/v1/refunds", agent), 403, "no_matching_grant"),
        }

        async def audited() -> dict[str, JSON] | None:
            by_id = {r["request_id"]: r for r in proxy.audit_records()}
            wanted = {rid for (_, rid), _, _ in outcomes.values()}
            return by_id if wanted <= by_id.keys() else None

        records = await eventually(audited, within=5, what="audit records of every request")
    for what, ((status, request_id), want_status, want_reason) in outcomes.items():
        record = records[request_id]
        assert (status, record["reason"]) == (want_status, want_reason), f"{what}: {record}"
        assert record["policy_version"] == version, what
    assert records[outcomes["leaked GET"][0][1]]["identity"]["subject"] == AGENT_SUBJECT
    assert records[outcomes["ci GET"][0][1]]["grant"] == f"{ns}/ci-deploy"
    assert records[outcomes["agent GET"][0][1]]["grant"] == f"{ns}/invoice-agent"
