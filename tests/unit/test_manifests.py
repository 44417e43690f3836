"""Manifest builders: names, labels, owner references and the specs the API server will get.

Table-driven over every builder; then focused checks of the parts that carry
security or availability promises (RBAC, pod security, rollout, isolation).
"""

from __future__ import annotations

import base64
import gzip
import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from nhigate.api.compile import compile_service
from nhigate.api.models import ProtectedService
from nhigate.controller import manifests as m
from nhigate.controller.bypass import find_bypass_paths

UID = "0b7c6f1e-2f4a-4d7e-9a51-3c1d2e4f5a6b"
LABELS = {
    "app.kubernetes.io/name": "nhigate-proxy",
    "app.kubernetes.io/instance": "pay",
    "app.kubernetes.io/managed-by": "nhigate",
    "nhigate.io/protected-service": "pay",
}


def make_ps(name: str = "pay", **spec: Any) -> ProtectedService:
    body: dict[str, Any] = {"backend": {"service": "payments", "port": 80}, "issuers": ["ci"]}
    body.update(spec)
    return ProtectedService.model_validate(
        {
            "apiVersion": "nhigate.io/v1alpha1",
            "kind": "ProtectedService",
            "metadata": {"name": name, "namespace": "shop", "uid": UID},
            "spec": body,
        }
    )


def with_autoscaling(ps: ProtectedService) -> ProtectedService:
    manifest = ps.manifest()
    manifest["spec"].setdefault("proxy", {})["autoscaling"] = {"maxReplicas": 5}
    return ProtectedService.model_validate(manifest)


FULL = make_ps(
    proxy={
        "replicas": 3,
        "port": 8443,
        "adminPort": 9090,
        "tls": {"secretName": "pay-tls", "clientCASecretName": "pay-ca"},
        "resources": {"requests": {"cpu": "250m"}, "limits": {"cpu": 1, "memory": "512Mi"}},
    },
    upstreamCredential={"secretName": "pay-backend", "key": "token", "prefix": "Bearer "},
    identityAssertion={"enabled": True},
    isolation={
        "mode": "Enforce",
        "allowFrom": [
            {"namespaceSelector": {"matchLabels": {"team": "sre"}}},
            {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]}},
        ],
    },
)
MINIMAL = make_ps()

BUILDERS: list[tuple[str, Callable[[ProtectedService], dict[str, Any] | None], str, str, str]] = [
    ("serviceaccount", m.build_service_account, "v1", "ServiceAccount", "nhigate-pay"),
    ("role", m.build_role, "rbac.authorization.k8s.io/v1", "Role", "nhigate-pay"),
    (
        "rolebinding",
        m.build_role_binding,
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
        "nhigate-pay",
    ),
    (
        "policy",
        lambda ps: m.build_policy_configmap(ps, b'{"version":"v1"}', "v1"),
        "v1",
        "ConfigMap",
        "nhigate-pay-policy",
    ),
    (
        "deployment",
        lambda ps: m.build_proxy_deployment(ps, image="nhigate:dev", policy_version="v1"),
        "apps/v1",
        "Deployment",
        "nhigate-pay",
    ),
    ("service", m.build_proxy_service, "v1", "Service", "nhigate-pay"),
    ("pdb", m.build_pod_disruption_budget, "policy/v1", "PodDisruptionBudget", "nhigate-pay"),
    (
        "hpa",
        lambda ps: m.build_hpa(with_autoscaling(ps)),
        "autoscaling/v2",
        "HorizontalPodAutoscaler",
        "nhigate-pay",
    ),
    (
        "isolation",
        lambda ps: m.build_isolation_network_policy(ps, {"app": "payments"}, "http"),
        "networking.k8s.io/v1",
        "NetworkPolicy",
        "nhigate-pay-isolation",
    ),
    (
        "jwks",
        lambda ps: m.build_assertion_jwks_configmap(ps, {"keys": []}),
        "v1",
        "ConfigMap",
        "nhigate-pay-assertion-jwks",
    ),
    (
        "assertion-key",
        lambda ps: m.build_assertion_key_secret(ps, b"-----BEGIN PRIVATE KEY-----\n"),
        "v1",
        "Secret",
        "nhigate-pay-assertion-key",
    ),
]


