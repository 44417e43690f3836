"""The Helm chart: lint, values schema, and every rendered object validated by a real API server.

Offline checks (no API server, only the helm binary built by hack/): `helm lint --strict` with the
default and the CI values, the schema rejecting unknown values, the chart's CRD copies matching
`crds/`, and the image's dependency pins matching pyproject.toml.

Cluster checks: `helm template` output applied with `kubectl apply --server-side --dry-run=server`
(so Kubernetes itself validates every object), and the chart's RBAC installed for real and
probed with `kubectl auth can-i --as=system:serviceaccount:...`: what the controller must do is
allowed, what it must not do is denied.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster import REPO_ROOT, ControlPlane, build_binaries, create_namespace, delete_namespace
from controller_harness import (
    ControllerProcess,
    apply_all,
    backend_pod,
    backend_service,
    eventually,
    issuer,
    protected_service,
    route_grant,
)
from nhigate.k8s import (
    CONFIGMAPS,
    DEPLOYMENTS,
    NETWORKPOLICIES,
    PROTECTEDSERVICES,
    ROLES,
    ROUTEGRANTS,
    SECRETS,
    KubeClient,
)

CHART = REPO_ROOT / "charts" / "nhigate"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
VARIANTS = [None, *CI_VALUES]
VARIANT_IDS = ["default", *(p.name.removesuffix("-values.yaml") for p in CI_VALUES)]
HELM_TIMEOUT_S = 60
# `helm template` assumes an old Kubernetes unless told; render for the pinned control plane's.
KUBE_VERSION = next(
    line.split("=", 1)[1].strip().removeprefix("v")
    for line in (REPO_ROOT / "hack" / "versions.env").read_text().splitlines()
    if line.startswith("KUBERNETES_VERSION=")
)

Helm = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """A function running the built helm binary with its caches in a temporary directory."""
    binary = build_binaries() / "helm"
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ)
    env.update(
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_DATA_HOME=str(home / "data"),
    )

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        if args[0] in ("template", "lint"):
            args = (args[0], "--kube-version", KUBE_VERSION, *args[1:])
        proc = subprocess.run(
            [str(binary), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=HELM_TIMEOUT_S,
            check=False,
        )
        if check and proc.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} failed:\n{proc.stderr}", pytrace=False)
        return proc

    return run


def values_args(values: Path | None, *sets: str) -> list[str]:
    """helm arguments for a values file (None = defaults) and --set overrides."""
    args = ["--values", str(values)] if values else []
    for item in sets:
        args += ["--set", item]
    return args


def render(helm: Helm, release: str, namespace: str, *args: str) -> list[dict[str, Any]]:
    """`helm template` parsed into objects (empty documents dropped)."""
    out = helm("template", release, str(CHART), "--namespace", namespace, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


# --- offline -----------------------------------------------------------------------------------


def test_chart_crd_files_match_crds() -> None:
    """charts/nhigate/crd-files/ is an exact copy of crds/ (hack/sync-chart-crds.sh)."""
    sources = {p.name: p.read_bytes() for p in (REPO_ROOT / "crds").glob("*.yaml")}
    copies = {p.name: p.read_bytes() for p in (CHART / "crd-files").glob("*.yaml")}
    assert sources, "no CRDs in crds/"
    stale = sorted(
        name for name in sources.keys() | copies.keys() if sources.get(name) != copies.get(name)
    )
    assert not stale, f"chart CRD copies differ from crds/: {stale}; run hack/sync-chart-crds.sh"


def test_image_constraints_pin_what_pyproject_pins() -> None:
    """images/constraints.txt pins every direct dependency at pyproject.toml's version."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    direct = dict(d.lower().split("==") for d in pyproject["project"]["dependencies"])
    lines = (REPO_ROOT / "images" / "constraints.txt").read_text().splitlines()
    pinned = dict(
        line.strip().lower().split("==")
        for line in lines
        if line.strip() and not line.startswith("#")
    )
    mismatched = {
        name: (ver, pinned.get(name)) for name, ver in direct.items() if pinned.get(name) != ver
    }
    assert not mismatched, f"pyproject pin != images/constraints.txt pin: {mismatched}"


