"""Judging RouteGrants and Revocations as pure functions (no API server, no Controller)."""

from __future__ import annotations

from typing import Any

from controller_harness import issuer, protected_service, route_grant
from nhigate.api.models import IdentityIssuer, ProtectedService, Revocation
from nhigate.controller.grants import (
    grant_target,
    grant_window,
    judge_grant,
    orphan_grant_status,
)
from nhigate.controller.revocations import parse_revocation, revocation_verdict
from nhigate.controller.status_writer import status_json

NS = "team"
NOW = 1_900_000_000.0
API = "nhigate.io/v1alpha1"


def _ps(**spec: Any) -> ProtectedService:
    body = protected_service(NS, **spec)
    body["metadata"]["generation"] = 1
    return ProtectedService.model_validate(body)


def _issuers(*bodies: dict[str, Any]) -> list[IdentityIssuer]:
    return [IdentityIssuer.model_validate(b) for b in bodies or (issuer(NS),)]


def test_grant_target_reads_the_protected_service_name_or_none() -> None:
    assert grant_target(route_grant(NS, "g", target="api")) == "api"
    assert grant_target({"spec": {}}) is None
    assert grant_target({}) is None


def test_grant_window_reads_not_before_and_expires_at_as_seconds() -> None:
    body = route_grant(NS, "g", notBefore="2030-01-01T00:00:00Z", expiresAt="2030-01-02T00:00:00Z")
    assert grant_window(body) == (1_893_456_000.0, 1_893_542_400.0)
    assert grant_window(route_grant(NS, "open")) == (None, None)


def test_a_valid_grant_naming_a_trusted_issuer_is_accepted() -> None:
    grant, verdict = judge_grant(route_grant(NS, "g"), _ps(), _issuers(), NOW)
    assert grant is not None
    assert grant.key == f"{NS}/g"
    assert (verdict["type"], verdict["status"], verdict["reason"]) == (
        "Accepted",
        "True",
        "Accepted",
    )
    assert verdict["message"] == "accepted for ProtectedService api"


def test_a_grant_naming_a_missing_issuer_is_refused_naming_the_field() -> None:
    grant, verdict = judge_grant(route_grant(NS, "g", issuer_name="gone"), _ps(), _issuers(), NOW)
    assert grant is None
    assert (verdict["status"], verdict["reason"]) == ("False", "IssuerNotFound")
    assert verdict["message"].startswith("spec.subjects[0].token.issuer: IdentityIssuer 'gone'")


def test_a_grant_naming_an_issuer_its_target_does_not_trust_is_refused() -> None:
    other = issuer(NS, "other")
    grant, verdict = judge_grant(
        route_grant(NS, "g", issuer_name="other"), _ps(), _issuers(issuer(NS), other), NOW
    )
    assert grant is None
    assert verdict["reason"] == "IssuerNotFound"
    assert "'other' is not in ProtectedService api's spec.issuers" in verdict["message"]


def test_a_service_account_subject_needs_a_trusted_kubernetes_issuer() -> None:
    body = route_grant(NS, "g")
    body["spec"]["subjects"] = [{"serviceAccount": {"namespace": NS, "name": "ci"}}]
    grant, verdict = judge_grant(body, _ps(), _issuers(), NOW)
    assert grant is None
    assert verdict["reason"] == "IssuerNotFound"
    assert "trusts no IdentityIssuer with kubernetes: {}" in verdict["message"]

    kube = issuer(NS, "kube", kubernetes={})
    grant, verdict = judge_grant(body, _ps(issuers=["kube"]), _issuers(kube), NOW)
    assert grant is not None
    assert verdict["status"] == "True"


def test_a_spiffe_subject_needs_mtls_on_the_target() -> None:
    body = route_grant(NS, "g")
    body["spec"]["subjects"] = [{"spiffeId": "spiffe://example.org/ci"}]
    grant, verdict = judge_grant(body, _ps(), _issuers(), NOW)
    assert grant is None
    assert verdict["reason"] == "InvalidSpec"
    assert verdict["message"].startswith("spec.subjects[0].spiffeId:")


