"""Shared pytest fixtures: a real local Kubernetes control plane (see tests/cluster.py).

``control_plane`` (session) builds the pinned binaries if needed and runs etcd, kube-apiserver and
kube-controller-manager once per session; ``namespace`` gives each test a fresh namespace;
``crds_installed`` applies every manifest in ``crds/``. Any test that uses ``control_plane``
(directly or through another fixture) is marked ``cluster`` automatically. If the control plane
cannot be built or started the test fails with the log tail; it never skips.
When the session ends, ``control_plane`` also checks through /proc that no process the control
plane started (found by the state dir in its environment) still runs.
``kube`` is an nhigate KubeClient on it; ``controller`` runs ``nhigate controller`` for the
test's namespace as a separate process; ``upstream`` is an echoing backend on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from cluster import (
    CRDS_DIR,
    ControlPlane,
    ControlPlaneError,
    build_binaries,
    crd_manifests,
    create_namespace,
    delete_namespace,
    install_crds,
    start_control_plane,
    stop_control_plane,
)
from controller_harness import ControllerProcess, free_port
from nhigate.k8s import KubeClient
from processes import assert_none_left


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the control plane, so ``-m cluster`` selects exactly those."""
    for item in items:
        if "control_plane" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A running etcd + kube-apiserver + kube-controller-manager, shared by the session."""
    state_dir = tmp_path_factory.mktemp("control-plane")
    try:
        cp = start_control_plane(state_dir, build_binaries())
    except ControlPlaneError as exc:
        pytest.fail(f"the control plane did not start:\n{exc}", pytrace=False)
    try:
        yield cp
    finally:
        try:
            stop_control_plane(cp)
        except ControlPlaneError as exc:
            pytest.fail(str(exc), pytrace=False)
        finally:
            # Every process `hack/control-plane.sh start` runs inherits NHIGATE_CP_STATE_DIR.
            assert_none_left("NHIGATE_CP_STATE_DIR", str(state_dir), "the session's control plane")


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    """A fresh, uniquely named namespace (with its default ServiceAccount), deleted after."""
    try:
        name = create_namespace(control_plane)
    except ControlPlaneError as exc:
        pytest.fail(f"{exc}\n{control_plane.log_tail()}", pytrace=False)
    try:
        yield name
    finally:
        delete_namespace(control_plane, name)


@pytest.fixture(scope="session")
def crds_installed(control_plane: ControlPlane) -> list[str]:
    """Every CRD in ``crds/`` applied server-side and Established; returns the CRD names."""
    manifests = crd_manifests()
    if not manifests:
        pytest.fail(f"no CRD manifests in {CRDS_DIR}", pytrace=False)
    try:
        return install_crds(control_plane, manifests)
    except ControlPlaneError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
async def kube(control_plane: ControlPlane) -> AsyncIterator[KubeClient]:
    """nhigate's own Kubernetes client, connected as the control plane's admin."""
    client = await KubeClient.connect(control_plane.kubeconfig)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def controller(
    control_plane: ControlPlane, crds_installed: list[str], namespace: str, tmp_path: Path
) -> Iterator[ControllerProcess]:
    """`nhigate controller` serving the test's namespace, stopped after the test."""
    proc = ControllerProcess(control_plane, namespace, tmp_path / "controller.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[int]:
    """A backend on 127.0.0.1 answering every request with its path and the proxy's request id
    (`{"path", "request_id"}`); yields its port."""

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(
            {"path": request.path, "request_id": request.headers.get("X-Request-Id")}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()