@pytest.mark.parametrize(
    ("builder", "api_version", "kind", "name"),
    [b[1:] for b in BUILDERS],
    ids=[b[0] for b in BUILDERS],
)
def test_every_object_is_named_labelled_and_owned(
    builder: Callable[[ProtectedService], dict[str, Any] | None],
    api_version: str,
    kind: str,
    name: str,
) -> None:
    obj = builder(FULL)
    assert obj is not None
    assert (obj["apiVersion"], obj["kind"]) == (api_version, kind)
    meta = obj["metadata"]
    assert (meta["name"], meta["namespace"]) == (name, "shop")
    assert meta["labels"] == LABELS
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "nhigate.io/v1alpha1",
            "kind": "ProtectedService",
            "name": "pay",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    json.dumps(obj)  # plain JSON, ready for server-side apply


_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def test_the_longest_allowed_name_yields_valid_object_names() -> None:
    ps = make_ps("p" * 55, identityAssertion={})
    for _, builder, _, kind, _ in BUILDERS:
        obj = builder(ps)
        assert obj is not None
        name = obj["metadata"]["name"]
        assert _DNS1123_SUBDOMAIN.fullmatch(name), name
        assert len(name) <= 253, name
        if kind in {"Service", "Deployment", "ServiceAccount", "Role", "RoleBinding"}:
            assert _DNS1035_LABEL.fullmatch(name), (kind, name)
            assert len(name) <= 63, (kind, name)
        assert all(len(v) <= 63 for v in obj["metadata"]["labels"].values())


def test_owner_reference_needs_a_uid() -> None:
    ps = MINIMAL.model_copy(update={"metadata": MINIMAL.metadata.model_copy(update={"uid": None})})
    with pytest.raises(ValueError, match="uid"):
        m.owner_reference(ps)


def test_role_grants_only_the_policy_configmap_and_leases() -> None:
    assert m.build_role(MINIMAL)["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["nhigate-pay-policy"],
            "verbs": ["get", "list", "watch"],
        },
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["create", "get", "update", "patch"],
        },
    ]


def test_role_binding_binds_the_proxy_service_account() -> None:
    rb = m.build_role_binding(MINIMAL)
    assert rb["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "nhigate-pay",
    }
    assert rb["subjects"] == [
        {"kind": "ServiceAccount", "name": "nhigate-pay", "namespace": "shop"}
    ]


def test_policy_configmap_carries_packed_document_and_version() -> None:
    packed = gzip.compress(b'{"grants":[],"version":"sha256:abc"}', mtime=0)
    cm = m.build_policy_configmap(MINIMAL, packed, "sha256:abc")
    assert "data" not in cm
    assert base64.b64decode(cm["binaryData"]["policy.json.gz"]) == packed
    assert cm["metadata"]["annotations"] == {"nhigate.io/policy-version": "sha256:abc"}


def test_policy_configmap_refuses_a_document_too_big_even_packed() -> None:
    with pytest.raises(ValueError, match="ConfigMap holds less than"):
        m.build_policy_configmap(MINIMAL, b"x" * (800 * 1024), "v")


