"""The demo on a real node: nhigate as pods, a CNI enforcing its NetworkPolicy, real traffic.

Run through `hack/demo.sh` (which prepares the virtualenv first). It brings up hack/node.sh
(control plane + kubelet, containerd, kube-proxy, CoreDNS, kube-router), installs the chart,
deploys a backend and a client pod, puts the backend behind nhigate with a `kubernetes: {}`
issuer and one grant, then shows from inside the client pod: an allowed request, a denied one,
an anonymous one, and a direct connection to the backend that the NetworkPolicy refuses.
Everything is stopped at the end, also on Ctrl-C or failure.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the scenario shared with tests/e2e/test_node_e2e.py

from cluster import ControlPlaneError  # noqa: E402
from node_cluster import start_node, stop_node  # noqa: E402
from scenario import (  # noqa: E402
    BACKEND_PORT,
    Scenario,
    backend_manifests,
    client_manifests,
    grant_manifest,
    install_chart,
    issuer_manifest,
    protected_service_manifest,
    scripts_configmap,
    wait_for,
)

NAMESPACE = "payments"
CONDITIONS = (
    "jsonpath={range .status.conditions[*]}{.type}={.status} ({.reason}): {.message}{'\\n'}{end}"
)


def say(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def show(label: str, result: dict[str, object]) -> None:
    print(f"    {label:<58} -> {json.dumps(result)[:160]}", flush=True)


def main() -> int:
    started = time.monotonic()
    say("starting the real node (hack/node.sh: cold, this builds for ~30 min and prints progress)")
    try:
        cluster = start_node(Path(tempfile.mkdtemp(prefix="nhigate-node-demo-")))
    except ControlPlaneError as exc:
        print(exc, file=sys.stderr)
        return 1
    status = 1
    try:
        s = Scenario(cluster=cluster, namespace=NAMESPACE)
        api = cluster.api
        print(api.kubectl("get", "nodes", "-o", "wide").stdout)
        say(f"helm install charts/nhigate (image {cluster.image})")
        install_chart(cluster)
        print(api.kubectl("get", "pods", "-n", "nhigate-system").stdout)
        say("a backend, a client pod with a projected service-account token, and nhigate resources")
        api.kubectl("create", "namespace", NAMESPACE)
        wait_for(
            "the default ServiceAccount",
            lambda: (
                api.kubectl("get", "sa", "default", "-n", NAMESPACE, check=False).returncode == 0
            ),
        )
        s.apply(
            scripts_configmap(NAMESPACE),
            *backend_manifests(NAMESPACE, s.backend, cluster.image),
            *client_manifests(NAMESPACE, "client", cluster.image),
            issuer_manifest(NAMESPACE, api.service_account_issuer),
            protected_service_manifest(s),
            grant_manifest(s, "client-api", "client", ["/api/**"]),
        )
        api.kubectl(
            "wait",
            "-n",
            NAMESPACE,
            "--for=condition=Ready",
            "pod",
            "--all",
            "--timeout=180s",
            timeout=200,
        )
        api.kubectl(
            "wait",
            "-n",
            NAMESPACE,
            "--for=condition=Ready",
            f"protectedservice/{s.protected_service}",
            "--timeout=180s",
            timeout=200,
        )
        s.wait_until_routable("client")
        print(api.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide").stdout)
        print(api.kubectl("get", "nhigate", "-n", NAMESPACE).stdout)
        print(
            api.kubectl(
                "get", "protectedservice", s.protected_service, "-n", NAMESPACE, "-o", CONDITIONS
            ).stdout
        )

        say("requests from the client pod (token: its projected service-account token)")
        show("GET /api/orders  (granted)", s.get("client", "/api/orders"))
        show(
            "GET /admin/users (not granted)", {"status": s.get("client", "/admin/users")["status"]}
        )
        show(
            "GET /api/orders  (no token)",
            {"status": s.get("client", "/api/orders", token=False)["status"]},
        )
        pod_ip = s.backend_pods()[0]["status"]["podIP"]
        service_ip = s.kubectl_json("get", "service", s.backend, "-n", NAMESPACE)["spec"][
            "clusterIP"
        ]
        show(
            f"direct TCP to backend pod {pod_ip}:{BACKEND_PORT}",
            s.connect("client", pod_ip, BACKEND_PORT),
        )
        show(
            f"direct TCP to backend Service {service_ip}:{BACKEND_PORT}",
            s.connect("client", service_ip, BACKEND_PORT),
        )
        say(f"done in {time.monotonic() - started:.0f} s; stopping the node")
        status = 0
    finally:
        # hack/node.sh stop verifies every process is gone; when one is not, the demo fails.
        proc = stop_node(cluster)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            print("stopping the node FAILED (see above): something is left", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
