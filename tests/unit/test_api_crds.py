"""The generated CRDs are structural, bounded for CEL cost, and carry every mirrored rule."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from nhigate.api.crds import build_crd, build_crds
from nhigate.api.models import RESOURCE_TYPES, Resource

CRDS = {model.KIND: build_crd(model) for model in RESOURCE_TYPES}


def _schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = CRDS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_schema_is_structural(kind: str) -> None:
    for path, node in _nodes(_schema(kind)):
        text = yaml.safe_dump(node)
        assert "$ref" not in text, path
        assert "nullable" not in node, path
        assert "title" not in node, path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string") is True, (
                f"{path}: anyOf of differing types"
            )
            continue
        assert "type" in node, f"{path}: every node needs a type"
        if node["type"] == "object" and path != ".metadata":  # the API server owns metadata
            assert (
                "properties" in node
                or "additionalProperties" in node
                or node.get("x-kubernetes-preserve-unknown-fields") is True
            ), f"{path}: object without properties"
            assert node.get("additionalProperties") is not False, path
            assert not ("properties" in node and "additionalProperties" in node), path
        if "default" in node:
            assert node["default"] is not None, path


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_strings_and_lists_in_spec_are_bounded(kind: str) -> None:
    for path, node in _nodes(_schema(kind)["properties"]["spec"], ".spec"):
        if (
            node.get("type") == "string"
            and "enum" not in node
            and node.get("format") != "date-time"
        ):
            assert "maxLength" in node, f"{path}: unbounded string"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path}: unbounded list"
        if node.get("type") == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, f"{path}: unbounded map"


def test_names_columns_and_subresources() -> None:
    for model in RESOURCE_TYPES:
        crd = CRDS[model.KIND]
        assert crd["metadata"]["name"] == f"{model.PLURAL}.nhigate.io"
        names = crd["spec"]["names"]
        assert names["categories"] == ["nhigate"]
        assert names["shortNames"] == [model.SHORT_NAME]
        version = crd["spec"]["versions"][0]
        assert version["name"] == "v1alpha1"
        assert version["storage"]
        assert version["served"]
        assert version["subresources"] == {"status": {}}
        assert crd["spec"]["scope"] == "Namespaced"
    grant_columns = [
        c["name"] for c in CRDS["RouteGrant"]["spec"]["versions"][0]["additionalPrinterColumns"]
    ]
    assert grant_columns == ["Target", "Accepted", "Enforced", "Expires", "Last-Used", "Age"]
    ps_columns = [
        c["name"]
        for c in CRDS["ProtectedService"]["spec"]["versions"][0]["additionalPrinterColumns"]
    ]
    assert ps_columns == ["Backend", "Ready", "DirectPathBlocked", "Enforced", "Protocol", "Age"]


def _rules(kind: str) -> list[dict[str, str]]:
    found = []
    for _, node in _nodes(_schema(kind)):
        found.extend(node.get("x-kubernetes-validations", []))
    return found


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("RouteGrant", "expiresAt must be after notBefore"),
        ("RouteGrant", "each subject must set exactly one of serviceAccount, token or spiffeId"),
        ("RouteGrant", "a token subject needs subject or at least one claim"),
        ("RouteGrant", 'must start with "spiffe://"'),
        ("RouteGrant", 'must start with "/"'),
        ("RouteGrant", 'must not contain "//"'),
        ("RouteGrant", "must not contain a backslash"),
        (
            "RouteGrant",
            '"*" and "**" must be whole segments, and "**" may only be the last segment',
        ),
        ("IdentityIssuer", "exactly one of jwksUri, jwks or kubernetes must be set"),
        ("IdentityIssuer", "inline jwks must hold public keys only (found private key members)"),
        (
            "Revocation",
            "set exactly one selector: issuer and subject, tokenId, or serviceAccountUID",
        ),
        ("ProtectedService", "tenant needs a header or a claim"),
    ],
)
def test_cel_rules_are_present_with_readable_messages(kind: str, message: str) -> None:
    assert message in [r["message"] for r in _rules(kind)]


def test_every_rule_has_a_message_and_no_placeholder_rules() -> None:
    for kind in CRDS:
        for rule in _rules(kind):
            assert rule["message"]
            assert rule["rule"] not in ("true", "")


def test_defaults_match_the_spec() -> None:
    spec = _schema("IdentityIssuer")["properties"]["spec"]["properties"]
    assert spec["algorithms"]["default"] == ["RS256", "ES256"]
    assert spec["maxTokenLifetime"]["default"] == "1h"
    assert spec["clockSkew"]["default"] == "30s"
    ps = _schema("ProtectedService")["properties"]["spec"]["properties"]
    assert ps["proxy"]["default"] == {}
    assert ps["proxy"]["properties"]["replicas"]["default"] == 2
    assert ps["isolation"]["properties"]["mode"]["default"] == "Enforce"
    assert ps["isolation"]["properties"]["mode"]["enum"] == ["Enforce", "Audit", "Off"]
    status = _schema("ProtectedService")["properties"]["status"]
    assert all("default" not in node for _, node in _nodes(status)), "status is never defaulted"


def test_rendered_yaml_has_no_aliases_and_parses() -> None:
    for name, text in build_crds().items():
        assert "&id" not in text, name
        assert "*id" not in text, name
        assert yaml.safe_load(text)["kind"] == "CustomResourceDefinition"


def test_resource_models_are_complete() -> None:
    assert sorted(m.KIND for m in RESOURCE_TYPES) == [
        "IdentityIssuer",
        "ProtectedService",
        "Revocation",
        "RouteGrant",
    ]
    assert all(issubclass(m, Resource) for m in RESOURCE_TYPES)


def _undescribed(node: dict[str, Any], path: str) -> Iterator[str]:
    """Every field (property) under `node` whose schema has no description."""
    for name, child in node.get("properties", {}).items():
        field = f"{path}.{name}"
        if name == "metadata" and "." not in path:
            continue  # the API server's own ObjectMeta (a CRD may not describe it)
        if not str(child.get("description", "")).strip():
            yield field
        yield from _undescribed(child, field)
    if isinstance(node.get("items"), dict):
        yield from _undescribed(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _undescribed(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_every_field_has_a_description(kind: str) -> None:
    """`kubectl explain` prints a field's schema description: none may be empty."""
    schema = _schema(kind)
    assert str(schema.get("description", "")).strip(), f"{kind}: the kind has no description"
    missing = list(_undescribed(schema, kind))
    assert not missing, f"{len(missing)} fields without a description: {missing}"


def test_type_meta_is_described_as_kubernetes_describes_it() -> None:
    for kind in CRDS:
        props = _schema(kind)["properties"]
        assert props["apiVersion"]["description"].startswith("APIVersion defines the versioned")
        assert props["kind"]["description"].startswith("Kind is a string value representing")
        # The API server rejects a CRD whose metadata says more than name/generateName; it
        # publishes Kubernetes' ObjectMeta (described) in its place.
        assert props["metadata"] == {"type": "object"}


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_every_printer_column_has_a_description(kind: str) -> None:
    for column in CRDS[kind]["spec"]["versions"][0]["additionalPrinterColumns"]:
        assert str(column.get("description", "")).strip(), f"{kind}: column {column['name']}"
