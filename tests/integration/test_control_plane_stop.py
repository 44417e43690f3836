"""`hack/control-plane.sh stop` on stand-ins that behave like the real components.

kube-apiserver ignores SIGTERM once etcd is gone (and can take longer than the grace period even
while it is there); kube-controller-manager may hang the same way. Stand-in processes recorded in
the state dir's PID files, as `start` records the real ones, show that stop signals dependents
before etcd, waits a bounded time, escalates to SIGKILL, takes the watchdog's children with it,
and leaves no process of the state dir alive. No API server is needed for those; the last test
does the same to a real control plane whose etcd was killed first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import (
    CONTROL_PLANE_SCRIPT,
    ControlPlaneError,
    build_binaries,
    start_control_plane,
)
from processes import assert_none_left, is_running, processes_with

# A component: on SIGTERM, log "<name> <states of the PIDs it watches>" and exit unless it
# ignores SIGTERM; it writes its ready file once the handler is installed.
STAND_IN = """
import signal, sys, time
from pathlib import Path
name, log, ready, mode, *watched = sys.argv[1:]

def state(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except OSError:
        return "gone"

def on_term(signum, frame):
    with open(log, "a") as f:
        f.write(" ".join([name, *(state(p) for p in watched)]) + "\\n")
    if mode == "exit":
        sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
Path(ready).touch()
while True:
    time.sleep(1)
"""
GRACE_S = 1


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A control-plane state dir; any stand-in still alive after the test is killed and fails it."""
    (tmp_path / "run").mkdir()
    yield tmp_path
    assert_none_left("NHIGATE_CP_STATE_DIR", str(tmp_path), "the stand-in control plane")


def start(
    state_dir: Path, name: str, argv: list[str], children: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """Start `argv` in its own session (as `launch` does with setsid) and record its PID."""
    env = {**os.environ, "NHIGATE_CP_STATE_DIR": str(state_dir)}
    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    children.append(proc)
    (state_dir / "run" / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc


def stand_in(
    state_dir: Path,
    name: str,
    mode: str,
    children: list[subprocess.Popen[bytes]],
    watched: tuple[int, ...] = (),
) -> subprocess.Popen[bytes]:
    ready = state_dir / f"{name}.ready"
    argv = [sys.executable, "-c", STAND_IN, name, str(state_dir / "term.log"), str(ready), mode]
    proc = start(state_dir, name, [*argv, *map(str, watched)], children)
    deadline = time.monotonic() + 10
    while not ready.exists():
        assert time.monotonic() < deadline, f"stand-in {name} did not start"
        time.sleep(0.05)
    return proc


def run_stop(state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CONTROL_PLANE_SCRIPT), "stop"],
        env={
            **os.environ,
            "NHIGATE_CP_STATE_DIR": str(state_dir),
            "NHIGATE_CP_STOP_GRACE": str(GRACE_S),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def start_watchdog(state_dir: Path, children: list[subprocess.Popen[bytes]]) -> None:
    """The watchdog as `start` runs it: a shell loop whose `sleep` is its child."""
    loop = 'while kill -0 "$1" 2>/dev/null; do sleep 2; done'
    start(state_dir, "watchdog", ["bash", "-c", loop, "watchdog", "1"], children)
    time.sleep(0.3)  # the loop's first `sleep 2` is running


def test_stop_takes_the_watchdogs_children_with_it(state_dir: Path) -> None:
    children: list[subprocess.Popen[bytes]] = []
    try:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            stand_in(state_dir, name, "exit", children)
        start_watchdog(state_dir, children)
        assert len(processes_with("NHIGATE_CP_STATE_DIR", str(state_dir))) == 5
        proc = run_stop(state_dir)
        left = processes_with("NHIGATE_CP_STATE_DIR", str(state_dir))
    finally:
        for child in children:
            child.kill()
            child.wait(timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert left == [], f"left after stop: {[str(p) for p in left]}"


def test_stop_kills_what_ignores_sigterm_dependents_before_etcd(state_dir: Path) -> None:
    children: list[subprocess.Popen[bytes]] = []
    try:
        kcm = stand_in(state_dir, "kube-controller-manager", "ignore", children)
        apiserver = stand_in(state_dir, "kube-apiserver", "ignore", children)
        # etcd notes, when it is asked to stop, whether the API server and kcm are still there.
        stand_in(state_dir, "etcd", "exit", children, watched=(apiserver.pid, kcm.pid))
        start_watchdog(state_dir, children)
        assert len(processes_with("NHIGATE_CP_STATE_DIR", str(state_dir))) == 5

        started = time.monotonic()
        proc = run_stop(state_dir)
        took = time.monotonic() - started
        # Nothing of this state dir survives stop, the watchdog's `sleep` included.
        assert processes_with("NHIGATE_CP_STATE_DIR", str(state_dir)) == []
    finally:
        for child in children:
            child.kill()
            child.wait(timeout=10)
    assert proc.returncode == 0, proc.stderr
    terms = (state_dir / "term.log").read_text().splitlines()
    # Dependents first, each killed after ignoring SIGTERM; etcd asked only once both are gone.
    assert [line.split()[0] for line in terms] == [
        "kube-controller-manager",
        "kube-apiserver",
        "etcd",
    ]
    assert set(terms[2].split()[1:]) <= {"Z", "gone"}, f"etcd was stopped before them: {terms}"
    assert "kube-apiserver (pid" in proc.stderr, proc.stderr
    assert "SIGKILL" in proc.stderr, proc.stderr
    # Two components ignore SIGTERM for the whole grace period; nothing waits longer.
    assert 2 * GRACE_S <= took < 2 * GRACE_S + 8, f"stop took {took:.1f} s"
    assert not (state_dir / "run").exists()


def test_stop_leaves_a_reused_pid_alone(state_dir: Path) -> None:
    """A PID file older than the process that now has its PID names a process that is gone: the
    PID was reused by another one, which stop must not signal (nor its group)."""
    children: list[subprocess.Popen[bytes]] = []
    try:
        other = stand_in(state_dir, "kube-apiserver", "exit", children)
        pid_file = state_dir / "run" / "kube-apiserver.pid"
        an_hour_ago = time.time() - 3600
        os.utime(pid_file, (an_hour_ago, an_hour_ago))
        proc = run_stop(state_dir)
        still_there = other.poll() is None
    finally:
        for child in children:
            child.kill()
            child.wait(timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert still_there, "stop signalled a process that merely reused a recorded PID"
    assert "is another process now" in proc.stderr, proc.stderr
    assert not (state_dir / "term.log").exists()


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_stop_kills_a_real_api_server_whose_etcd_is_gone(tmp_path: Path) -> None:
    """The reported leak: kube-apiserver ignores SIGTERM once etcd is gone. A control plane of
    its own (the session's stays intact), etcd SIGKILLed, then stop: the API server is killed
    after the grace period and nothing of the state dir remains."""
    state_dir = tmp_path / "cp"
    try:
        cp = start_control_plane(state_dir, build_binaries())
    except ControlPlaneError as exc:
        pytest.fail(f"the control plane did not start:\n{exc}", pytrace=False)
    try:
        etcd, apiserver, kcm = cp.pids
        os.kill(etcd, 9)
        proc = run_stop(state_dir)
    finally:
        assert_none_left("NHIGATE_CP_STATE_DIR", str(state_dir), "the etcd-less control plane")
    assert proc.returncode == 0, proc.stderr
    assert f"kube-apiserver (pid {apiserver}) ignored SIGTERM" in proc.stderr, proc.stderr
    assert not is_running(apiserver)
    assert not is_running(kcm)
