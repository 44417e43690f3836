"""The real cluster for the end-to-end tests that need running pods (tests/node_cluster.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import ControlPlaneError
from node_cluster import RealCluster, external_cluster, start_node, stop_node

# Host settings kubelet, kube-proxy and the bridge plugin change; hack/node.sh stop restores them.
WATCHED_SYSCTLS = (
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
)


def _sysctls() -> dict[str, str]:
    values = {}
    for name in WATCHED_SYSCTLS:
        path = Path("/proc/sys") / name
        if path.exists():
            values[name] = path.read_text().strip()
    return values


def _leftovers(cluster: RealCluster) -> list[str]:
    """What a stopped node must not leave behind: its processes, bridge, guard table, mounts."""
    problems = []
    for pid in (*cluster.node_pids, *cluster.api.pids):
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().split(") ", 1)[-1][:1] not in ("Z", "X"):
            problems.append(f"process {pid} still running")
    state = Path(cluster.state_dir)
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    problems += [f"mount {m} left" for m in mounts if m.startswith(str(state) + "/")]
    tables = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, check=False
    ).stdout
    problems += [f"nft {t} left" for t in tables.splitlines() if "nhigate_node_guard" in t]
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=False).stdout
    problems += [
        f"iptables {line} left" for line in rules.splitlines() if line.startswith(":KUBE-")
    ][:5]
    return problems


@pytest.fixture(scope="session")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    """A cluster whose pods run: kind when NHIGATE_E2E_KUBECONFIG says so, else hack/node.sh."""
    try:
        external = external_cluster()
    except ControlPlaneError as exc:
        pytest.fail(str(exc), pytrace=False)
    if external is not None:
        yield external
        return
    state_dir = tmp_path_factory.mktemp("node")
    sysctls_before = _sysctls()
    try:
        cluster = start_node(state_dir)
    except ControlPlaneError as exc:
        pytest.fail(f"the real node did not start:\n{exc}", pytrace=False)
    try:
        yield cluster
    finally:
        proc = stop_node(cluster)
        assert proc.returncode == 0, f"hack/node.sh stop failed:\n{proc.stderr[-3000:]}"
        left = _leftovers(cluster)
        after = _sysctls()
        left += [
            f"sysctl {k} {v} -> {after.get(k)}"
            for k, v in sysctls_before.items()
            if after.get(k) != v
        ]
        assert not left, f"hack/node.sh stop left things behind: {left}\n{proc.stderr[-2000:]}"