def test_an_invalid_spec_is_refused_with_invalid_spec() -> None:
    body = route_grant(NS, "g")
    body["spec"]["subjects"] = "nobody"
    grant, verdict = judge_grant(body, _ps(), _issuers(), NOW)
    assert grant is None
    assert (verdict["status"], verdict["reason"]) == ("False", "InvalidSpec")
    assert "spec.subjects" in verdict["message"]


def test_a_grant_breaking_the_grant_policy_is_refused_with_the_policy_reason() -> None:
    grant, verdict = judge_grant(
        route_grant(NS, "g"), _ps(grantPolicy={"requireExpiry": True}), _issuers(), NOW
    )
    assert grant is None
    assert (verdict["status"], verdict["reason"]) == ("False", "ExpiryRequired")


def test_an_orphan_grant_is_not_accepted_not_enforced_and_keeps_its_usage() -> None:
    body = route_grant(NS, "g", target="gone")
    usage = {"lastUsed": "2030-01-01T00:00:00Z", "requests": 3, "window": "24h", "replicas": 1}
    body["status"] = {"usage": usage}
    desired, fields = orphan_grant_status(body, NS, "gone", NOW)
    by_type = {d["type"]: d for d in desired}
    assert (by_type["Accepted"]["status"], by_type["Accepted"]["reason"]) == (
        "False",
        "TargetNotFound",
    )
    assert by_type["Accepted"]["message"] == (
        f"spec.target.protectedService: ProtectedService gone not found in namespace {NS}"
    )
    assert by_type["Active"]["status"] == "True"
    assert (by_type["Enforced"]["status"], by_type["Enforced"]["reason"]) == (
        "False",
        "NotAccepted",
    )
    assert status_json(fields) == {"enforcedReplicas": "0/0", "usage": usage}  # kept as stored
    assert status_json(orphan_grant_status(route_grant(NS, "h"), NS, "gone", NOW)[1]) == {
        "enforcedReplicas": "0/0"
    }
    body["status"] = {"usage": {"lastUsed": "not a time", "window": "24h"}}
    assert "usage" not in status_json(orphan_grant_status(body, NS, "gone", NOW)[1])


def _revocation(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "Revocation",
        "metadata": {"name": "r", "namespace": NS},
        "spec": {"issuer": "ci", "subject": "deployer", **spec},
    }


def test_a_revocation_with_an_invalid_spec_gets_invalid_spec() -> None:
    verdict = parse_revocation(_revocation(until="not a time"))
    assert not isinstance(verdict, Revocation)
    assert (verdict["type"], verdict["status"], verdict["reason"]) == (
        "Accepted",
        "False",
        "InvalidSpec",
    )


def test_a_revocation_is_accepted_for_its_target_or_the_whole_namespace() -> None:
    targeted = parse_revocation(_revocation(target={"protectedService": "api"}))
    assert isinstance(targeted, Revocation)
    verdict = revocation_verdict(targeted, target_found=True)
    assert (verdict["status"], verdict["message"]) == ("True", "revoked for ProtectedService api")

    everywhere = parse_revocation(_revocation())
    assert isinstance(everywhere, Revocation)
    verdict = revocation_verdict(everywhere, target_found=False)  # no target: nothing to find
    assert verdict["message"] == "revoked for every ProtectedService in the namespace"


def test_a_revocation_whose_target_is_missing_is_not_accepted() -> None:
    targeted = parse_revocation(_revocation(target={"protectedService": "gone"}))
    assert isinstance(targeted, Revocation)
    verdict = revocation_verdict(targeted, target_found=False)
    assert (verdict["status"], verdict["reason"]) == ("False", "TargetNotFound")
    assert verdict["message"] == (
        f"spec.target.protectedService: ProtectedService gone not found in namespace {NS}"
    )
