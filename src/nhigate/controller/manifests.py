"""Pure builders of everything the controller creates for a ProtectedService.

Each builder returns a plain dict ready for server-side apply (apiVersion,
kind, metadata with name, namespace, labels and a controller ownerReference to
the ProtectedService). Names and labels: docs/architecture.md, "What the controller
creates per ProtectedService". Nothing here talks to the API server; the reconcile
handlers call these and apply the result with field manager `nhigate`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from nhigate.api.compile import UPSTREAM_CREDENTIAL_DIR
from nhigate.api.models import (
    API_VERSION,
    BackendProtocol,
    IsolationMode,
    ProtectedService,
    parse_duration,
)

Manifest = dict[str, Any]

MANAGED_BY = "nhigate"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PROTECTED_SERVICE = "nhigate.io/protected-service"
PROXY_APP_NAME = "nhigate-proxy"

POLICY_KEY = "policy.json.gz"
"""ConfigMap key holding the encoded PolicyDocument."""
PROXY_SHUTDOWN_DELAY_SECONDS = 5
"""`--shutdown-delay`: seconds a terminating proxy stays up, unready, before it stops listening."""
POLICY_VERSION_ANNOTATION = "nhigate.io/policy-version"
ASSERTION_KEY_FILE = "key.pem"
JWKS_KEY = "jwks.json"

PROXY_CONTAINER = "proxy"
PROXY_PORT_NAME = "proxy"
ADMIN_PORT_NAME = "admin"
RUN_DIR = "/var/run/nhigate"
ASSERTION_DIR = f"{RUN_DIR}/assertion"
TLS_DIR = f"{RUN_DIR}/tls"
CLIENT_CA_DIR = f"{RUN_DIR}/client-ca"
PROXY_UID = 65532
"""Numeric non-root user (distroless `nonroot`): `runAsNonRoot` needs a numeric UID to verify."""
CONFIGMAP_MAX_BYTES = 1024 * 1024
"""etcd's per-object limit for a ConfigMap's data."""

DEFAULT_RESOURCES: Mapping[str, Mapping[str, str]] = {
    "requests": {"cpu": "100m", "memory": "64Mi"},
    "limits": {"memory": "256Mi"},
}
"""Used when `spec.proxy.resources` is unset; a CPU request keeps the HPA working."""

_SECRET_MODE = 0o440  # readable by the fsGroup only, never world-readable


# --- names and labels -----------------------------------------------------------------


def resource_name(ps: ProtectedService) -> str:
    """`nhigate-X`: ServiceAccount, Role, RoleBinding, Deployment, Service, PDB and HPA."""
    return f"nhigate-{ps.name}"


def policy_configmap_name(ps: ProtectedService) -> str:
    """`nhigate-X-policy`: the compiled policy the proxy watches."""
    return f"nhigate-{ps.name}-policy"


def isolation_policy_name(ps: ProtectedService) -> str:
    """`nhigate-X-isolation`: the NetworkPolicy fencing the backend pods."""
    return f"nhigate-{ps.name}-isolation"


def assertion_key_secret_name(ps: ProtectedService) -> str:
    """`nhigate-X-assertion-key`: the proxy's identity-assertion signing key."""
    return f"nhigate-{ps.name}-assertion-key"


def assertion_jwks_configmap_name(ps: ProtectedService) -> str:
    """`nhigate-X-assertion-jwks`: public assertion keys, for backends to verify."""
    return f"nhigate-{ps.name}-assertion-jwks"


def proxy_labels(ps: ProtectedService) -> dict[str, str]:
    """Labels on every object for `ps`, and the proxy pods' selector."""
    return {
        LABEL_NAME: PROXY_APP_NAME,
        LABEL_INSTANCE: ps.name,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_PROTECTED_SERVICE: ps.name,
    }


def assertion_enabled(ps: ProtectedService) -> bool:
    """True when the proxy signs identity assertions (`identityAssertion` set and enabled)."""
    return ps.spec.identity_assertion is not None and ps.spec.identity_assertion.enabled


