"""`kubectl explain` on the real API server describes every field of every nhigate kind.

`kubectl explain` reads the OpenAPI v3 document the API server publishes from the CRDs, so this
walks exactly that document (not our generated files) and then asks kubectl itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from cluster import ControlPlane
from nhigate.api.models import RESOURCE_TYPES

pytestmark = pytest.mark.cluster

_PREFIX = "io.nhigate.v1alpha1."


def _undescribed(node: dict[str, Any], path: str) -> Iterator[str]:
    for name, child in node.get("properties", {}).items():
        field = f"{path}.{name}"
        # A `$ref` (metadata -> ObjectMeta) is a built-in type the API server describes itself.
        builtin = "$ref" in child or any("$ref" in part for part in child.get("allOf", ()))
        if not child.get("description") and not builtin:
            yield field
        yield from _undescribed(child, field)
    if isinstance(node.get("items"), dict):
        yield from _undescribed(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _undescribed(node["additionalProperties"], f"{path}{{}}")


def test_published_openapi_describes_every_field(
    control_plane: ControlPlane, crds_installed: list[str]
) -> None:
    raw = control_plane.kubectl("get", "--raw", "/openapi/v3/apis/nhigate.io/v1alpha1").stdout
    schemas = json.loads(raw)["components"]["schemas"]
    for model in RESOURCE_TYPES:
        schema = schemas[_PREFIX + model.KIND]
        missing = list(_undescribed(schema, model.KIND))
        assert not missing, f"{len(missing)} undescribed fields: {missing}"


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("routegrant.spec.rules", ["methods", "paths", "HTTP methods allowed"]),
        ("routegrant.spec.subjects.serviceAccount", ["Name of the service account."]),
        ("protectedservice.status", ["bypassPaths", "Every direct path to the backend"]),
        ("identityissuer.spec.jwks.keys", ["Key ID"]),
        ("revocation", ["APIVersion defines the versioned schema", "Standard object's metadata"]),
    ],
)
def test_kubectl_explain_has_a_description_for_each_field(
    control_plane: ControlPlane, crds_installed: list[str], field: str, expected: list[str]
) -> None:
    out = control_plane.kubectl("explain", field).stdout
    assert "<no description>" not in out, out
    for text in expected:
        assert text in out, out
