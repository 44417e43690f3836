"""A real local Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager.

The binaries are built from Go modules by ``hack/build-control-plane.sh`` (a no-op once cached)
and run by ``hack/control-plane.sh``; this module drives those scripts for pytest fixtures (see
``tests/conftest.py``) and gives tests a ``kubectl`` bound to the admin kubeconfig. Nothing here
mocks anything: a failure to build or start is an error, never a skip.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HACK_DIR = REPO_ROOT / "hack"
BUILD_SCRIPT = HACK_DIR / "build-control-plane.sh"
CONTROL_PLANE_SCRIPT = HACK_DIR / "control-plane.sh"
CRDS_DIR = REPO_ROOT / "crds"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager")

BUILD_TIMEOUT_S = 60 * 60
START_TIMEOUT_S = 240
# Four processes, each up to 10 s on SIGTERM and 5 s after SIGKILL (hack/control-plane.sh).
STOP_TIMEOUT_S = 120
KUBECTL_TIMEOUT_S = 120.0


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or used; the message carries the evidence."""


class KubectlError(subprocess.CalledProcessError):
    """A kubectl call failed; unlike CalledProcessError, str() includes stderr."""

    def __str__(self) -> str:
        stderr = self.stderr.strip() if isinstance(self.stderr, str) else ""
        return f"{super().__str__()}\nstderr: {stderr}"


@dataclass(frozen=True)
class ControlPlane:
    """A running control plane and how to reach it as the admin (O=system:masters) user."""

    kubeconfig: str
    server: str
    bin_dir: str
    state_dir: str
    ca_file: str
    service_account_issuer: str
    pids: tuple[int, ...] = field(default=())

    @property
    def kubectl_path(self) -> str:
        """Path of the kubectl built with the control plane."""
        return str(Path(self.bin_dir) / "kubectl")

    @property
    def helm_path(self) -> str:
        """Path of the helm CLI built with the control plane."""
        return str(Path(self.bin_dir) / "helm")

    def env(self) -> dict[str, str]:
        """Environment for child processes that should talk to this control plane."""
        env = dict(os.environ)
        env["KUBECONFIG"] = self.kubeconfig
        env["KUBECACHEDIR"] = str(Path(self.state_dir) / "kube-cache")
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        no_proxy = "127.0.0.1,localhost,::1"
        env["NO_PROXY"] = env["no_proxy"] = no_proxy
        return env

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = KUBECTL_TIMEOUT_S,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl as the admin user; raise KubectlError on failure if check."""
        cmd = [self.kubectl_path, *args]
        proc = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of every component's log, for failure messages."""
        return log_tail(Path(self.state_dir), lines)


