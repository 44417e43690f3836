"""build_policy_document: which resources reach a service's policy, and in what form."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from nhigate.api.compile import UPSTREAM_CREDENTIAL_DIR, build_policy_document, missing_issuers
from nhigate.api.models import IdentityIssuer, ProtectedService, Revocation, RouteGrant
from nhigate.api.resources import load_resources
from nhigate.policy import (
    Facts,
    Identity,
    IdentityKind,
    ServiceAccountSubject,
    SpiffeSubject,
    TokenSubject,
    compile_policy,
    decide,
    decode_document,
    encode_document,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOW = datetime(2026, 6, 1, tzinfo=UTC)


def _service(**spec: Any) -> ProtectedService:
    base: dict[str, Any] = {"backend": {"service": "api", "port": 80}, "issuers": ["ci", "k8s"]}
    return ProtectedService.model_validate(
        {"metadata": {"name": "api", "namespace": "ns"}, "spec": {**base, **spec}}
    )


def _issuer(name: str, namespace: str = "ns", **source: Any) -> IdentityIssuer:
    return IdentityIssuer.model_validate(
        {
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"issuer": f"https://{name}", "audiences": ["api"], **source},
        }
    )


def _grant(name: str, namespace: str = "ns", target: str = "api", **spec: Any) -> RouteGrant:
    base: dict[str, Any] = {
        "target": {"protectedService": target},
        "subjects": [{"token": {"issuer": "ci", "subject": "job"}}],
        "rules": [{"methods": ["GET"], "paths": ["/v1/**"]}],
    }
    return RouteGrant.model_validate(
        {"metadata": {"name": name, "namespace": namespace}, "spec": {**base, **spec}}
    )


def _revocation(name: str, namespace: str = "ns", **spec: Any) -> Revocation:
    return Revocation.model_validate(
        {"metadata": {"name": name, "namespace": namespace}, "spec": spec}
    )


@pytest.mark.parametrize(
    ("grant", "kept"),
    [
        (_grant("plain"), True),
        (_grant("other-target", target="other"), False),
        (_grant("other-namespace", namespace="elsewhere"), False),
        (_grant("expired", expiresAt="2026-05-31T23:59:59Z"), False),
        (_grant("expires-exactly-now", expiresAt="2026-06-01T00:00:00Z"), False),
        (_grant("expires-later", expiresAt="2026-06-01T00:00:01Z"), True),
        (_grant("not-yet-valid", notBefore="2027-01-01T00:00:00Z"), True),
    ],
)
def test_grant_selection(grant: RouteGrant, kept: bool) -> None:
    doc = build_policy_document(_service(), [], [grant], [], now=NOW)
    assert [g.name for g in doc.grants] == ([grant.key] if kept else [])


@pytest.mark.parametrize(
    ("revocation", "kept"),
    [
        (_revocation("forever", tokenId="t"), True),
        (_revocation("targeted", tokenId="t", target={"protectedService": "api"}), True),
        (_revocation("other-target", tokenId="t", target={"protectedService": "x"}), False),
        (_revocation("other-ns", namespace="x", tokenId="t"), False),
        (_revocation("over", tokenId="t", until="2026-05-01T00:00:00Z"), False),
        (_revocation("running", tokenId="t", until="2026-07-01T00:00:00Z"), True),
    ],
)
def test_revocation_selection(revocation: Revocation, kept: bool) -> None:
    doc = build_policy_document(_service(), [], [], [revocation], now=NOW)
    assert [r.name for r in doc.revocations] == ([revocation.key] if kept else [])


def test_drop_expired_false_keeps_everything_for_explain() -> None:
    grant = _grant("expired", expiresAt="2020-01-01T00:00:00Z")
    doc = build_policy_document(_service(), [], [grant], [], now=NOW, drop_expired=False)
    assert [g.name for g in doc.grants] == ["ns/expired"]


def test_subjects_rules_and_times_are_translated() -> None:
    grant = _grant(
        "g",
        subjects=[
            {"serviceAccount": {"namespace": "ci", "name": "deployer"}},
            {"token": {"issuer": "ci", "claims": {"b": "2", "a": "1"}}},
            {"spiffeId": "spiffe://example.org/x"},
        ],
        rules=[{"methods": ["GET", "*"], "paths": ["/a", "/b/*"]}],
        tenant="t1",
        notBefore="2026-01-01T00:00:00Z",
        expiresAt="2027-01-01T00:00:00Z",
        rateLimit={"requestsPerSecond": 2.5, "burst": 5},
        reason="because",
    )
    (compiled,) = build_policy_document(_service(), [], [grant], [], now=NOW).grants
    assert set(compiled.subjects) == {
        ServiceAccountSubject("ci", "deployer"),
        TokenSubject("ci", None, (("a", "1"), ("b", "2"))),
        SpiffeSubject("spiffe://example.org/x"),
    }
    assert compiled.rules[0].methods == frozenset({"GET", "*"})
    assert compiled.tenant == "t1"
    assert compiled.not_before == datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    assert compiled.expires_at == datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    assert compiled.rate_limit is not None
    assert compiled.rate_limit.burst == 5
    assert compiled.reason == "because"


def test_issuers_key_sources_and_fetched_keys() -> None:
    jwks = {"keys": [{"kty": "EC", "crv": "P-256", "x": "x", "y": "y", "kid": "1"}]}
    fetched = {"keys": [{"kty": "RSA", "n": "n", "e": "AQAB", "kid": "k8s"}]}
    issuers = [
        _issuer("ci", jwks=jwks, maxTokenLifetime="15m", clockSkew="250ms", refreshInterval="10m"),
        _issuer("k8s", kubernetes={}),
        _issuer("unused", jwksUri="https://unused/jwks"),
        _issuer("ci", namespace="elsewhere", jwksUri="https://evil/jwks"),
    ]
    doc = build_policy_document(_service(), issuers, [], [], now=NOW, issuer_jwks={"k8s": fetched})
    by_name = {i.name: i for i in doc.issuers}
    assert set(by_name) == {"ci", "k8s"}
    assert by_name["ci"].jwks == jwks
    assert by_name["ci"].jwks_uri is None
    assert by_name["ci"].max_token_lifetime_seconds == 900
    assert by_name["ci"].clock_skew_seconds == 1
    assert by_name["ci"].refresh_interval_seconds == 600
    assert by_name["k8s"].refresh_interval_seconds == 300  # the CRD default, 5m
    assert by_name["k8s"].kubernetes is True
    assert by_name["k8s"].jwks == fetched


def test_jwks_uri_issuer_keeps_its_uri_unless_keys_were_fetched() -> None:
    issuer = _issuer("ci", jwksUri="https://ci/jwks")
    plain = build_policy_document(_service(issuers=["ci"]), [issuer], [], [], now=NOW)
    assert plain.issuers[0].jwks_uri == "https://ci/jwks"
    keys = {"keys": [{"kty": "EC", "crv": "P-256", "x": "x", "y": "y"}]}
    inlined = build_policy_document(
        _service(issuers=["ci"]), [issuer], [], [], now=NOW, issuer_jwks={"ci": keys}
    )
    assert inlined.issuers[0].jwks == keys
    assert inlined.issuers[0].jwks_uri is None


def test_missing_issuers_are_reported_not_invented() -> None:
    service = _service()
    assert missing_issuers(service, [_issuer("ci", jwksUri="https://ci/j")]) == ["k8s"]


def test_service_options() -> None:
    service = _service(
        upstreamCredential={"secretName": "creds", "key": "token", "prefix": "Bearer "},
        identityAssertion={"ttl": "2m"},
        tenant={"header": "X-Tenant", "claim": "tenant"},
        rateLimit={"requestsPerSecond": 10, "burst": 20},
    )
    svc = build_policy_document(service, [], [], [], now=NOW).service
    assert svc.upstream_credential is not None
    assert svc.upstream_credential.value_file == f"{UPSTREAM_CREDENTIAL_DIR}/token"
    assert svc.upstream_credential.header == "Authorization"
    assert svc.upstream_credential.prefix == "Bearer "
    assert svc.identity_assertion is not None
    assert svc.identity_assertion.ttl_seconds == 120
    assert svc.identity_assertion.audience == "ns/api"
    assert svc.tenant is not None
    assert svc.tenant.claim == "tenant"
    assert (svc.backend_service, svc.backend_port) == ("api", 80)
    disabled = _service(identityAssertion={"enabled": False})
    assert build_policy_document(disabled, [], [], [], now=NOW).service.identity_assertion is None


def test_document_is_deterministic_and_round_trips() -> None:
    grants = [_grant("b"), _grant("a")]
    one = build_policy_document(_service(), [], grants, [], now=NOW)
    two = build_policy_document(_service(), [], list(reversed(grants)), [], now=NOW)
    assert one.version == two.version
    assert decode_document(encode_document(one)) == one


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        build_policy_document(_service(), [], [], [], now=datetime(2026, 1, 1))


def test_examples_compile_to_a_policy_that_allows_ci_and_denies_others() -> None:
    resources = load_resources([EXAMPLES])
    policy = compile_policy(resources.policy_document_for("payments-api", NOW))
    ci = Identity(
        kind=IdentityKind.JWT,
        issuer="demo-issuer",
        subject="repo:acme/payments:ref:refs/heads/main",
        claims={"job": "deploy"},
    )
    allowed = decide(policy, Facts(ci, "POST", "/v1/refunds", NOW.timestamp()))
    assert allowed.allowed
    assert allowed.grant == "payments/ci-deploy"
    denied = decide(policy, Facts(ci, "DELETE", "/v1/payments/1", NOW.timestamp()))
    assert not denied.allowed


def test_examples_module_data_is_not_mutated() -> None:
    service = _service()
    before = copy.deepcopy(service.model_dump())
    build_policy_document(service, [], [_grant("x")], [], now=NOW)
    assert service.model_dump() == before
