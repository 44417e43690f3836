"""The models accept what the API server accepts and reject the rest with the CRD's words."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from nhigate.api.durations import duration_seconds, parse_duration
from nhigate.api.models import (
    IdentityIssuer,
    ProtectedService,
    Revocation,
    RouteGrant,
)
from nhigate.api.resources import describe_validation_error

ISSUER: dict[str, Any] = {
    "apiVersion": "nhigate.io/v1alpha1",
    "kind": "IdentityIssuer",
    "metadata": {"name": "ci", "namespace": "payments"},
    "spec": {
        "issuer": "https://ci.example",
        "jwksUri": "https://ci.example/jwks",
        "audiences": ["a"],
    },
}
SERVICE: dict[str, Any] = {
    "apiVersion": "nhigate.io/v1alpha1",
    "kind": "ProtectedService",
    "metadata": {"name": "payments-api", "namespace": "payments"},
    "spec": {"backend": {"service": "payments-api", "port": 8080}, "issuers": ["ci"]},
}
GRANT: dict[str, Any] = {
    "apiVersion": "nhigate.io/v1alpha1",
    "kind": "RouteGrant",
    "metadata": {"name": "ci-deploy", "namespace": "payments"},
    "spec": {
        "target": {"protectedService": "payments-api"},
        "subjects": [{"token": {"issuer": "ci", "subject": "repo:x"}}],
        "rules": [{"methods": ["GET"], "paths": ["/v1/payments/**"]}],
    },
}
REVOCATION: dict[str, Any] = {
    "apiVersion": "nhigate.io/v1alpha1",
    "kind": "Revocation",
    "metadata": {"name": "r", "namespace": "payments"},
    "spec": {"tokenId": "abc"},
}


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `base` with the dotted `path` set (value `...` deletes the key)."""
    doc = copy.deepcopy(base)
    node: Any = doc
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
    last = parts[-1]
    if value is ...:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return doc


