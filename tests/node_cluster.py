"""A real cluster with a node for end-to-end tests: pods run, and a CNI enforces NetworkPolicy.

By default ``hack/node.sh`` brings up the local control plane plus a real node on this machine
(containerd, kubelet, kube-proxy, kube-scheduler, CoreDNS, kube-router's NetworkPolicy
controller) with the nhigate image imported. ``hack/kind-e2e.sh`` instead points the same tests
at a kind cluster through ``NHIGATE_E2E_KUBECONFIG`` + ``NHIGATE_E2E_IMAGE``: one scenario, two
kinds of cluster. A failure to start is an error with the log tail, never a skip.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cluster import (
    HACK_DIR,
    ControlPlane,
    ControlPlaneError,
    parse_env_file,
    pytest_timeout_suspended,
)

NODE_SCRIPT = HACK_DIR / "node.sh"
NODE_COMPONENTS = (
    "containerd",
    "kubelet",
    "kube-proxy",
    "kube-scheduler",
    "coredns",
    "kube-router",
)
# A cold start builds the node binaries and images (tens of minutes); a warm one takes ~30 s.
NODE_START_TIMEOUT_S = 60 * 60
NODE_STOP_TIMEOUT_S = 180


@dataclass(frozen=True)
class RealCluster:
    """A cluster whose pods really run: the API server as admin, plus what the scenario needs."""

    api: ControlPlane
    image: str
    """The nhigate image, present on every node (pods use imagePullPolicy IfNotPresent)."""
    kind: str
    """"node" (hack/node.sh on this machine) or "kind"."""
    state_dir: str = ""
    node_pids: tuple[int, ...] = ()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of each node component's log (empty for kind)."""
        if not self.state_dir:
            return ""
        parts = []
        for name in NODE_COMPONENTS:
            path = Path(self.state_dir) / "logs" / f"{name}.log"
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)


def _node_env(state_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["NHIGATE_NODE_STATE_DIR"] = str(state_dir)
    # If this process dies without tearing down (SIGKILL, CI timeout), a watchdog stops it all.
    env["NHIGATE_NODE_WATCH_PID"] = str(os.getpid())
    return env


def start_node(state_dir: Path) -> RealCluster:
    """Run ``hack/node.sh start`` (building what is missing) and describe the cluster."""
    env = _node_env(state_dir)
    try:
        with pytest_timeout_suspended():
            proc = subprocess.run(
                [str(NODE_SCRIPT), "start"],
                capture_output=True,
                text=True,
                env=env,
                timeout=NODE_START_TIMEOUT_S,
                check=False,
            )
    except subprocess.TimeoutExpired as exc:
        subprocess.run(
            [str(NODE_SCRIPT), "stop"], env=env, check=False, timeout=NODE_STOP_TIMEOUT_S
        )
        raise ControlPlaneError(
            f"hack/node.sh start timed out after {NODE_START_TIMEOUT_S} s"
        ) from exc
    if proc.returncode != 0:
        raise ControlPlaneError(
            f"hack/node.sh start failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
        )
    values = parse_env_file((state_dir / "node.env").read_text())
    cp_state = state_dir / "control-plane"
    cp_values = parse_env_file((cp_state / "control-plane.env").read_text())
    api = ControlPlane(
        kubeconfig=values["KUBECONFIG"],
        server=values["NHIGATE_CP_SERVER"],
        bin_dir=values["NHIGATE_CP_BIN_DIR"],
        state_dir=str(cp_state),
        ca_file=cp_values["NHIGATE_CP_CA_FILE"],
        service_account_issuer=values["NHIGATE_CP_SA_ISSUER"],
        pids=tuple(int(p) for p in cp_values["NHIGATE_CP_PIDS"].split(",")),
    )
    return RealCluster(
        api=api,
        image=values["NHIGATE_IMAGE_REF"],
        kind="node",
        state_dir=str(state_dir),
        node_pids=tuple(int(p) for p in values["NHIGATE_NODE_PIDS"].split(",") if p),
    )


def stop_node(cluster: RealCluster) -> subprocess.CompletedProcess[str]:
    """Run ``hack/node.sh stop``: pods, processes, network and host changes all go."""
    return subprocess.run(
        [str(NODE_SCRIPT), "stop"],
        capture_output=True,
        text=True,
        env=_node_env(Path(cluster.state_dir)),
        timeout=NODE_STOP_TIMEOUT_S,
        check=False,
    )


def external_cluster() -> RealCluster | None:
    """The cluster named by NHIGATE_E2E_KUBECONFIG / NHIGATE_E2E_IMAGE (kind), if any."""
    kubeconfig = os.environ.get("NHIGATE_E2E_KUBECONFIG")
    if not kubeconfig:
        return None
    image = os.environ.get("NHIGATE_E2E_IMAGE")
    bin_dir = os.environ.get("NHIGATE_CP_BIN_DIR")
    if not image or not bin_dir:
        raise ControlPlaneError(
            "NHIGATE_E2E_KUBECONFIG needs NHIGATE_E2E_IMAGE and NHIGATE_CP_BIN_DIR"
        )
    api = ControlPlane(
        kubeconfig=kubeconfig,
        server="",
        bin_dir=bin_dir,
        state_dir=os.environ.get("NHIGATE_E2E_STATE_DIR", "/tmp/nhigate-kind-e2e"),
        ca_file="",
        service_account_issuer=os.environ.get("NHIGATE_E2E_SA_ISSUER", ""),
    )
    return RealCluster(api=api, image=image, kind="kind")
