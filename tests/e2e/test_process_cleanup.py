"""Nothing the demo starts outlives it.

`hack/demo.sh --local` runs the process demo on the real API server (etcd, kube-apiserver,
kube-controller-manager, the controller, a proxy). Every process it starts inherits a tag in its
environment, also after `setsid` and reparenting to PID 1; once the demo has exited, /proc must
hold no live process with that tag. (The test suite's own control planes are checked the same way
when the session's `control_plane` fixture stops, see tests/conftest.py.)
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from cluster import REPO_ROOT, build_binaries
from processes import assert_none_left

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

DEMO = REPO_ROOT / "hack" / "demo.sh"
DEMO_TIMEOUT_S = 540
TAG = "NHIGATE_TEST_PROCESS_TAG"


@pytest.mark.timeout(DEMO_TIMEOUT_S + 60)
def test_the_demo_leaves_no_process_behind() -> None:
    build_binaries()  # a cold build is a prerequisite with its own bound, not part of the demo
    tag = uuid.uuid4().hex
    env = {**os.environ, TAG: tag}
    try:
        proc = subprocess.run(
            [str(DEMO), "--local"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=DEMO_TIMEOUT_S,
            check=False,
        )
    finally:
        # Also when the demo failed or hung: whatever it left is named, killed, and fails the test.
        assert_none_left(TAG, tag, "hack/demo.sh --local")
    assert proc.returncode == 0, f"the demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "cleaning up" in proc.stdout