def _errors(model: Any, doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(doc)
    return describe_validation_error(info.value)


def test_minimal_resources_validate_and_default() -> None:
    issuer = IdentityIssuer.model_validate(ISSUER)
    assert [a.value for a in issuer.spec.algorithms] == ["RS256", "ES256"]
    assert issuer.spec.max_token_lifetime == "1h"
    assert issuer.spec.clock_skew == "30s"
    service = ProtectedService.model_validate(SERVICE)
    assert service.spec.proxy.replicas == 2
    assert service.spec.proxy.port == 8443
    assert service.spec.isolation.mode.value == "Enforce"
    grant = RouteGrant.model_validate(GRANT)
    assert grant.key == "payments/ci-deploy"
    assert Revocation.model_validate(REVOCATION).spec.token_id == "abc"


def test_manifest_round_trips_with_camel_case_and_no_status() -> None:
    grant = RouteGrant.model_validate(_with(GRANT, "spec.expiresAt", "2030-01-01T00:00:00Z"))
    manifest = grant.manifest()
    assert "status" not in manifest
    assert manifest["spec"]["expiresAt"] == "2030-01-01T00:00:00Z"
    assert RouteGrant.model_validate(manifest) == grant


def test_unknown_spec_fields_are_rejected_but_unknown_metadata_is_ignored() -> None:
    assert any("extra" in e.lower() for e in _errors(RouteGrant, _with(GRANT, "spec.subjectz", [])))
    doc = _with(GRANT, "metadata.creationTimestamp", "2025-01-01T00:00:00Z")
    assert RouteGrant.model_validate(doc).name == "ci-deploy"


@pytest.mark.parametrize(
    ("model", "base", "path", "value", "expected"),
    [
        # RouteGrant subjects
        (
            RouteGrant,
            GRANT,
            "spec.subjects.0",
            {"token": {"issuer": "ci"}},
            "spec.subjects[0].token: a token subject needs subject or at least one claim",
        ),
        (
            RouteGrant,
            GRANT,
            "spec.subjects.0",
            {"token": {"issuer": "ci", "claims": {}}},
            "spec.subjects[0].token: a token subject needs subject or at least one claim",
        ),
        (
            RouteGrant,
            GRANT,
            "spec.subjects.0",
            {},
            "spec.subjects[0]: each subject must set exactly one of serviceAccount, token or "
            "spiffeId",
        ),
        (
            RouteGrant,
            GRANT,
            "spec.subjects.0",
            {"spiffeId": "spiffe://a/b", "serviceAccount": {"namespace": "a", "name": "b"}},
            "spec.subjects[0]: each subject must set exactly one of serviceAccount, token or "
            "spiffeId",
        ),
        (
            RouteGrant,
            GRANT,
            "spec.subjects.0",
            {"spiffeId": "https://a/b"},
            'spec.subjects[0].spiffeId: must start with "spiffe://"',
        ),
        (RouteGrant, GRANT, "spec.subjects", [], "spec.subjects: List should have at least 1 item"),
        # paths
        (
            RouteGrant,
            GRANT,
            "spec.rules.0.paths.0",
            "v1/x",
            'spec.rules[0].paths[0]: must start with "/"',
        ),
        (
            RouteGrant,
            GRANT,
            "spec.rules.0.paths.0",
            "/v1//x",
            'spec.rules[0].paths[0]: must not contain "//"',
        ),
        (RouteGrant, GRANT, "spec.rules.0.paths.0", "/v1/../x", "dot-segments"),
        (RouteGrant, GRANT, "spec.rules.0.paths.0", "/v1/./x", "dot-segments"),
        (RouteGrant, GRANT, "spec.rules.0.paths.0", "/v1/..", "dot-segments"),
        (RouteGrant, GRANT, "spec.rules.0.paths.0", "/v1/..;x/y", "dot-segments"),
        (RouteGrant, GRANT, "spec.rules.0.paths.0", "/v1\\x", "must not contain a backslash"),
        (RouteGrant, GRANT, "spec.rules.0.paths.0", "/v1/%2e%2e", "must not be percent-encoded"),
        (RouteGrant, GRANT, "spec.rules.0.paths.0", "/v1/a b", "may only contain"),
        (RouteGrant, GRANT, "spec.rules.0.paths.0", "/v1?x=1", "may only contain"),
        (
            RouteGrant,
            GRANT,
            "spec.rules.0.paths.0",
            "/v1/**/x",
            '"**" may only be the last segment',
        ),
        (RouteGrant, GRANT, "spec.rules.0.paths.0", "/v1/a*", "must be whole segments"),
        (RouteGrant, GRANT, "spec.rules.0.paths.0", "/v1/*a", "must be whole segments"),
        (RouteGrant, GRANT, "spec.rules.0.paths.0", "/v1/***", "must be whole segments"),
        (RouteGrant, GRANT, "spec.rules.0.methods", ["GET", "GET"], "Duplicate value: GET"),
        (
            RouteGrant,
            GRANT,
            "spec.rules.0.methods",
            ["TRACE"],
            "spec.rules[0].methods[0]: Input should be",
        ),
        (RouteGrant, GRANT, "spec.rules.0.methods", [], "List should have at least 1 item"),
        (RouteGrant, GRANT, "spec.rules", [], "List should have at least 1 item"),
        # times
        (
            RouteGrant,
            _with(GRANT, "spec.notBefore", "2026-01-01T00:00:00Z"),
            "spec.expiresAt",
            "2026-01-01T00:00:00Z",
            "spec.expiresAt: expiresAt must be after notBefore",
        ),
        (RouteGrant, GRANT, "spec.expiresAt", "2026-01-01T00:00:00", "timezone"),
        # issuer
        (
            IdentityIssuer,
            ISSUER,
            "spec.kubernetes",
            {},
            "exactly one of jwksUri, jwks or kubernetes",
        ),
        (
            IdentityIssuer,
            _with(ISSUER, "spec.jwksUri", ...),
            "spec.issuer",
            "x",
            "exactly one of jwksUri, jwks or kubernetes",
        ),
        (
            IdentityIssuer,
            ISSUER,
            "spec.algorithms",
            ["none"],
            "spec.algorithms[0]: Input should be",
        ),
        (
            IdentityIssuer,
            ISSUER,
            "spec.algorithms",
            ["HS256"],
            "spec.algorithms[0]: Input should be",
        ),
        (IdentityIssuer, ISSUER, "spec.audiences", [], "List should have at least 1 item"),
        (IdentityIssuer, ISSUER, "spec.maxTokenLifetime", "1d", "should match pattern"),
        (IdentityIssuer, ISSUER, "spec.maxTokenLifetime", "0s", "must be longer than 0s"),
        (IdentityIssuer, ISSUER, "spec.jwksUri", "ftp://x", "should match pattern"),
        (
            IdentityIssuer,
            _with(ISSUER, "spec.jwksUri", ...),
            "spec.jwks",
            {"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "d": "secret"}]},
            "public keys only",
        ),
        (
            IdentityIssuer,
            _with(ISSUER, "spec.jwksUri", ...),
            "spec.jwks",
            {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]},
            "spec.jwks.keys[0].kty: Input should be",
        ),
        # service
        (ProtectedService, SERVICE, "spec.backend.port", 0, "greater than or equal to 1"),
        (ProtectedService, SERVICE, "spec.issuers", [], "List should have at least 1 item"),
        (ProtectedService, SERVICE, "spec.tenant", {}, "tenant needs a header or a claim"),
        (ProtectedService, SERVICE, "spec.proxy", {"port": 9090}, "port and adminPort must differ"),
        (
            ProtectedService,
            SERVICE,
            "spec.proxy",
            {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
            "minReplicas must not be greater than maxReplicas",
        ),
        (
            ProtectedService,
            SERVICE,
            "spec.rateLimit",
            {"requestsPerSecond": 0, "burst": 1},
            "greater than 0",
        ),
        (
            ProtectedService,
            SERVICE,
            "spec.upstreamCredential",
            {"secretName": "s", "key": ".."},
            'must not be "." or ".."',
        ),
        (
            ProtectedService,
            SERVICE,
            "spec.upstreamCredential",
            {"secretName": "s", "key": "../x"},
            "should match pattern",
        ),
        (
            ProtectedService,
            SERVICE,
            "spec.upstreamCredential",
            {"secretName": "s", "key": "k", "header": "Host"},
            "hop-by-hop",
        ),
        (
            ProtectedService,
            SERVICE,
            "spec.upstreamCredential",
            {"secretName": "s", "key": "k", "prefix": "Bearer\r\nX-Evil: 1"},
            "should match pattern",
        ),
        (ProtectedService, SERVICE, "spec.isolation", {"allowFrom": [{}]}, "set at least one of"),
        (
            ProtectedService,
            SERVICE,
            "spec.isolation",
            {"allowFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]},
            "cannot be combined",
        ),
        (
            ProtectedService,
            SERVICE,
            "spec.isolation",
            {"allowFrom": [{"ipBlock": {"cidr": "10.0.0.1"}}]},
            "must be a CIDR",
        ),
        (
            ProtectedService,
            SERVICE,
            "spec.proxy",
            {"resources": {"limits": {"cpu": "lots"}}},
            "not a Kubernetes quantity",
        ),
        (
            ProtectedService,
            SERVICE,
            "spec.identityAssertion",
            {"ttl": "48h"},
            "must be at most 24h",
        ),
        (
            ProtectedService,
            SERVICE,
            "spec.proxy",
            {"connections": {"requestHeadTimeout": "500ms"}},
            "must be between 1s and 10m",
        ),
        (
            ProtectedService,
            SERVICE,
            "spec.proxy",
            {"connections": {"requestHeadTimeout": "11m"}},
            "must be between 1s and 10m",
        ),
        (
            ProtectedService,
            SERVICE,
            "spec.proxy",
            {"connections": {"idleTimeout": "2h"}},
            "must be between 1s and 1h",
        ),
        (
            ProtectedService,
            SERVICE,
            "spec.proxy",
            {"connections": {"maxConnections": 0}},
            "greater than or equal to 16",
        ),
        (ProtectedService, SERVICE, "metadata.name", "a" * 56, "at most 55 characters"),
        (ProtectedService, SERVICE, "metadata.name", "9lives", "DNS-1035"),
        # revocation
        (Revocation, REVOCATION, "spec.serviceAccountUID", "u", "set exactly one selector"),
        (
            Revocation,
            REVOCATION,
            "spec",
            {"issuer": "ci"},
            "issuer and subject must be set together",
        ),
        (Revocation, REVOCATION, "spec", {}, "set exactly one selector"),
        # metadata
        (
            RouteGrant,
            GRANT,
            "metadata.name",
            "Not_A_Name",
            "metadata.name: String should match pattern",
        ),
    ],
)
def test_invalid_resources_are_rejected_with_the_crd_message(
    model: Any, base: dict[str, Any], path: str, value: Any, expected: str
) -> None:
    errors = _errors(model, _with(base, path, value))
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/**",
        "/v1/payments",
        "/v1/payments/",
        "/v1/*/history",
        "/v1/items/**",
        "/v1/a-b_c~d.e/@x:y;z=1,2+3!$&'()",
    ],
)
def test_valid_path_patterns(path: str) -> None:
    RouteGrant.model_validate(_with(GRANT, "spec.rules.0.paths.0", path))


@pytest.mark.parametrize(
    "subject",
    [
        {"serviceAccount": {"namespace": "ci", "name": "deployer"}},
        {"token": {"issuer": "ci", "claims": {"job": "deploy"}}},
        {"spiffeId": "spiffe://example.org/ns/ci/sa/deployer"},
    ],
)
def test_each_subject_form_is_accepted(subject: dict[str, Any]) -> None:
    RouteGrant.model_validate(_with(GRANT, "spec.subjects.0", subject))


def test_quantities_accept_ints_and_strings() -> None:
    doc = _with(SERVICE, "spec.proxy", {"resources": {"limits": {"cpu": 2, "memory": "128Mi"}}})
    limits = ProtectedService.model_validate(doc).spec.proxy.resources
    assert limits is not None
    assert limits.limits is not None
    assert limits.limits.cpu == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("1h30m", timedelta(minutes=90)),
        ("250ms", timedelta(milliseconds=250)),
        ("1h1h", timedelta(hours=2)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "1", "1d", "-1s", "1.5s", "s", "1h 30m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_duration_seconds_rounds_up() -> None:
    assert duration_seconds("250ms") == 1
    assert duration_seconds("1m") == 60
    assert duration_seconds("0s") == 0