def log_tail(state_dir: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of each component log under ``state_dir/logs``."""
    parts = []
    for name in COMPONENTS:
        path = state_dir / "logs" / f"{name}.log"
        if path.exists():
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path} (last {len(tail)} lines)\n" + "\n".join(tail))
        else:
            parts.append(f"--- {path}: missing")
    return "\n".join(parts)


@contextlib.contextmanager
def pytest_timeout_suspended() -> Iterator[None]:
    """Pause a pending SIGALRM timer (pytest-timeout's signal method) and restore it after.

    A cold build of the control plane takes many minutes, more than one test's timeout; it is a
    one-time prerequisite, not part of any test, so its own bound (BUILD_TIMEOUT_S) applies.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    remaining, interval = signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        yield
    finally:
        if remaining > 0:
            # Give the test back the time it had left, as if the build had not happened.
            signal.setitimer(signal.ITIMER_REAL, remaining, interval)


def build_binaries() -> Path:
    """Build the pinned binaries if they are not cached yet; return their directory."""
    override = os.environ.get("NHIGATE_CP_BIN_DIR")
    if override:
        return Path(override)
    try:
        with pytest_timeout_suspended():
            proc = subprocess.run(
                [str(BUILD_SCRIPT)],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
    except subprocess.TimeoutExpired as exc:
        raise ControlPlaneError(f"{BUILD_SCRIPT} did not finish in {BUILD_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        raise ControlPlaneError(
            f"{BUILD_SCRIPT} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
        )
    lines = proc.stdout.strip().splitlines()
    if not lines or not Path(lines[-1]).is_dir():
        raise ControlPlaneError(f"{BUILD_SCRIPT} printed no bin dir: {proc.stdout!r}")
    return Path(lines[-1])


def parse_env_file(text: str) -> dict[str, str]:
    """Parse the KEY=VALUE lines written by ``hack/control-plane.sh start``."""
    result: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            # Values are written with printf %q: undo the shell quoting.
            words = shlex.split(value)
            result[key.strip()] = words[0] if words else ""
    return result


def _script_env(state_dir: Path, bin_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["NHIGATE_CP_STATE_DIR"] = str(state_dir)
    env["NHIGATE_CP_BIN_DIR"] = str(bin_dir)
    # If this process dies without tearing down (SIGKILL, CI timeout), a watchdog stops it all.
    env["NHIGATE_CP_WATCH_PID"] = str(os.getpid())
    return env


def start_control_plane(state_dir: Path, bin_dir: Path) -> ControlPlane:
    """Start etcd, kube-apiserver and kube-controller-manager; return once all report ready."""
    env = _script_env(state_dir, bin_dir)
    try:
        proc = subprocess.run(
            [str(CONTROL_PLANE_SCRIPT), "start"],
            capture_output=True,
            text=True,
            env=env,
            timeout=START_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        subprocess.run([str(CONTROL_PLANE_SCRIPT), "stop"], env=env, check=False)
        raise ControlPlaneError(
            f"control plane start timed out after {START_TIMEOUT_S} s\n{log_tail(state_dir)}"
        ) from exc
    if proc.returncode != 0:
        raise ControlPlaneError(
            f"control plane failed to start (exit {proc.returncode}):\n"
            f"{proc.stderr[-4000:]}\n{log_tail(state_dir)}"
        )
    values = parse_env_file((state_dir / "control-plane.env").read_text())
    return ControlPlane(
        kubeconfig=values["KUBECONFIG"],
        server=values["NHIGATE_CP_SERVER"],
        bin_dir=values["NHIGATE_CP_BIN_DIR"],
        state_dir=values["NHIGATE_CP_STATE_DIR"],
        ca_file=values["NHIGATE_CP_CA_FILE"],
        service_account_issuer=values["NHIGATE_CP_SA_ISSUER"],
        pids=tuple(int(pid) for pid in values["NHIGATE_CP_PIDS"].split(",")),
    )


def stop_control_plane(cp: ControlPlane) -> None:
    """Stop every process of ``cp`` and delete its data (logs stay in the state dir); raise
    ControlPlaneError, with what the script said, if one of them survives."""
    env = _script_env(Path(cp.state_dir), Path(cp.bin_dir))
    try:
        proc = subprocess.run(
            [str(CONTROL_PLANE_SCRIPT), "stop"],
            env=env,
            capture_output=True,
            text=True,
            timeout=STOP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ControlPlaneError(f"control plane stop did not finish in {STOP_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        raise ControlPlaneError(
            f"control plane stop failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )


def install_crds(cp: ControlPlane, paths: Sequence[Path], timeout_s: int = 60) -> list[str]:
    """Server-side apply CRD manifests and wait until each is Established; return their names."""
    if not paths:
        raise ControlPlaneError("install_crds: no CRD manifests given")
    files = [arg for path in paths for arg in ("-f", str(path))]
    # One apply for all files, so a failure names every rejected CRD, not just the first.
    proc = cp.kubectl(
        "apply", "--server-side", "--field-manager=nhigate-tests", "--force-conflicts",
        "-o", "name", *files, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise ControlPlaneError(
            f"the API server rejected CRDs {[str(p) for p in paths]}:\n{proc.stderr}"
        )
    names = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    crds = [n for n in names if n.startswith("customresourcedefinition")]
    if not crds:
        raise ControlPlaneError(f"no CustomResourceDefinition in {[str(p) for p in paths]}")
    waited = cp.kubectl(
        "wait", "--for=condition=Established", f"--timeout={timeout_s}s", *crds, check=False
    )
    if waited.returncode != 0:
        raise ControlPlaneError(f"CRDs not Established in {timeout_s} s:\n{waited.stderr}")
    return [n.split("/", 1)[1] for n in crds]


def crd_manifests(crds_dir: Path = CRDS_DIR) -> list[Path]:
    """The CRD manifests shipped in ``crds/`` (sorted, so installs are reproducible)."""
    return sorted([*crds_dir.glob("*.yaml"), *crds_dir.glob("*.yml")])


def unique_name(prefix: str) -> str:
    """A DNS-1123 label unique to this call, e.g. ``t-3f9a1c0b``."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def create_namespace(cp: ControlPlane, prefix: str = "t", timeout_s: float = 30.0) -> str:
    """Create a uniquely named namespace and wait for its ``default`` ServiceAccount.

    The ServiceAccount is created by kube-controller-manager; waiting for it means pods can be
    admitted in the namespace as soon as this returns.
    """
    name = unique_name(prefix)
    cp.kubectl("create", "namespace", name)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cp.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0:
            return name
        time.sleep(0.2)
    raise ControlPlaneError(f"namespace {name}: no default ServiceAccount after {timeout_s} s")


def delete_namespace(cp: ControlPlane, name: str) -> None:
    """Delete a namespace without waiting for the namespace controller to finalize it."""
    cp.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")