def upstream_url(ps: ProtectedService) -> str:
    """The backend Service URL the proxy forwards to (cluster DNS)."""
    backend = ps.spec.backend
    return f"http://{backend.service}.{ps.namespace}.svc:{backend.port}"


def allow_from_peers(ps: ProtectedService) -> list[dict[str, Any]]:
    """`spec.isolation.allowFrom` as NetworkPolicyPeer dicts (isolation policy, bypass analysis)."""
    return [
        peer.model_dump(mode="json", by_alias=True, exclude_none=True)
        for peer in ps.spec.isolation.allow_from
    ]


def owner_reference(ps: ProtectedService) -> dict[str, Any]:
    """A controller ownerReference to `ps`, so garbage collection removes what we create."""
    if not ps.metadata.uid:
        raise ValueError(f"ProtectedService {ps.key} has no metadata.uid; cannot own objects")
    return {
        "apiVersion": API_VERSION,
        "kind": "ProtectedService",
        "name": ps.name,
        "uid": ps.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(
    ps: ProtectedService, name: str, annotations: Mapping[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": ps.namespace,
        "labels": proxy_labels(ps),
        "ownerReferences": [owner_reference(ps)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


# --- identity and RBAC ----------------------------------------------------------------


def build_service_account(ps: ProtectedService) -> Manifest:
    """The proxy's ServiceAccount."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(ps, resource_name(ps)),
    }


def build_role(ps: ProtectedService) -> Manifest:
    """Exactly what the proxy needs: watch its own policy ConfigMap, report through Leases.

    `list`/`watch` with `resourceNames` are only authorised for requests carrying
    `fieldSelector=metadata.name=<name>`, which is how the proxy watches.
    Lease `create` cannot be limited by name (the name is not known before creation).
    """
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(ps, resource_name(ps)),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [policy_configmap_name(ps)],
                "verbs": ["get", "list", "watch"],
            },
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "verbs": ["create", "get", "update", "patch"],
            },
        ],
    }


def build_role_binding(ps: ProtectedService) -> Manifest:
    """Binds the proxy Role to the proxy ServiceAccount."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(ps, resource_name(ps)),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": resource_name(ps),
        },
        "subjects": [
            {"kind": "ServiceAccount", "name": resource_name(ps), "namespace": ps.namespace}
        ],
    }


# --- policy and assertion keys --------------------------------------------------------


def build_policy_configmap(ps: ProtectedService, packed_document: bytes, version: str) -> Manifest:
    """The compiled policy: `binaryData["policy.json.gz"]` (from `pack_document`) and the
    annotation `nhigate.io/policy-version`.

    Gzip keeps a 10k-grant document (~3 MiB of JSON) well inside a ConfigMap. Raises
    `ValueError` when even the packed document would not fit.
    """
    encoded = base64.b64encode(packed_document).decode("ascii")
    if len(encoded) >= CONFIGMAP_MAX_BYTES:
        raise ValueError(
            f"compiled policy for {ps.key} is {len(encoded)} bytes packed; "
            f"a ConfigMap holds less than {CONFIGMAP_MAX_BYTES}"
        )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(ps, policy_configmap_name(ps), {POLICY_VERSION_ANNOTATION: version}),
        "binaryData": {POLICY_KEY: encoded},
    }


def build_assertion_jwks_configmap(ps: ProtectedService, jwks: Mapping[str, Any]) -> Manifest:
    """Public identity-assertion keys (`jwks.json`) for backends to verify assertions."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(ps, assertion_jwks_configmap_name(ps)),
        "data": {JWKS_KEY: json.dumps(dict(jwks), sort_keys=True, separators=(",", ":"))},
    }


def build_assertion_key_secret(ps: ProtectedService, pem: bytes) -> Manifest:
    """The proxy's assertion signing key (`key.pem`, PEM private key).

    Uses `data` (base64), not `stringData`: `stringData` is write-only and does not
    round-trip through server-side apply.
    """
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(ps, assertion_key_secret_name(ps)),
        "type": "Opaque",
        "data": {ASSERTION_KEY_FILE: base64.b64encode(pem).decode("ascii")},
    }


# --- the proxy workload ---------------------------------------------------------------


UPSTREAM_PROTOCOL_FLAGS: Mapping[BackendProtocol, str] = {
    BackendProtocol.HTTP1: "http1",
    BackendProtocol.HTTP2: "http2",
}
"""`--upstream-protocol` value of each backend protocol (docs/proxy.md#http2-and-grpc)."""
H2C_APP_PROTOCOL = "kubernetes.io/h2c"
"""`appProtocol` of a plaintext HTTP/2 port (Kubernetes' standard name)."""


def proxy_args(
    ps: ProtectedService, protocol: BackendProtocol = BackendProtocol.HTTP1
) -> list[str]:
    """`nhigate proxy --kube ...` arguments (docs/architecture.md, "What the controller creates").

    `protocol` is the backend's, as resolved (`controller/protocols.py`). An HTTP/1.1 backend
    is served by the native HTTP/1.1 front end (`proxy/http1.py`, about 1.5x the requests per
    core of aiohttp's web layer) unless the service declares WebSocket paths or MCP endpoints,
    which only the aiohttp front end serves (native answers them 501)."""
    proxy = ps.spec.proxy
    args = [
        "proxy",
        "--kube",
        "--namespace",
        ps.namespace,
        "--policy-configmap",
        policy_configmap_name(ps),
        "--replica-name",
        "$(POD_NAME)",
        "--upstream",
        upstream_url(ps),
        *_protocol_args(protocol),
        *_front_end_args(ps, protocol),
        "--listen",
        f"0.0.0.0:{proxy.port}",
        "--admin-listen",
        f"0.0.0.0:{proxy.admin_port}",
        # Unready first, then close: endpoints stop routing to the pod before it stops
        # listening, so a rollout drops no connection (well inside the 30 s grace period).
        "--shutdown-delay",
        str(PROXY_SHUTDOWN_DELAY_SECONDS),
        *_connection_args(ps),
    ]
    if assertion_enabled(ps):
        args += ["--assertion-key", f"{ASSERTION_DIR}/{ASSERTION_KEY_FILE}"]
    if proxy.tls is not None:
        args += ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
        if proxy.tls.client_ca_secret_name is not None:
            args += ["--client-ca", f"{CLIENT_CA_DIR}/ca.crt"]
    return args


def _protocol_args(protocol: BackendProtocol) -> list[str]:
    if protocol == BackendProtocol.HTTP1:
        return []  # the proxy's default
    return ["--upstream-protocol", UPSTREAM_PROTOCOL_FLAGS[protocol]]


def _front_end_args(ps: ProtectedService, protocol: BackendProtocol) -> list[str]:
    """`--http1-server native` where it serves everything the service declares."""
    if (
        protocol != BackendProtocol.HTTP1
        or ps.spec.websocket is not None
        or ps.spec.mcp is not None
    ):
        return []  # HTTP/2 has its own front end; WebSocket and MCP need aiohttp's
    return ["--http1-server", "native"]


def _connection_args(ps: ProtectedService) -> list[str]:
    """`spec.proxy.connections` as proxy flags (seconds), always passed: the pod says them."""
    connections = ps.spec.proxy.connections

    def seconds(duration: str) -> str:
        return f"{parse_duration(duration).total_seconds():g}"

    return [
        "--request-head-timeout",
        seconds(connections.request_head_timeout),
        "--idle-timeout",
        seconds(connections.idle_timeout),
        "--max-connections",
        str(connections.max_connections),
    ]


def _secret_volume(name: str, secret_name: str, keys: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "secret": {
            "secretName": secret_name,
            "defaultMode": _SECRET_MODE,
            "items": [{"key": k, "path": k} for k in keys],
        },
    }


def _volumes_and_mounts(ps: ProtectedService) -> tuple[list[Any], list[Any]]:
    volumes: list[Any] = [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]
    mounts: list[Any] = [{"name": "tmp", "mountPath": "/tmp"}]  # noqa: S108 - the pod's own emptyDir

    def add_secret(name: str, secret_name: str, keys: list[str], path: str) -> None:
        volumes.append(_secret_volume(name, secret_name, keys))
        mounts.append({"name": name, "mountPath": path, "readOnly": True})

    if assertion_enabled(ps):
        add_secret(
            "assertion-key", assertion_key_secret_name(ps), [ASSERTION_KEY_FILE], ASSERTION_DIR
        )
    cred = ps.spec.upstream_credential
    if cred is not None:
        add_secret("upstream-credential", cred.secret_name, [cred.key], UPSTREAM_CREDENTIAL_DIR)
    tls = ps.spec.proxy.tls
    if tls is not None:
        add_secret("tls", tls.secret_name, ["tls.crt", "tls.key"], TLS_DIR)
        if tls.client_ca_secret_name is not None:
            add_secret("client-ca", tls.client_ca_secret_name, ["ca.crt"], CLIENT_CA_DIR)
    return volumes, mounts


def _resources(ps: ProtectedService) -> dict[str, Any]:
    spec = ps.spec.proxy.resources
    if spec is None:
        return {k: dict(v) for k, v in DEFAULT_RESOURCES.items()}
    dumped: dict[str, Any] = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    return {k: v for k, v in dumped.items() if v}


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": ADMIN_PORT_NAME, "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def build_proxy_deployment(
    ps: ProtectedService,
    *,
    image: str,
    policy_version: str,
    image_pull_policy: str = "IfNotPresent",
    protocol: BackendProtocol = BackendProtocol.HTTP1,
) -> Manifest:
    """The proxy Deployment.

    `image` is used unless `spec.proxy.image` is set; `image_pull_policy` applies to either
    (a node with locally imported images needs IfNotPresent or Never). `protocol` is the
    backend's, as resolved (see `proxy_args`). `policy_version` goes on
    the Deployment's own annotations only: the pod template never changes with
    the policy, because the proxies hot-reload it through the API (a rollout per
    grant change would be slow and disruptive). Replicas are left to the HPA
    when `proxy.autoscaling` is set.
    """
    proxy = ps.spec.proxy
    labels = proxy_labels(ps)
    volumes, mounts = _volumes_and_mounts(ps)
    container: dict[str, Any] = {
        "name": PROXY_CONTAINER,
        "image": proxy.image or image,
        "imagePullPolicy": image_pull_policy,
        "command": ["nhigate"],
        "args": proxy_args(ps, protocol),
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
        ],
        "ports": [
            {"name": PROXY_PORT_NAME, "containerPort": proxy.port, "protocol": "TCP"},
            {"name": ADMIN_PORT_NAME, "containerPort": proxy.admin_port, "protocol": "TCP"},
        ],
        "readinessProbe": _probe("/readyz", period=2, failures=2),
        "livenessProbe": {**_probe("/healthz", period=10, failures=3), "initialDelaySeconds": 5},
        "resources": _resources(ps),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }
    spec: dict[str, Any] = {
        "selector": {"matchLabels": labels},
        "revisionHistoryLimit": 5,
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        },
        "template": {
            "metadata": {"labels": labels},
            "spec": {
                "serviceAccountName": resource_name(ps),
                "automountServiceAccountToken": True,  # the proxy watches its policy via the API
                "enableServiceLinks": False,
                "terminationGracePeriodSeconds": 30,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": PROXY_UID,
                    "runAsGroup": PROXY_UID,
                    "fsGroup": PROXY_UID,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "affinity": {
                    "podAntiAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {
                                "weight": 100,
                                "podAffinityTerm": {
                                    "labelSelector": {"matchLabels": labels},
                                    "topologyKey": "kubernetes.io/hostname",
                                },
                            }
                        ]
                    }
                },
                "containers": [container],
                "volumes": volumes,
            },
        },
    }
    if proxy.autoscaling is None:
        spec = {"replicas": proxy.replicas, **spec}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(ps, resource_name(ps), {POLICY_VERSION_ANNOTATION: policy_version}),
        "spec": spec,
    }