@pytest.mark.parametrize("values", VARIANTS, ids=VARIANT_IDS)
def test_helm_lint_strict(helm: Helm, values: Path | None) -> None:
    """`helm lint --strict` passes with the default and every CI values file."""
    proc = helm("lint", "--strict", str(CHART), *values_args(values))
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize(
    "bad",
    [
        "controller.replicas=2",  # a plausible typo at the top level
        "image.tags=latest",  # one level down
        "crds.upgrade=true",
        "leaderElection.mode=sometimes",  # not in the enum
        "securityContext.privilegd=true",
        "replicas=many",
    ],
)
def test_schema_rejects_unknown_or_invalid_value(helm: Helm, bad: str) -> None:
    """values.schema.json makes `helm template` fail on an unknown key or a bad value."""
    proc = helm("template", "x", str(CHART), "--set", bad, check=False)
    assert proc.returncode != 0, f"--set {bad} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr


def test_schema_closes_every_object() -> None:
    """Every object in values.schema.json with properties forbids additional ones.

    The only open objects are Kubernetes types passed through verbatim (the API server validates
    them: see the dry-run test) and Helm's `global`.
    """
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        closed = node.get("additionalProperties") is False
        if node.get("type") == "object" and "properties" in node and not closed:
            open_objects.append(path)
        for key, child in node.get("properties", {}).items():
            walk(child, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}[{key}]")

    walk(schema, "$")
    assert schema["additionalProperties"] is False
    assert not open_objects, open_objects
    declared = set(yaml.safe_load((CHART / "values.yaml").read_text()))
    assert declared <= set(schema["properties"]), declared - set(schema["properties"])


def test_leader_election_follows_replicas(helm: Helm) -> None:
    """auto: --peering (and a peering object) exactly when replicas > 1; never + 2 is an error."""

    def controller_args(*sets: str) -> tuple[list[str], set[str]]:
        objs = render(helm, "nhigate", "nhigate-system", *values_args(None, *sets))
        deployment = next(o for o in objs if o["kind"] == "Deployment")
        args: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        return args, {o["kind"] for o in objs}

    args, kinds = controller_args()
    assert not any(a.startswith("--peering") for a in args)
    assert "ClusterKopfPeering" not in kinds
    args, kinds = controller_args("replicas=2")
    assert "--peering" in args
    assert "--peering-name=nhigate" in args
    assert "ClusterKopfPeering" in kinds
    proc = helm(
        "template",
        "x",
        str(CHART),
        "--set",
        "replicas=2",
        "--set",
        "leaderElection.mode=never",
        check=False,
    )
    assert proc.returncode != 0
    assert "replicas > 1 needs leader election" in proc.stderr


def test_usage_values_reach_the_controller_flags(helm: Helm) -> None:
    """The rendered args parse with the real CLI into the settings the values name."""
    import argparse

    from nhigate.cli import controller as controller_cli

    objs = render(
        helm,
        "nhigate",
        "nhigate-system",
        *values_args(None, "usage.unusedAfterSeconds=2592000", "usage.writeIntervalSeconds=30"),
    )
    deployment = next(o for o in objs if o["kind"] == "Deployment")
    args: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    parser = argparse.ArgumentParser()
    controller_cli.add_parser(parser.add_subparsers())
    parsed = parser.parse_args(args)
    assert (parsed.unused_after, parsed.usage_write_interval) == (2592000.0, 30.0)


def test_controller_pod_is_restricted(helm: Helm) -> None:
    """The default controller pod meets the restricted Pod Security Standard's key rules."""
    objs = render(helm, "nhigate", "nhigate-system")
    pod = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    crds = [o for o in objs if o["kind"] == "CustomResourceDefinition"]
    assert {c["metadata"]["name"] for c in crds} == {
        f"{n}.nhigate.io"
        for n in ("identityissuers", "protectedservices", "routegrants", "revocations")
    }
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for c in crds)


