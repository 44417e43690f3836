"""`spec.proxy.connections` on the real API server: defaults applied, bounds refused readably."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cluster import ControlPlane

pytestmark = pytest.mark.cluster


def _service(namespace: str, name: str, proxy: dict[str, Any]) -> str:
    return json.dumps(
        {
            "apiVersion": "nhigate.io/v1alpha1",
            "kind": "ProtectedService",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "backend": {"service": "api", "port": 8080},
                "issuers": ["ci"],
                "proxy": proxy,
            },
        }
    )


def _apply(control_plane: ControlPlane, manifest: str) -> Any:
    return control_plane.kubectl("apply", "--server-side", "-f", "-", input=manifest, check=False)


def test_connection_limits_default_like_nginx_and_refuse_out_of_bounds_values(
    control_plane: ControlPlane, crds_installed: list[str], namespace: str
) -> None:
    assert "protectedservices.nhigate.io" in crds_installed
    applied = _apply(control_plane, _service(namespace, "defaults", {}))
    assert applied.returncode == 0, applied.stderr
    stored = json.loads(
        control_plane.kubectl(
            "get", "protectedservice", "defaults", "-n", namespace, "-o", "json"
        ).stdout
    )
    assert stored["spec"]["proxy"]["connections"] == {
        "requestHeadTimeout": "60s",
        "idleTimeout": "75s",
        "maxConnections": 4096,
    }

    cases = [
        ({"requestHeadTimeout": "500ms"}, "must be between 1s and 10m"),
        ({"requestHeadTimeout": "11m"}, "must be between 1s and 10m"),
        ({"idleTimeout": "2h"}, "must be between 1s and 1h"),
        ({"idleTimeout": "soon"}, "should match"),
        ({"maxConnections": 1}, "should be greater than or equal to 16"),
    ]
    for i, (connections, message) in enumerate(cases):
        refused = _apply(
            control_plane, _service(namespace, f"bad-{i}", {"connections": connections})
        )
        assert refused.returncode != 0, connections
        assert message in refused.stderr, (connections, refused.stderr)
