"""`spec.websocket.paths` of the ProtectedService CRD, validated by a real kube-apiserver.

The paths use the RouteGrant path grammar: the API server must refuse what the policy
engine's parser refuses, with the same CEL messages, and keep what it accepts.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from cluster import ControlPlane

pytestmark = pytest.mark.cluster


def protected_service(namespace: str, name: str, websocket: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "nhigate.io/v1alpha1",
            "kind": "ProtectedService",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "backend": {"service": "chat", "port": 8080},
                "issuers": ["agents"],
                "websocket": websocket,
            },
        }
    )


def apply(cp: ControlPlane, manifest: str) -> tuple[int, str]:
    result = cp.kubectl("apply", "--server-side", "-f", "-", check=False, input=manifest)
    return result.returncode, result.stderr


def test_websocket_paths_are_accepted_and_refused_by_the_api_server(
    control_plane: ControlPlane, crds_installed: list[str], namespace: str
) -> None:
    assert "protectedservices.nhigate.io" in crds_installed
    ok = {"paths": ["/ws", "/rooms/*/ws", "/events/**"]}
    assert apply(control_plane, protected_service(namespace, "ok", ok))[0] == 0
    stored = control_plane.kubectl(
        "get", "protectedservice", "ok", "-n", namespace, "-o", "jsonpath={.spec.websocket.paths}"
    ).stdout
    assert json.loads(stored) == ok["paths"]

    refused = {
        "empty": ({"paths": []}, "spec.websocket.paths"),
        "no-paths": ({}, "spec.websocket.paths"),
        "dot-segment": ({"paths": ["/ws/../admin"]}, "spec.websocket.paths[0]"),
        "relative": ({"paths": ["ws"]}, "spec.websocket.paths[0]"),
        "inner-double-star": ({"paths": ["/a/**/ws"]}, "spec.websocket.paths[0]"),
        "duplicate": ({"paths": ["/ws", "/ws"]}, "spec.websocket.paths"),
    }
    for name, (websocket, where) in refused.items():
        code, err = apply(control_plane, protected_service(namespace, name, websocket))
        assert code != 0, name
        assert where in err, (name, err)
    names = control_plane.kubectl("get", "protectedservices", "-n", namespace, "-o", "name")
    assert names.stdout.split() == ["protectedservice.nhigate.io/ok"]