def test_rendered_crds_are_the_source_crds(helm: Helm) -> None:
    """The CRDs the chart renders equal crds/ exactly, plus the keep annotation (crds.keep).

    Guards against re-serialising them: Helm's YAML 1.1 parser turns JWK keys `n`/`y` into
    booleans."""
    sources = [yaml.safe_load(p.read_text()) for p in sorted((REPO_ROOT / "crds").glob("*.yaml"))]
    for keep in (True, False):
        objs = render(
            helm, "x", "x", "--show-only", "templates/crds.yaml", "--set", f"crds.keep={keep}"
        )
        by_name = {o["metadata"]["name"]: o for o in objs}
        assert set(by_name) == {s["metadata"]["name"] for s in sources}
        for source in sources:
            rendered = by_name[source["metadata"]["name"]]
            annotations = rendered["metadata"].pop("annotations", {})
            assert annotations == ({"helm.sh/resource-policy": "keep"} if keep else {})
            assert rendered == source
    assert render(helm, "x", "x", *values_args(None, "crds.enabled=false", "tests.enabled=false"))
    kinds = {o["kind"] for o in render(helm, "x", "x", "--set", "crds.enabled=false")}
    assert "CustomResourceDefinition" not in kinds


# --- against the real API server -----------------------------------------------------------------


@pytest.fixture
def chart_crds(control_plane: ControlPlane, crds_installed: list[str]) -> list[str]:
    """The nhigate.io CRDs (crds/) and kopf's peering CRDs (the chart's crds/) applied for real."""
    control_plane.kubectl(
        "apply", "--server-side", "--field-manager=nhigate-tests", "-f", str(CHART / "crds")
    )
    control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/clusterkopfpeerings.kopf.dev",
        "crd/kopfpeerings.kopf.dev",
    )
    return crds_installed


@pytest.fixture
def second_namespace(control_plane: ControlPlane) -> Iterator[str]:
    """Another fresh namespace (for watchNamespaces with two entries)."""
    name = create_namespace(control_plane)
    try:
        yield name
    finally:
        delete_namespace(control_plane, name)


@pytest.mark.parametrize("values", VARIANTS, ids=VARIANT_IDS)
def test_rendered_chart_passes_server_side_dry_run(
    helm: Helm,
    control_plane: ControlPlane,
    chart_crds: list[str],
    namespace: str,
    second_namespace: str,
    values: Path | None,
) -> None:
    """Every object `helm template` renders is accepted by kube-apiserver (server-side dry-run)."""
    sets = []
    if values and yaml.safe_load(values.read_text()).get("watchNamespaces"):
        sets.append(f"watchNamespaces={{{namespace},{second_namespace}}}")
    manifest = helm(
        "template", "nhigate", str(CHART), "--namespace", namespace, *values_args(values, *sets)
    ).stdout
    kinds = [doc["kind"] for doc in yaml.safe_load_all(manifest) if doc]
    proc = control_plane.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--field-manager=helm",
        # The CRDs were applied for real by another field manager; a dry-run of the same CRDs
        # must not fail on ownership, only on validity.
        "--force-conflicts",
        "-o",
        "name",
        "-f",
        "-",
        input=manifest,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    accepted = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(accepted) == len(kinds), (accepted, kinds)


# (verb, resource, namespaced?, allowed?) as the controller's ServiceAccount.
MUST = [
    ("watch", "protectedservices.nhigate.io", True),
    ("patch", "routegrants.nhigate.io", True),
    ("patch", "routegrants.nhigate.io/status", True),
    ("update", "identityissuers.nhigate.io/status", True),
    ("patch", "revocations.nhigate.io/status", True),
    ("create", "networkpolicies.networking.k8s.io", True),
    ("patch", "deployments.apps", True),
    ("create", "roles.rbac.authorization.k8s.io", True),
    ("create", "rolebindings.rbac.authorization.k8s.io", True),
    ("patch", "configmaps", True),
    ("create", "secrets", True),
    ("patch", "poddisruptionbudgets.policy", True),
    ("delete", "horizontalpodautoscalers.autoscaling", True),
    ("watch", "pods", True),
    ("list", "pods", True),  # pods running as granted service accounts (pod-bound tokens)
    ("watch", "serviceaccounts", True),  # a deleted granted account ends its tokens
    ("list", "serviceaccounts", True),
    ("list", "services", True),
    ("watch", "ingresses.networking.k8s.io", True),
    ("watch", "httproutes.gateway.networking.k8s.io", True),
    ("watch", "leases.coordination.k8s.io", True),
    ("create", "leases.coordination.k8s.io", True),
    ("create", "events", True),
    ("create", "events.events.k8s.io", True),
    ("watch", "namespaces", False),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io", False),
]
MUST_NOT = [
    ("delete", "deployments.apps", True),  # owned objects go with their owner (GC)
    ("update", "secrets", True),
    ("delete", "secrets", True),
    ("list", "secrets", True),  # it writes its own key Secret; it never reads others in bulk
    ("watch", "secrets", True),
    ("create", "routegrants.nhigate.io", True),  # users grant access, never the controller
    ("delete", "routegrants.nhigate.io", True),
    ("create", "revocations.nhigate.io", True),
    ("delete", "namespaces", False),
    ("create", "clusterroles.rbac.authorization.k8s.io", False),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", False),
    ("escalate", "roles.rbac.authorization.k8s.io", True),
    ("bind", "roles.rbac.authorization.k8s.io", True),
    ("create", "pods", True),
    ("create", "pods/exec", True),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", False),
    ("create", "serviceaccounts/token", True),
    ("patch", "nodes", False),
    ("create", "validatingwebhookconfigurations.admissionregistration.k8s.io", False),
]


