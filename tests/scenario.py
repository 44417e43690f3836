"""The real-cluster scenario: chart, backend, client pods, nhigate resources, and real traffic.

Used by ``tests/e2e/test_node_e2e.py`` on either kind of cluster (``tests/node_cluster.py``):
everything here goes through kubectl/helm and ``kubectl exec`` into pods, so it asserts what a
user on that cluster would see. Requests come from a client pod with its projected
service-account token; the backend echoes what it received.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import REPO_ROOT, ControlPlane
from node_cluster import RealCluster

CHART = REPO_ROOT / "charts" / "nhigate"
POD_SCRIPTS = Path(__file__).resolve().parent / "e2e" / "pod_scripts"
RELEASE = "nhigate"
RELEASE_NAMESPACE = "nhigate-system"
AUDIENCE = "nhigate-e2e"
TOKEN_PATH = "/var/run/secrets/nhigate/token"
BACKEND_PORT = 8080


@dataclass(frozen=True)
class Scenario:
    """Names of what the scenario deployed, in one namespace of a real cluster."""

    cluster: RealCluster
    namespace: str
    protected_service: str = "payments"
    backend: str = "payments-backend"
    proxy_port: int = 8443

    @property
    def api(self) -> ControlPlane:
        return self.cluster.api

    @property
    def proxy_url(self) -> str:
        """The proxy Service as a client pod reaches it: by DNS name, through CoreDNS."""
        return f"http://nhigate-{self.protected_service}.{self.namespace}.svc.cluster.local:{self.proxy_port}"

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.api.kubectl(*args, "-o", "json").stdout)

    def apply(self, *manifests: dict[str, Any]) -> None:
        """kubectl apply (client-side) of the given objects."""
        doc = {"apiVersion": "v1", "kind": "List", "items": list(manifests)}
        self.api.kubectl("apply", "-f", "-", input=json.dumps(doc))

    def client(self, pod: str, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        """Run tests/e2e/pod_scripts/client.py in a client pod; its one JSON document."""
        proc = self.api.kubectl(
            "exec",
            "-n",
            self.namespace,
            pod,
            "--",
            "python3",
            "/scripts/client.py",
            *args,
            timeout=timeout,
        )
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def client_async(self, pod: str, *args: str) -> subprocess.Popen[str]:
        """Start client.py in a pod without waiting (load generators, probes)."""
        return subprocess.Popen(
            [
                self.api.kubectl_path,
                "exec",
                "-n",
                self.namespace,
                pod,
                "--",
                "python3",
                "/scripts/client.py",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.api.env(),
        )

    def get(
        self, pod: str, path: str, *, token: bool = True, url: str | None = None
    ) -> dict[str, Any]:
        """One GET from a client pod, through the proxy unless ``url`` says otherwise."""
        target = (url or self.proxy_url) + path
        return self.client(pod, "get", target, *(["--token", TOKEN_PATH] if token else []))

    def wait_until_routable(self, pod: str, timeout: float = 60.0) -> None:
        """Wait until ``pod`` gets an HTTP answer (any status) from the proxy Service.

        Ready=True says the proxy pods are available; it cannot say that kube-proxy has
        programmed the new Service's rules yet. Until it has, the ClusterIP is routed onto the
        bridge unanswered and a connect fails with "No route to host" (seen once in CI)."""
        wait_for(
            f"the proxy Service to answer {pod} (kube-proxy has programmed it)",
            lambda: self.get(pod, "/", token=False).get("status", 0) != 0,
            timeout=timeout,
        )

    def connect(self, pod: str, host: str, port: int) -> dict[str, Any]:
        """A bare TCP connect from a client pod (3 s timeout)."""
        return self.client(pod, "connect", host, str(port))

    def status(self, kind: str, name: str) -> dict[str, Any]:
        obj = self.kubectl_json("get", kind, name, "-n", self.namespace)
        result: dict[str, Any] = obj.get("status") or {}
        return result

    def condition(self, kind: str, name: str, type_: str) -> dict[str, Any]:
        for cond in self.status(kind, name).get("conditions") or []:
            if cond.get("type") == type_:
                return dict(cond)
        return {}

    def backend_pods(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.kubectl_json(
            "get", "pods", "-n", self.namespace, "-l", f"app={self.backend}"
        )["items"]
        return [p for p in items if p.get("status", {}).get("podIP")]

    def proxy_pods(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.kubectl_json(
            "get",
            "pods",
            "-n",
            self.namespace,
            "-l",
            f"nhigate.io/protected-service={self.protected_service}",
        )["items"]
        return items


def wait_for(
    what: str, check: Callable[[], Any], timeout: float = 120.0, interval: float = 0.5
) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` and its last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (
            subprocess.CalledProcessError,
            subprocess.TimeoutExpired,
            json.JSONDecodeError,
        ) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


# --- manifests ---------------------------------------------------------------------------------


def _restricted_container(name: str, image: str, command: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "scripts", "mountPath": "/scripts", "readOnly": True}],
    }


def _pod_spec(containers: list[dict[str, Any]], service_account: str = "default") -> dict[str, Any]:
    return {
        "serviceAccountName": service_account,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": 2,
        "containers": containers,
        "volumes": [{"name": "scripts", "configMap": {"name": "e2e-scripts"}}],
    }


def scripts_configmap(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "e2e-scripts", "namespace": namespace},
        "data": {p.name: p.read_text() for p in sorted(POD_SCRIPTS.glob("*.py"))},
    }


def backend_manifests(
    namespace: str, name: str, image: str, replicas: int = 2
) -> list[dict[str, Any]]:
    """An echoing backend Deployment and its ClusterIP Service (port 8080)."""
    container = _restricted_container(name, image, ["python3", "/scripts/echo_backend.py"])
    container["ports"] = [{"name": "http", "containerPort": BACKEND_PORT}]
    container["env"] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    ]
    container["readinessProbe"] = {"tcpSocket": {"port": BACKEND_PORT}, "periodSeconds": 1}
    labels = {"app": name}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": _pod_spec([container])},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "selector": labels,
                "ports": [{"name": "http", "port": BACKEND_PORT, "targetPort": "http"}],
            },
        },
    ]


def client_manifests(namespace: str, name: str, image: str) -> list[dict[str, Any]]:
    """A ServiceAccount and a pod with its projected token (audience nhigate-e2e) mounted."""
    container = _restricted_container(
        name, image, ["python3", "-c", "import time; time.sleep(86400)"]
    )
    container["volumeMounts"].append(
        {"name": "token", "mountPath": str(Path(TOKEN_PATH).parent), "readOnly": True}
    )
    spec = _pod_spec([container], service_account=name)
    spec["volumes"].append(
        {
            "name": "token",
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": AUDIENCE,
                            "expirationSeconds": 3600,
                            "path": "token",
                        }
                    }
                ]
            },
        }
    )
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"role": "client"}},
            "spec": spec,
        },
    ]


def issuer_manifest(namespace: str, issuer_url: str) -> dict[str, Any]:
    """The cluster's own service-account issuer, `kubernetes: {}` form."""
    return {
        "apiVersion": "nhigate.io/v1alpha1",
        "kind": "IdentityIssuer",
        "metadata": {"name": "cluster", "namespace": namespace},
        "spec": {
            "issuer": issuer_url,
            "kubernetes": {},
            "audiences": [AUDIENCE],
            "algorithms": ["RS256", "ES256"],
            "maxTokenLifetime": "2h",
        },
    }


