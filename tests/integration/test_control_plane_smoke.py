"""Smoke tests proving the local control plane is a real Kubernetes, not a mock.

Each test exercises a behaviour only the real components have: the API server's readiness and
version, CRD structural schemas with CEL validation, server-side apply field ownership, the
controller manager's deployment/replicaset/garbage-collector/token controllers, and RBAC denying
an unprivileged service account (and anonymous) with 403.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster import (
    HACK_DIR,
    ControlPlane,
    crd_manifests,
    install_crds,
)

pytestmark = pytest.mark.cluster

SMOKE_GROUP = "smoke.nhigate.test"
CEL_MESSAGE = "spec.minReplicas must not exceed spec.replicas"
WIDGET_CRD = f"""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.{SMOKE_GROUP}
spec:
  group: {SMOKE_GROUP}
  scope: Namespaced
  names: {{plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [replicas]
            x-kubernetes-validations:
            - rule: "!has(self.minReplicas) || self.minReplicas <= self.replicas"
              message: "{CEL_MESSAGE}"
            properties:
              replicas: {{type: integer, minimum: 0}}
              minReplicas: {{type: integer, minimum: 0}}
"""


def widget(namespace: str, name: str, replicas: int, min_replicas: int) -> str:
    """A Widget manifest (JSON is valid YAML, and needs no quoting care)."""
    return json.dumps(
        {
            "apiVersion": f"{SMOKE_GROUP}/v1",
            "kind": "Widget",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": replicas, "minReplicas": min_replicas},
        }
    )


def pinned_kubernetes_version() -> str:
    """KUBERNETES_VERSION from hack/versions.env."""
    for line in (HACK_DIR / "versions.env").read_text().splitlines():
        if line.startswith("KUBERNETES_VERSION="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("KUBERNETES_VERSION missing from hack/versions.env")


def jwt_claims(token: str) -> dict[str, object]:
    """The (unverified) payload of a JWT; only used to read claims the API server minted."""
    payload = token.split(".")[1]
    claims: dict[str, object] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


def anonymous_get(cp: ControlPlane, path: str) -> tuple[int, str]:
    """GET ``path`` from the API server with no credentials; return (status, body)."""
    context = ssl.create_default_context(cafile=cp.ca_file)
    try:
        with urllib.request.urlopen(cp.server + path, context=context, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def token_kubeconfig(cp: ControlPlane, path: Path, token: str) -> str:
    """A kubeconfig that authenticates with a bearer token only (no client certificate)."""
    user = {"token": token}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "c", "cluster": {"server": cp.server, "certificate-authority": cp.ca_file}}
        ],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def widget_crd(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The throwaway Widget CRD with a CEL rule, installed through tests.cluster.install_crds."""
    manifest = tmp_path_factory.mktemp("crds") / "widgets.yaml"
    manifest.write_text(WIDGET_CRD)
    names = install_crds(control_plane, [manifest])
    assert names == [f"widgets.{SMOKE_GROUP}"]
    return names[0]


def test_readyz_and_version(control_plane: ControlPlane) -> None:
    assert control_plane.kubectl("get", "--raw", "/readyz").stdout == "ok"
    version = json.loads(control_plane.kubectl("get", "--raw", "/version").stdout)
    assert version["gitVersion"] == pinned_kubernetes_version()
    # With --use-service-account-credentials each controller of kube-controller-manager gets
    # its own ServiceAccount as it starts (the garbage collector after its first discovery).
    wanted = {"serviceaccount/generic-garbage-collector", "serviceaccount/deployment-controller"}
    deadline = time.monotonic() + 60
    while True:
        sas = control_plane.kubectl("get", "sa", "-n", "kube-system", "-o", "name").stdout.split()
        if wanted <= set(sas) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert wanted <= set(sas)


def test_cel_rule_rejects_invalid_object(
    control_plane: ControlPlane, widget_crd: str, namespace: str
) -> None:
    ok = control_plane.kubectl(
        "apply", "--server-side", "-f", "-", input=widget(namespace, "ok", 3, 1)
    )
    assert "serverside-applied" in ok.stdout

    bad = control_plane.kubectl(
        "apply", "--server-side", "-f", "-", input=widget(namespace, "bad", 1, 3), check=False
    )
    assert bad.returncode != 0
    assert "Invalid value" in bad.stderr
    assert CEL_MESSAGE in bad.stderr
    missing = control_plane.kubectl("get", "widget", "bad", "-n", namespace, check=False)
    assert missing.returncode != 0
    assert "NotFound" in missing.stderr


def test_garbage_collector_deletes_deployment_when_owner_goes(
    control_plane: ControlPlane, widget_crd: str, namespace: str
) -> None:
    control_plane.kubectl(
        "apply", "--server-side", "-f", "-", input=widget(namespace, "owner", 1, 1)
    )
    uid = control_plane.kubectl(
        "get", "widget", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}"
    ).stdout
    assert uid
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "owned",
            "namespace": namespace,
            "ownerReferences": [
                {"apiVersion": f"{SMOKE_GROUP}/v1", "kind": "Widget", "name": "owner", "uid": uid}
            ],
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "owned"}},
            "template": {
                "metadata": {"labels": {"app": "owned"}},
                "spec": {"containers": [{"name": "c", "image": "registry.invalid/never:1"}]},
            },
        },
    }
    control_plane.kubectl(
        "apply",
        "--server-side",
        "--field-manager=smoke-test",
        "-f",
        "-",
        input=json.dumps(deployment),
    )
    managers = control_plane.kubectl(
        "get", "deployment", "owned", "-n", namespace,
        "-o", "jsonpath={range .metadata.managedFields[*]}{.manager}/{.operation} {end}",
    ).stdout.split()  # fmt: skip
    assert "smoke-test/Apply" in managers

    # The deployment controller creates a ReplicaSet, the replicaset controller a Pod.
    control_plane.kubectl(
        "wait", "--for=create", "pod", "-l", "app=owned", "-n", namespace, "--timeout=60s"
    )

    started = time.monotonic()
    control_plane.kubectl("delete", "widget", "owner", "-n", namespace, "--wait=true")
    # The garbage collector notices new resource types on a 30 s discovery resync, so allow
    # several periods before calling it broken.
    control_plane.kubectl(
        "wait", "--for=delete", "deployment/owned", "-n", namespace, "--timeout=180s", timeout=200
    )
    control_plane.kubectl(
        "wait", "--for=delete", "replicaset", "-l", "app=owned", "-n", namespace, "--timeout=60s"
    )
    assert time.monotonic() - started < 240


