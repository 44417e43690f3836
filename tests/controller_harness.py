"""Shared pieces of the controller's cluster tests: a controller subprocess and object builders.

The controller runs as the real `nhigate controller` command (kopf embedded), scoped to the
test's namespace, against the control plane from ``tests/cluster.py``; its log is attached to
every failure message.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec

from cluster import ControlPlane
from nhigate.k8s import KubeClient

T = TypeVar("T")
JSON = dict[str, Any]
API = "nhigate.io/v1alpha1"


class ControllerProcess:
    """`nhigate controller --namespace NS` as a child process, logging to a file."""

    def __init__(
        self, cp: ControlPlane, namespace: str, log_path: Path, extra_args: Sequence[str] = ()
    ) -> None:
        self.cp = cp
        self.namespace = namespace
        self.log_path = log_path
        self.extra_args = list(extra_args)
        """More `nhigate controller` flags, e.g. a short `--unused-after`."""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or restart) the controller."""
        env = self.cp.env()
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("PYTHONWARNINGS", None)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nhigate.cli.main",
                "controller",
                "--kubeconfig",
                self.cp.kubeconfig,
                "--namespace",
                self.namespace,
                "--proxy-image",
                "nhigate:test",
                "--drift-interval",
                "20",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()

    def kill(self) -> None:
        """SIGKILL: no cleanup, as a crash or an OOM kill would leave things."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 60) -> str:
        """The controller log's last lines."""
        if not self.log_path.exists():
            return "(no controller log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class ProxyProcess:
    """`nhigate proxy --kube ...` as the proxy Deployment runs it, with the admin kubeconfig.

    It watches ConfigMap `policy_configmap` in `namespace` through the API, reports through
    its Lease, forwards to `upstream` and writes its audit lines to `audit_path`.
    """

    def __init__(
        self,
        cp: ControlPlane,
        namespace: str,
        policy_configmap: str,
        *,
        upstream: str,
        port: int,
        admin_port: int,
        work_dir: Path,
        replica: str = "e2e-0",
    ) -> None:
        self.cp = cp
        self.namespace = namespace
        self.policy_configmap = policy_configmap
        self.upstream = upstream
        self.port = port
        self.admin_port = admin_port
        self.replica = replica
        self.log_path = work_dir / f"proxy-{replica}.log"
        self.audit_path = work_dir / f"audit-{replica}.jsonl"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the proxy process."""
        env = self.cp.env()
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("PYTHONWARNINGS", None)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "nhigate.cli.main", "proxy", "--kube",
                    "--kubeconfig", self.cp.kubeconfig,
                    "--namespace", self.namespace,
                    "--policy-configmap", self.policy_configmap,
                    "--replica-name", self.replica,
                    "--upstream", self.upstream,
                    "--listen", f"127.0.0.1:{self.port}",
                    "--admin-listen", f"127.0.0.1:{self.admin_port}",
                    "--audit-log", str(self.audit_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )  # fmt: skip

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        """The proxy log's last lines."""
        if not self.log_path.exists():
            return "(no proxy log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def audit_records(self) -> list[JSON]:
        """Every complete audit line written so far."""
        if not self.audit_path.exists():
            return []
        records: list[JSON] = []
        for line in self.audit_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and line.endswith("}"):
                records.append(json.loads(line))
        return records


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    *,
    within: float = 30.0,
    interval: float = 0.1,
    what: str = "condition",
    controller: ControllerProcess | None = None,
) -> T:
    """Poll `probe` until it returns something truthy; fail with the controller log otherwise."""
    deadline = time.monotonic() + within
    while True:
        last = await probe()
        if last:
            return last
        if time.monotonic() > deadline:
            log = controller.log_tail() if controller else ""
            raise AssertionError(f"timed out after {within} s waiting for {what}\n{log}")
        await asyncio.sleep(interval)


def condition(obj: JSON | None, type_: str) -> JSON:
    """The condition of `type_` in obj.status (empty dict if absent)."""
    for cond in ((obj or {}).get("status") or {}).get("conditions") or ():
        if cond.get("type") == type_:
            found: JSON = cond
            return found
    return {}


def ec_jwks() -> JSON:
    """A JWK Set with one fresh EC P-256 public key."""
    numbers = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

    return {
        "keys": [
            {
                "kty": "EC",
                "crv": "P-256",
                "x": b64(numbers.x),
                "y": b64(numbers.y),
                "kid": "k1",
                "alg": "ES256",
            }
        ]
    }


def issuer(namespace: str, name: str = "ci", **source: Any) -> JSON:
    """An IdentityIssuer; `source` is jwks=..., jwksUri=... or kubernetes={} (default inline)."""
    spec: JSON = {"issuer": f"https://{name}.example", "audiences": ["nhigate"]}
    spec.update(source or {"jwks": ec_jwks()})
    return {
        "apiVersion": API,
        "kind": "IdentityIssuer",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def backend_service(namespace: str, name: str = "backend", **extra: Any) -> JSON:
    """A ClusterIP Service on port 80 -> 8080 selecting app=<name>."""
    spec: JSON = {
        "selector": {"app": name},
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
    }
    spec.update(extra)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def backend_pod(namespace: str, name: str = "backend-0", app: str = "backend") -> JSON:
    """A pod object labelled as a backend pod (no kubelet runs it; the analysis reads labels)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "backend:test",
                    "ports": [{"name": "http", "containerPort": 8080}],
                }
            ]
        },
    }


def protected_service(
    namespace: str, name: str = "api", *, issuers: list[str] | None = None, **spec: Any
) -> JSON:
    """A ProtectedService fronting Service `backend` port 80."""
    body: JSON = {"backend": {"service": "backend", "port": 80}, "issuers": issuers or ["ci"]}
    body.update(spec)
    return {
        "apiVersion": API,
        "kind": "ProtectedService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def route_grant(
    namespace: str,
    name: str,
    *,
    target: str = "api",
    issuer_name: str = "ci",
    subject: str = "deployer",
    paths: list[str] | None = None,
    methods: list[str] | None = None,
    **spec: Any,
) -> JSON:
    """A RouteGrant for one token subject."""
    body: JSON = {
        "target": {"protectedService": target},
        "subjects": [{"token": {"issuer": issuer_name, "subject": subject}}],
        "rules": [{"methods": methods or ["GET"], "paths": paths or ["/v1/items/**"]}],
    }
    body.update(spec)
    return {
        "apiVersion": API,
        "kind": "RouteGrant",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


async def apply_all(kube: KubeClient, *objects: JSON) -> None:
    """Server-side apply as the test's own field manager."""
    for obj in objects:
        await kube.apply(obj, field_manager="nhigate-tests")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
