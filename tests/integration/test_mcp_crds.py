"""The MCP and delegation parts of the CRDs, validated by a real kube-apiserver.

Each invalid object must be refused by the API server with the same readable
message the Python models give (the models mirror the CEL rules and patterns).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from cluster import ControlPlane

pytestmark = pytest.mark.cluster


def route_grant(namespace: str, name: str, rules: list[Any], **subject: Any) -> str:
    token: dict[str, Any] = {"issuer": "agents", "subject": "alice", **subject}
    return json.dumps(
        {
            "apiVersion": "nhigate.io/v1alpha1",
            "kind": "RouteGrant",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "target": {"protectedService": "tools"},
                "subjects": [{"token": token}],
                "rules": rules,
            },
        }
    )


def protected_service(namespace: str, endpoints: list[str]) -> str:
    return json.dumps(
        {
            "apiVersion": "nhigate.io/v1alpha1",
            "kind": "ProtectedService",
            "metadata": {"name": "tools", "namespace": namespace},
            "spec": {
                "backend": {"service": "tools", "port": 8080},
                "issuers": ["agents"],
                "mcp": {"endpoints": endpoints},
            },
        }
    )


def apply(cp: ControlPlane, manifest: str) -> tuple[int, str]:
    result = cp.kubectl("apply", "--server-side", "-f", "-", check=False, input=manifest)
    return result.returncode, result.stderr


def test_mcp_rules_and_delegation_are_accepted_and_refused_by_the_api_server(
    control_plane: ControlPlane, crds_installed: list[str], namespace: str
) -> None:
    assert "routegrants.nhigate.io" in crds_installed
    ok_rules = [{"mcp": {"endpoints": ["/mcp"], "tools": ["get_weather", "search_*"]}}]
    delegation = {"actors": ["agent-*"], "maxDepth": 2}
    assert apply(control_plane, protected_service(namespace, ["/mcp"]))[0] == 0
    code, err = apply(control_plane, route_grant(namespace, "ok", ok_rules, delegation=delegation))
    assert code == 0, err
    stored = json.loads(
        control_plane.kubectl("get", "routegrant", "ok", "-n", namespace, "-o", "json").stdout
    )
    # Defaults applied by the API server: maxDepth as given, required false.
    assert stored["spec"]["subjects"][0]["token"]["delegation"] == {**delegation, "required": False}

    refused = {
        "empty-mcp": (
            [{"mcp": {"tools": []}}],
            {},
            "an MCP rule needs at least one tool, resource or prompt",
        ),
        "mixed": (
            [{"methods": ["POST"], "paths": ["/mcp"], "mcp": {"tools": ["a"]}}],
            {},
            "a rule sets either methods and paths, or mcp",
        ),
        "no-paths": ([{"methods": ["GET"]}], {}, "a rule sets either methods and paths, or mcp"),
        "double-star": ([{"mcp": {"tools": ["a**"]}}], {}, "spec.rules[0].mcp.tools[0]"),
        "unicode": ([{"mcp": {"tools": ["caf\u00e9"]}}], {}, "spec.rules[0].mcp.tools[0]"),
        "slash-endpoint": (
            [{"mcp": {"endpoints": ["/mcp/"], "tools": ["a"]}}],
            {},
            "spec.rules[0].mcp.endpoints[0]",
        ),
        "deep": (ok_rules, {"delegation": {"actors": ["a"], "maxDepth": 9}}, "maxDepth"),
        "no-actors": (ok_rules, {"delegation": {"actors": []}}, "actors"),
    }
    for name, (rules, subject, message) in refused.items():
        code, err = apply(control_plane, route_grant(namespace, name, rules, **subject))
        assert code != 0, name
        assert message in err, (name, err)

    code, err = apply(control_plane, protected_service(namespace, ["/mcp/../admin"]))
    assert code != 0
    assert "spec.mcp.endpoints[0]" in err
    names = control_plane.kubectl("get", "routegrants", "-n", namespace, "-o", "name").stdout
    assert names.split() == ["routegrant.nhigate.io/ok"]