def build_proxy_service(
    ps: ProtectedService, protocol: BackendProtocol = BackendProtocol.HTTP1
) -> Manifest:
    """ClusterIP Service for the proxy: `proxy.port` and the admin port (named `admin`).

    The proxy port's `appProtocol` tells meshes and ingresses in front what it speaks: with an
    HTTP/2 backend the proxy speaks HTTP/2 only, so a plaintext port is `kubernetes.io/h2c`; a
    TLS port stays `https` (ALPN negotiates `h2`)."""
    proxy = ps.spec.proxy
    app_protocol = "https" if proxy.tls is not None else "http"
    if protocol == BackendProtocol.HTTP2 and proxy.tls is None:
        app_protocol = H2C_APP_PROTOCOL
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ps, resource_name(ps)),
        "spec": {
            "type": "ClusterIP",
            "selector": proxy_labels(ps),
            "ports": [
                {
                    "name": PROXY_PORT_NAME,
                    "port": proxy.port,
                    "targetPort": PROXY_PORT_NAME,
                    "protocol": "TCP",
                    "appProtocol": app_protocol,
                },
                {
                    "name": ADMIN_PORT_NAME,
                    "port": proxy.admin_port,
                    "targetPort": ADMIN_PORT_NAME,
                    "protocol": "TCP",
                    "appProtocol": "http",
                },
            ],
        },
    }


