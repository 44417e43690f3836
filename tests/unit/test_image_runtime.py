"""What the controller needs from the image at run time: no passwd entry, no HOME.

The first run of the chart on a real node crash-looped with `KeyError: 'getpwuid(): uid not
found: 65532'`: kopf's default identity (`detect_own_id`) calls `getpass.getuser()` unless
POD_ID is set. The controller now names itself, and never asks the passwd database.
"""

from __future__ import annotations

import pwd
from typing import Any

import pytest
from kopf._core.engines import peering

from nhigate.controller import run
from nhigate.controller.settings import ControllerSettings, default_identity

# Every variable getpass.getuser() or our identity could read.
IDENTITY_VARS = ("POD_ID", "POD_NAME", "LOGNAME", "USER", "LNAME", "USERNAME", "HOME")


@pytest.fixture
def no_passwd_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as a uid the passwd database does not know, with none of the variables set."""
    for name in IDENTITY_VARS:
        monkeypatch.delenv(name, raising=False)

    def getpwuid(uid: int) -> Any:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", getpwuid)


@pytest.mark.usefixtures("no_passwd_entry")
def test_kopfs_own_default_fails_without_a_passwd_entry() -> None:
    # The crash loop, reproduced: this is why the controller must not leave it to kopf.
    with pytest.raises(KeyError, match="uid not found"):
        peering.detect_own_id(manual=False)


@pytest.mark.usefixtures("no_passwd_entry")
def test_controller_identity_needs_no_passwd_entry() -> None:
    identity = ControllerSettings(proxy_image="img").identity
    assert identity.startswith("nhigate@")
    # Distinct per process start, as kopf's own is: two replicas on one host must differ.
    assert default_identity() != identity


def test_controller_identity_is_the_pod_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_identity({"POD_ID": "ctl-7d9-abc", "POD_NAME": "other"}) == "ctl-7d9-abc"
    assert default_identity({"POD_NAME": "ctl-7d9-abc"}) == "ctl-7d9-abc"
    assert default_identity({"POD_ID": "", "POD_NAME": "ctl-7d9-abc"}) == "ctl-7d9-abc"
    monkeypatch.setenv("POD_ID", "from-env")
    assert ControllerSettings(proxy_image="img").identity == "from-env"


@pytest.mark.usefixtures("no_passwd_entry")
async def test_run_controller_gives_kopf_its_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    async def operator(**kwargs: Any) -> None:
        seen.update(kwargs)

    monkeypatch.setattr(run.kopf, "operator", operator)
    settings = ControllerSettings(proxy_image="img", identity="ctl-0")
    await run.run_controller(settings)
    assert seen["identity"] == "ctl-0"