def protected_service_manifest(s: Scenario, replicas: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": "nhigate.io/v1alpha1",
        "kind": "ProtectedService",
        "metadata": {"name": s.protected_service, "namespace": s.namespace},
        "spec": {
            "backend": {"service": s.backend, "port": BACKEND_PORT},
            "issuers": ["cluster"],
            "proxy": {"replicas": replicas, "port": s.proxy_port},
            "isolation": {"mode": "Enforce"},
        },
    }


def grant_manifest(
    s: Scenario, name: str, service_account: str, paths: list[str]
) -> dict[str, Any]:
    return {
        "apiVersion": "nhigate.io/v1alpha1",
        "kind": "RouteGrant",
        "metadata": {"name": name, "namespace": s.namespace},
        "spec": {
            "target": {"protectedService": s.protected_service},
            "subjects": [{"serviceAccount": {"namespace": s.namespace, "name": service_account}}],
            "rules": [{"methods": ["GET"], "paths": paths}],
            "reason": "real-node e2e",
        },
    }


# --- chart -------------------------------------------------------------------------------------


def helm(
    cluster: RealCluster, *args: str, timeout: float = 300.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = cluster.api.env()
    home = Path(cluster.api.state_dir) / "helm-home"
    env.update(
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_DATA_HOME=str(home / "data"),
    )
    proc = subprocess.run(
        [cluster.api.helm_path, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"helm {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr}\n{proc.stdout}"
        )
    return proc


def image_sets(cluster: RealCluster) -> list[str]:
    """--set flags pointing the chart at the locally present image."""
    repository, _, tag = cluster.image.rpartition(":")
    return [
        "--set",
        f"image.repository={repository}",
        "--set",
        f"image.tag={tag}",
        "--set",
        "image.pullPolicy=IfNotPresent",
    ]


def install_chart(cluster: RealCluster, *sets: str) -> subprocess.CompletedProcess[str]:
    """helm upgrade --install the chart (CRDs from the chart) and wait for the controller."""
    return helm(
        cluster,
        "upgrade",
        "--install",
        RELEASE,
        str(CHART),
        "--namespace",
        RELEASE_NAMESPACE,
        "--create-namespace",
        "--wait",
        "--timeout",
        "240s",
        *image_sets(cluster),
        *sets,
    )