def can_i(cp: ControlPlane, user: str, verb: str, resource: str, namespace: str | None) -> bool:
    """Ask the API server (a SubjectAccessReview, no discovery needed) whether the
    ServiceAccount `user` may `verb` `resource` ("plural.group/subresource" or a "/url")."""
    _, _, ns, _ = user.split(":")
    spec: dict[str, Any] = {
        "user": user,
        "groups": [
            "system:serviceaccounts",
            f"system:serviceaccounts:{ns}",
            "system:authenticated",
        ],
    }
    if resource.startswith("/"):
        spec["nonResourceAttributes"] = {"path": resource, "verb": verb}
    else:
        name, _, subresource = resource.partition("/")
        plural, _, group = name.partition(".")
        attrs = {"verb": verb, "resource": plural, "group": group, "subresource": subresource}
        if namespace:
            attrs["namespace"] = namespace
        spec["resourceAttributes"] = attrs
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}
    out = cp.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(review)).stdout
    return bool(json.loads(out)["status"].get("allowed", False))


@pytest.fixture
def installed_rbac(helm: Helm, control_plane: ControlPlane, namespace: str) -> Iterator[Any]:
    """A function that installs the chart's ServiceAccount + RBAC for real; removed after."""
    applied: list[str] = []

    def install(*sets: str) -> str:
        release = f"rbac-{uuid.uuid4().hex[:6]}"
        manifest = helm(
            "template",
            release,
            str(CHART),
            "--namespace",
            namespace,
            "--show-only",
            "templates/serviceaccount.yaml",
            "--show-only",
            "templates/rbac.yaml",
            *values_args(None, *sets),
        ).stdout
        out = control_plane.kubectl(
            "apply",
            "--server-side",
            "--field-manager=helm",
            "-o",
            "name",
            "-f",
            "-",
            input=manifest,
        ).stdout
        applied.extend(line for line in out.splitlines() if line.startswith("clusterrole"))
        objs = [o for o in yaml.safe_load_all(manifest) if o]
        sa = next(o for o in objs if o["kind"] == "ServiceAccount")["metadata"]["name"]
        return f"system:serviceaccount:{namespace}:{sa}"

    yield install
    for name in applied:
        control_plane.kubectl("delete", name, "--ignore-not-found", check=False)


def test_rbac_cluster_wide_allows_exactly_what_the_controller_needs(
    control_plane: ControlPlane, installed_rbac: Any, second_namespace: str
) -> None:
    """Cluster-wide install: every MUST is allowed in any namespace, every MUST_NOT denied."""
    user = installed_rbac()
    wrong = []
    for verb, resource, namespaced in MUST:
        if not can_i(control_plane, user, verb, resource, second_namespace if namespaced else None):
            wrong.append(f"denied but needed: {verb} {resource}")
    for verb, resource, namespaced in MUST_NOT:
        if can_i(control_plane, user, verb, resource, second_namespace if namespaced else None):
            wrong.append(f"allowed but forbidden: {verb} {resource}")
    assert can_i(control_plane, user, "get", "/openid/v1/jwks", None)
    assert not can_i(control_plane, user, "get", "/metrics", None)
    assert not wrong, "\n".join(wrong)