def test_rbac_denies_unprivileged_service_account(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    control_plane.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    token = control_plane.kubectl(
        "create", "token", "nobody", "-n", namespace, "--duration=10m"
    ).stdout.strip()
    claims = jwt_claims(token)
    assert claims["iss"] == control_plane.service_account_issuer
    assert claims["sub"] == f"system:serviceaccount:{namespace}:nobody"

    as_sa = token_kubeconfig(control_plane, tmp_path / "sa.kubeconfig", token)
    who = control_plane.kubectl("--kubeconfig", as_sa, "auth", "whoami", "-o", "json")
    assert json.loads(who.stdout)["status"]["userInfo"]["username"] == claims["sub"]

    denied = control_plane.kubectl(
        "--kubeconfig", as_sa, "get", "configmaps", "-n", namespace, check=False
    )
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr
    assert f"system:serviceaccount:{namespace}:nobody" in denied.stderr
    assert "cannot list resource" in denied.stderr

    # No credentials at all: authenticated as system:anonymous, and RBAC says no.
    status, body = anonymous_get(control_plane, "/api/v1/namespaces")
    assert status == 403
    assert "system:anonymous" in body

    # Positive control: the same token works once RBAC grants it, so the 403 above was
    # authorization, not a broken token.
    control_plane.kubectl(
        "create", "role", "read-cm", "--verb=list", "--resource=configmaps", "-n", namespace
    )
    control_plane.kubectl(
        "create", "rolebinding", "read-cm", "--role=read-cm",
        f"--serviceaccount={namespace}:nobody", "-n", namespace,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        allowed = control_plane.kubectl(
            "--kubeconfig", as_sa, "get", "configmaps", "-n", namespace, "-o", "name", check=False
        )
        if allowed.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert allowed.returncode == 0, allowed.stderr
    assert "configmap/kube-root-ca.crt" in allowed.stdout
    still_denied = control_plane.kubectl(
        "--kubeconfig", as_sa, "get", "secrets", "-n", namespace, check=False
    )
    assert still_denied.returncode != 0
    assert "Forbidden" in still_denied.stderr


def test_token_controller_fills_legacy_token_secret(
    control_plane: ControlPlane, namespace: str
) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/service-account-token",
        "metadata": {
            "name": "default-token",
            "namespace": namespace,
            "annotations": {"kubernetes.io/service-account.name": "default"},
        },
    }
    control_plane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(secret))
    control_plane.kubectl(
        "wait", "--for=jsonpath={.data.token}", "secret/default-token", "-n", namespace,
        "--timeout=60s",
    )  # fmt: skip
    encoded = control_plane.kubectl(
        "get", "secret", "default-token", "-n", namespace, "-o", "jsonpath={.data.token}"
    ).stdout
    claims = jwt_claims(base64.b64decode(encoded).decode())
    assert claims["sub"] == f"system:serviceaccount:{namespace}:default"