def proxy_endpoint(ps: ProtectedService) -> str:
    """The proxy Service URL for `status.endpoint`."""
    scheme = "https" if ps.spec.proxy.tls is not None else "http"
    return f"{scheme}://{resource_name(ps)}.{ps.namespace}.svc:{ps.spec.proxy.port}"


def build_pod_disruption_budget(ps: ProtectedService) -> Manifest:
    """`maxUnavailable: 1` at every size.

    With n >= 2 replicas that keeps n-1 serving during voluntary disruptions
    (stronger than `minAvailable: 1`) and scales with the HPA; with one replica
    it still lets nodes drain instead of blocking forever. Unhealthy proxies may
    always be evicted (`AlwaysAllow`) so a crash-looping replica never blocks a drain.
    """
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(ps, resource_name(ps)),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": proxy_labels(ps)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def build_hpa(ps: ProtectedService) -> Manifest | None:
    """An autoscaling/v2 HPA on CPU when `proxy.autoscaling` is set, else None."""
    scaling = ps.spec.proxy.autoscaling
    if scaling is None:
        return None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(ps, resource_name(ps)),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": resource_name(ps),
            },
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": scaling.target_cpu_utilization_percentage,
                        },
                    },
                }
            ],
        },
    }


# --- isolation ------------------------------------------------------------------------


def build_isolation_network_policy(
    ps: ProtectedService,
    backend_pod_selector: Mapping[str, str],
    backend_target_port: int | str,
    *,
    protocol: str = "TCP",
) -> Manifest | None:
    """The NetworkPolicy admitting only proxy pods (and `allowFrom`) to the backend port.

    `backend_pod_selector` is the backend Service's `spec.selector`;
    `backend_target_port` its `targetPort` for `spec.backend.port` (a number or a
    container port name). Returns None unless `isolation.mode` is Enforce.
    Raises `ValueError` for an empty selector: it would select (and so isolate
    or open) every pod in the namespace, not the backend.
    """
    if ps.spec.isolation.mode != IsolationMode.ENFORCE:
        return None
    if not backend_pod_selector:
        raise ValueError(
            f"backend Service {ps.spec.backend.service} has no selector; "
            "nhigate cannot tell which pods to isolate"
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(ps, isolation_policy_name(ps)),
        "spec": {
            "podSelector": {"matchLabels": dict(backend_pod_selector)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {"podSelector": {"matchLabels": proxy_labels(ps)}},
                        *allow_from_peers(ps),
                    ],
                    "ports": [{"protocol": protocol, "port": backend_target_port}],
                }
            ],
        },
    }