def test_rbac_namespaced_is_confined_to_watched_namespaces(
    control_plane: ControlPlane, installed_rbac: Any, namespace: str, second_namespace: str
) -> None:
    """watchNamespaces: full rights in the watched namespace, none in another one."""
    user = installed_rbac(f"watchNamespaces={{{namespace}}}", "replicas=2")
    for verb, resource, namespaced in MUST:
        ns = namespace if namespaced else None
        assert can_i(control_plane, user, verb, resource, ns), f"{verb} {resource} in {ns}"
        if namespaced:
            assert not can_i(control_plane, user, verb, resource, second_namespace), (
                f"{verb} {resource} allowed in unwatched namespace"
            )
    assert can_i(control_plane, user, "patch", "kopfpeerings.kopf.dev", namespace)
    assert not can_i(control_plane, user, "patch", "clusterkopfpeerings.kopf.dev", None)
    assert not can_i(control_plane, user, "list", "secrets", namespace)


# --- the real controller under the chart's RBAC ---------------------------------------------------


def service_account_kubeconfig(cp: ControlPlane, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates as ServiceAccount `sa` with a fresh bound token."""
    token = cp.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").stdout.strip()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "cp", "cluster": {"server": cp.server, "certificate-authority": cp.ca_file}}
        ],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [
            {"name": sa, "context": {"cluster": "cp", "user": sa, "namespace": namespace}}
        ],
        "current-context": sa,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


async def test_controller_reconciles_under_the_chart_rbac(
    control_plane: ControlPlane,
    crds_installed: list[str],
    installed_rbac: Any,
    namespace: str,
    tmp_path: Path,
) -> None:
    """`nhigate controller` authenticated as the chart's ServiceAccount (not cluster-admin),
    with the namespaced RBAC the chart renders for `watchNamespaces`, reconciles a
    ProtectedService and a RouteGrant, and never hits a 403."""
    user = installed_rbac(f"watchNamespaces={{{namespace}}}")
    sa = user.rsplit(":", 1)[1]
    kubeconfig = service_account_kubeconfig(
        control_plane, namespace, sa, tmp_path / "sa.kubeconfig"
    )
    as_sa = dataclasses.replace(control_plane, kubeconfig=str(kubeconfig))
    # The identity really is the ServiceAccount, not the admin.
    who = as_sa.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}").stdout
    assert who == user

    admin = await KubeClient.connect(control_plane.kubeconfig)
    controller = ControllerProcess(as_sa, namespace, tmp_path / "controller.log")
    controller.start()
    try:
        ns = namespace
        await apply_all(
            admin,
            issuer(ns),
            backend_service(ns),
            backend_pod(ns),
            protected_service(ns, identityAssertion={"enabled": True}),
            route_grant(ns, "deploy"),
        )
        for ref, name in [
            (DEPLOYMENTS, "nhigate-api"),
            (NETWORKPOLICIES, "nhigate-api-isolation"),
            (ROLES, "nhigate-api"),
            (SECRETS, "nhigate-api-assertion-key"),
            (CONFIGMAPS, "nhigate-api-policy"),
        ]:
            await eventually(
                lambda r=ref, n=name: admin.get(r, n, ns), what=f"{name}", controller=controller
            )

        async def accepted() -> dict[str, Any] | None:
            grant = await admin.get(ROUTEGRANTS, "deploy", ns)
            conditions = ((grant or {}).get("status") or {}).get("conditions") or []
            ok = any(c["type"] == "Accepted" and c["status"] == "True" for c in conditions)
            return grant if ok else None

        await eventually(accepted, what="RouteGrant Accepted", controller=controller)
        ps = await admin.get(PROTECTEDSERVICES, "api", ns)
        assert ps is not None
        assert ps["status"]["policyVersion"]
    finally:
        controller.stop()
        await admin.close()
    log = (tmp_path / "controller.log").read_text(errors="replace")
    denied_markers = ("forbidden", "not enough permissions")
    forbidden = [
        line for line in log.splitlines() if any(m in line.lower() for m in denied_markers)
    ]
    assert not forbidden, "\n".join(forbidden[:20])