def test_project_crds_are_established(
    control_plane: ControlPlane, crds_installed: list[str]
) -> None:
    assert crd_manifests(), "crds/ is empty"
    served = control_plane.kubectl(
        "api-resources", "--api-group=nhigate.io", "-o", "name"
    ).stdout.split()
    for plural in ("identityissuers", "protectedservices", "routegrants", "revocations"):
        assert f"{plural}.nhigate.io" in served
    assert all(name.endswith(".nhigate.io") for name in crds_installed)


def route_grant(namespace: str, name: str, **spec_overrides: object) -> str:
    """A RouteGrant manifest for the project's CRD; ``spec_overrides`` replace spec fields."""
    spec: dict[str, object] = {
        "target": {"protectedService": "payments-api"},
        "subjects": [{"serviceAccount": {"namespace": namespace, "name": "ci-deploy"}}],
        "rules": [{"methods": ["GET"], "paths": ["/v1/invoices/**"]}],
        "notBefore": "2026-01-01T00:00:00Z",
        "expiresAt": "2026-01-02T00:00:00Z",
        "reason": "smoke test",
    }
    spec.update(spec_overrides)
    return json.dumps(
        {
            "apiVersion": "nhigate.io/v1alpha1",
            "kind": "RouteGrant",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
    )


def test_project_routegrant_cel_rules_are_enforced_by_the_api_server(
    control_plane: ControlPlane, crds_installed: list[str], namespace: str
) -> None:
    assert "routegrants.nhigate.io" in crds_installed
    control_plane.kubectl("apply", "--server-side", "-f", "-", input=route_grant(namespace, "ok"))

    backwards = control_plane.kubectl(
        "apply", "--server-side", "-f", "-", check=False,
        input=route_grant(namespace, "backwards", expiresAt="2025-12-31T00:00:00Z"),
    )  # fmt: skip
    assert backwards.returncode != 0
    assert "expiresAt must be after notBefore" in backwards.stderr

    traversal = control_plane.kubectl(
        "apply", "--server-side", "-f", "-", check=False,
        input=route_grant(
            namespace, "traversal", rules=[{"methods": ["GET"], "paths": ["/v1/../admin"]}]
        ),
    )  # fmt: skip
    assert traversal.returncode != 0
    assert "dot-segments" in traversal.stderr

    names = control_plane.kubectl("get", "routegrants", "-n", namespace, "-o", "name").stdout
    assert names.split() == ["routegrant.nhigate.io/ok"]