def container_of(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


ARG_CASES: list[tuple[str, ProtectedService, list[str]]] = [
    (
        "minimal",
        MINIMAL,
        [
            "proxy", "--kube", "--namespace", "shop", "--policy-configmap", "nhigate-pay-policy",
            "--replica-name", "$(POD_NAME)", "--upstream", "http://payments.shop.svc:80",
            "--http1-server", "native",
            "--listen", "0.0.0.0:8443", "--admin-listen", "0.0.0.0:9090",
            "--shutdown-delay", "5",
            "--request-head-timeout", "60", "--idle-timeout", "75", "--max-connections", "4096",
        ],
    ),
    (
        "full",
        FULL,
        [
            "proxy", "--kube", "--namespace", "shop", "--policy-configmap", "nhigate-pay-policy",
            "--replica-name", "$(POD_NAME)", "--upstream", "http://payments.shop.svc:80",
            "--http1-server", "native",
            "--listen", "0.0.0.0:8443", "--admin-listen", "0.0.0.0:9090",
            "--shutdown-delay", "5",
            "--request-head-timeout", "60", "--idle-timeout", "75", "--max-connections", "4096",
            "--assertion-key", "/var/run/nhigate/assertion/key.pem",
            "--tls-cert", "/var/run/nhigate/tls/tls.crt",
            "--tls-key", "/var/run/nhigate/tls/tls.key",
            "--client-ca", "/var/run/nhigate/client-ca/ca.crt",
        ],
    ),
    (
        "assertion disabled, custom ports",
        make_ps(identityAssertion={"enabled": False}, proxy={"port": 8080, "adminPort": 8081}),
        [
            "proxy", "--kube", "--namespace", "shop", "--policy-configmap", "nhigate-pay-policy",
            "--replica-name", "$(POD_NAME)", "--upstream", "http://payments.shop.svc:80",
            "--http1-server", "native",
            "--listen", "0.0.0.0:8080", "--admin-listen", "0.0.0.0:8081",
            "--shutdown-delay", "5",
            "--request-head-timeout", "60", "--idle-timeout", "75", "--max-connections", "4096",
        ],
    ),
    (
        "client connection limits",
        make_ps(
            proxy={
                "connections": {
                    "requestHeadTimeout": "1m30s",
                    "idleTimeout": "1500ms",
                    "maxConnections": 100,
                }
            }
        ),
        [
            "proxy", "--kube", "--namespace", "shop", "--policy-configmap", "nhigate-pay-policy",
            "--replica-name", "$(POD_NAME)", "--upstream", "http://payments.shop.svc:80",
            "--http1-server", "native",
            "--listen", "0.0.0.0:8443", "--admin-listen", "0.0.0.0:9090",
            "--shutdown-delay", "5",
            "--request-head-timeout", "90", "--idle-timeout", "1.5", "--max-connections", "100",
        ],
    ),
]  # fmt: skip


def test_connection_defaults_are_the_proxys_own() -> None:
    """An unset `spec.proxy.connections` runs the proxy exactly as `nhigate proxy` defaults."""
    from nhigate.cli.main import build_parser
    from nhigate.cli.proxy import settings_from_args
    from nhigate.proxy.settings import ProxySettings

    args = m.proxy_args(MINIMAL)
    passed = settings_from_args(build_parser("proxy").parse_args(args))
    defaults = settings_from_args(
        build_parser("proxy").parse_args(["proxy", "--upstream", "http://x"])
    )
    for name in ("request_head_timeout", "idle_timeout", "max_connections"):
        assert getattr(passed, name) == getattr(defaults, name), name
        assert getattr(defaults, name) == ProxySettings.__dataclass_fields__[name].default, name


@pytest.mark.parametrize(("ps", "args"), [c[1:] for c in ARG_CASES], ids=[c[0] for c in ARG_CASES])
def test_proxy_command_line(ps: ProtectedService, args: list[str]) -> None:
    container = container_of(m.build_proxy_deployment(ps, image="img", policy_version="v1"))
    assert container["command"] == ["nhigate"]
    assert container["args"] == args
    assert {
        "name": "POD_NAME",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    } in container["env"]


MOUNT_CASES: list[tuple[str, ProtectedService, dict[str, tuple[str, str, list[str]]]]] = [
    ("minimal", MINIMAL, {}),
    (
        "full",
        FULL,
        {
            "assertion-key": (
                "/var/run/nhigate/assertion",
                "nhigate-pay-assertion-key",
                ["key.pem"],
            ),
            "upstream-credential": (
                "/var/run/nhigate/upstream-credential",
                "pay-backend",
                ["token"],
            ),
            "tls": ("/var/run/nhigate/tls", "pay-tls", ["tls.crt", "tls.key"]),
            "client-ca": ("/var/run/nhigate/client-ca", "pay-ca", ["ca.crt"]),
        },
    ),
    (
        "tls without client CA",
        make_ps(proxy={"tls": {"secretName": "t"}}),
        {"tls": ("/var/run/nhigate/tls", "t", ["tls.crt", "tls.key"])},
    ),
]


@pytest.mark.parametrize(
    ("ps", "secrets"), [c[1:] for c in MOUNT_CASES], ids=[c[0] for c in MOUNT_CASES]
)
def test_volumes_and_mounts(
    ps: ProtectedService, secrets: dict[str, tuple[str, str, list[str]]]
) -> None:
    deployment = m.build_proxy_deployment(ps, image="img", policy_version="v1")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {v["name"]: v for v in container_of(deployment)["volumeMounts"]}
    assert volumes.keys() == mounts.keys() == {"tmp", *secrets}
    assert "emptyDir" in volumes["tmp"]
    assert mounts["tmp"]["mountPath"] == "/tmp"
    for name, (path, secret, keys) in secrets.items():
        assert mounts[name] == {"name": name, "mountPath": path, "readOnly": True}
        assert volumes[name]["secret"]["secretName"] == secret
        assert volumes[name]["secret"]["items"] == [{"key": k, "path": k} for k in keys]
        assert volumes[name]["secret"]["defaultMode"] & 0o007 == 0  # never world-readable


def test_upstream_credential_file_in_the_policy_is_the_mounted_one() -> None:
    """The document's `value_file` (api.compile) names the file the Deployment mounts."""
    credential = compile_service(FULL).upstream_credential
    assert credential is not None
    assert credential.value_file == "/var/run/nhigate/upstream-credential/token"
    deployment = m.build_proxy_deployment(FULL, image="img", policy_version="v1")
    mounts = {v["name"]: v for v in container_of(deployment)["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    directory, _, key = credential.value_file.rpartition("/")
    assert mounts["upstream-credential"]["mountPath"] == directory
    assert volumes["upstream-credential"]["secret"]["items"] == [{"key": key, "path": key}]
    assert compile_service(MINIMAL).upstream_credential is None


def test_pod_runs_restricted() -> None:
    deployment = m.build_proxy_deployment(FULL, image="img", policy_version="v1")
    pod = deployment["spec"]["template"]["spec"]
    container = container_of(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is True
    assert pod["serviceAccountName"] == "nhigate-pay"
    assert "hostNetwork" not in pod


def test_probes_on_the_admin_port() -> None:
    container = container_of(m.build_proxy_deployment(MINIMAL, image="img", policy_version="v1"))
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/readyz",
        "port": "admin",
        "scheme": "HTTP",
    }
    assert container["livenessProbe"]["httpGet"] == {
        "path": "/healthz",
        "port": "admin",
        "scheme": "HTTP",
    }
    assert container["ports"] == [
        {"name": "proxy", "containerPort": 8443, "protocol": "TCP"},
        {"name": "admin", "containerPort": 9090, "protocol": "TCP"},
    ]


def test_rollout_never_drops_below_ready_count_and_spreads_over_nodes() -> None:
    spec = m.build_proxy_deployment(FULL, image="img", policy_version="v1")["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert spec["selector"] == {"matchLabels": LABELS}
    assert spec["template"]["metadata"]["labels"] == LABELS
    (term,) = spec["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"] == {
        "labelSelector": {"matchLabels": LABELS},
        "topologyKey": "kubernetes.io/hostname",
    }


def test_policy_version_never_touches_the_pod_template() -> None:
    a = m.build_proxy_deployment(FULL, image="img", policy_version="v1")
    b = m.build_proxy_deployment(FULL, image="img", policy_version="v2")
    assert a["spec"]["template"] == b["spec"]["template"]
    assert a["metadata"]["annotations"] == {"nhigate.io/policy-version": "v1"}
    assert "v1" not in json.dumps(a["spec"])


@pytest.mark.parametrize(
    ("ps", "resources"),
    [
        (MINIMAL, {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}),
        (FULL, {"requests": {"cpu": "250m"}, "limits": {"cpu": 1, "memory": "512Mi"}}),
    ],
    ids=["defaults", "from-spec"],
)
def test_resources(ps: ProtectedService, resources: dict[str, Any]) -> None:
    assert (
        container_of(m.build_proxy_deployment(ps, image="img", policy_version="v"))["resources"]
        == resources
    )


def test_image_override_and_autoscaled_replicas() -> None:
    ps = make_ps(
        proxy={
            "image": "registry.example/nhigate:1.2",
            "autoscaling": {"minReplicas": 2, "maxReplicas": 7},
        }
    )
    deployment = m.build_proxy_deployment(ps, image="default", policy_version="v")
    assert container_of(deployment)["image"] == "registry.example/nhigate:1.2"
    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count
    assert (
        container_of(m.build_proxy_deployment(MINIMAL, image="default", policy_version="v"))[
            "image"
        ]
        == "default"
    )


def test_proxy_service() -> None:
    svc = m.build_proxy_service(FULL)
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == LABELS
    assert [
        (p["name"], p["port"], p["targetPort"], p["appProtocol"]) for p in svc["spec"]["ports"]
    ] == [
        ("proxy", 8443, "proxy", "https"),
        ("admin", 9090, "admin", "http"),
    ]
    assert m.proxy_endpoint(FULL) == "https://nhigate-pay.shop.svc:8443"
    assert m.proxy_endpoint(MINIMAL) == "http://nhigate-pay.shop.svc:8443"


@pytest.mark.parametrize("replicas", [0, 1, 2, 5])
def test_pdb_allows_one_disruption_at_any_size(replicas: int) -> None:
    spec = m.build_pod_disruption_budget(make_ps(proxy={"replicas": replicas}))["spec"]
    assert spec == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": LABELS},
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }


def test_hpa_only_with_autoscaling() -> None:
    assert m.build_hpa(MINIMAL) is None
    hpa = m.build_hpa(
        make_ps(
            proxy={
                "autoscaling": {
                    "minReplicas": 2,
                    "maxReplicas": 6,
                    "targetCPUUtilizationPercentage": 70,
                }
            }
        )
    )
    assert hpa is not None
    assert hpa["spec"] == {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "nhigate-pay"},
        "minReplicas": 2,
        "maxReplicas": 6,
        "metrics": [
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 70},
                },
            }
        ],
    }


def test_isolation_policy_admits_proxy_and_allow_from_on_the_target_port() -> None:
    np = m.build_isolation_network_policy(FULL, {"app": "payments"}, 8080)
    assert np is not None
    assert np["spec"] == {
        "podSelector": {"matchLabels": {"app": "payments"}},
        "policyTypes": ["Ingress"],
        "ingress": [
            {
                "from": [
                    {"podSelector": {"matchLabels": LABELS}},
                    {"namespaceSelector": {"matchLabels": {"team": "sre"}}},
                    {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]}},
                ],
                "ports": [{"protocol": "TCP", "port": 8080}],
            }
        ],
    }


@pytest.mark.parametrize("mode", ["Audit", "Off"])
def test_isolation_policy_only_in_enforce_mode(mode: str) -> None:
    assert (
        m.build_isolation_network_policy(make_ps(isolation={"mode": mode}), {"app": "x"}, 80)
        is None
    )


def test_isolation_policy_refuses_an_empty_backend_selector() -> None:
    with pytest.raises(ValueError, match="no selector"):
        m.build_isolation_network_policy(MINIMAL, {}, 80)


def test_our_isolation_policy_leaves_no_bypass_path() -> None:
    """The builder and the analysis agree: our own policy (with allowFrom) opens nothing."""
    np = m.build_isolation_network_policy(FULL, {"app": "payments"}, "http")
    assert np is not None
    backend_pod = {
        "metadata": {"name": "payments-0", "namespace": "shop", "labels": {"app": "payments"}},
        "spec": {
            "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]
        },
    }
    backend_svc = {
        "metadata": {"name": "payments", "namespace": "shop"},
        "spec": {"selector": {"app": "payments"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }
    common: dict[str, Any] = {
        "ps_namespace": "shop",
        "backend_service": backend_svc,
        "backend_pods": [backend_pod],
        "proxy_pod_labels": m.proxy_labels(FULL),
        "isolation_policy_name": m.isolation_policy_name(FULL),
        "services": [backend_svc],
        "ingresses": [],
        "http_routes": [],
        "namespaces": [],
        "backend_port": 80,
    }
    assert (
        find_bypass_paths(allow_from=m.allow_from_peers(FULL), network_policies=[np], **common)
        == []
    )
    # Without allowFrom being trusted, its broad peers are reported.
    assert len(find_bypass_paths(allow_from=[], network_policies=[np], **common)) == 2


def test_assertion_key_secret_and_jwks() -> None:
    pem = b"-----BEGIN PRIVATE KEY-----\nMIG\n-----END PRIVATE KEY-----\n"
    secret = m.build_assertion_key_secret(MINIMAL, pem)
    assert secret["type"] == "Opaque"
    assert base64.b64decode(secret["data"]["key.pem"]) == pem
    assert "stringData" not in secret
    jwks = {"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "kid": "k1"}]}
    cm = m.build_assertion_jwks_configmap(MINIMAL, jwks)
    assert json.loads(cm["data"]["jwks.json"]) == jwks


@pytest.mark.parametrize(
    ("assertion", "enabled"),
    [(None, False), ({}, True), ({"enabled": True}, True), ({"enabled": False}, False)],
)
def test_assertion_enabled(assertion: dict[str, Any] | None, enabled: bool) -> None:
    ps = make_ps(identityAssertion=assertion) if assertion is not None else MINIMAL
    assert m.assertion_enabled(ps) is enabled
