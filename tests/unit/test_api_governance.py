"""Grant governance: each grantPolicy rule refuses what breaks it, naming the rule, and a
refused grant is never compiled (fail closed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controller_harness import issuer, protected_service, route_grant
from nhigate.api import conditions as c
from nhigate.api.compile import build_policy_document
from nhigate.api.governance import judge_grant_policy
from nhigate.api.models import IdentityIssuer, ProtectedService, RouteGrant

NS = "team"
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _service(**grant_policy: Any) -> ProtectedService:
    return ProtectedService.model_validate(
        protected_service(NS, issuers=["ci", "cluster"], grantPolicy=grant_policy)
    )


def _issuers() -> list[IdentityIssuer]:
    return [
        IdentityIssuer.model_validate(issuer(NS, "ci")),
        IdentityIssuer.model_validate(issuer(NS, "cluster", kubernetes={})),
        IdentityIssuer.model_validate(issuer(NS, "other")),
    ]


def _grant(created: datetime | None = NOW, **spec: Any) -> RouteGrant:
    body = route_grant(NS, "g", **spec)
    if created is not None:
        body["metadata"]["creationTimestamp"] = _stamp(created)
    return RouteGrant.model_validate(body)


def _judge(grant: RouteGrant, service: ProtectedService) -> tuple[str, str] | None:
    breach = judge_grant_policy(grant, service, _issuers(), now=NOW)
    return None if breach is None else (breach.reason, breach.message)


def test_no_grant_policy_accepts_everything() -> None:
    service = ProtectedService.model_validate(protected_service(NS))
    assert _judge(_grant(), service) is None


def test_require_expiry_refuses_an_open_ended_grant() -> None:
    service = _service(requireExpiry=True)
    verdict = _judge(_grant(), service)
    assert verdict is not None
    assert verdict[0] == c.REASON_EXPIRY_REQUIRED
    assert "spec.expiresAt" in verdict[1]
    assert "grantPolicy.requireExpiry" in verdict[1]
    assert _judge(_grant(expiresAt=_stamp(NOW + timedelta(days=400))), service) is None


def test_max_duration_implies_an_expiry() -> None:
    verdict = _judge(_grant(), _service(maxDuration="8h"))
    assert verdict is not None
    assert verdict[0] == c.REASON_EXPIRY_REQUIRED
    assert "grantPolicy.maxDuration" in verdict[1]


@pytest.mark.parametrize(
    ("created", "not_before", "expires", "allowed"),
    [
        (NOW, None, NOW + timedelta(hours=8), True),
        (NOW, None, NOW + timedelta(hours=8, seconds=1), False),
        # notBefore later than creation: the window starts at notBefore.
        (NOW, NOW + timedelta(days=3), NOW + timedelta(days=3, hours=8), True),
        # notBefore before creation cannot stretch the window the other way.
        (NOW, NOW - timedelta(days=3), NOW + timedelta(hours=8), True),
        # An old grant extended by editing expiresAt: measured from its creation.
        (NOW - timedelta(days=30), None, NOW + timedelta(hours=1), False),
    ],
)
def test_max_duration_measures_from_the_later_of_creation_and_not_before(
    created: datetime, not_before: datetime | None, expires: datetime, allowed: bool
) -> None:
    spec: dict[str, Any] = {"expiresAt": _stamp(expires)}
    if not_before is not None:
        spec["notBefore"] = _stamp(not_before)
    verdict = _judge(_grant(created, **spec), _service(maxDuration="8h"))
    if allowed:
        assert verdict is None
    else:
        assert verdict is not None
        assert verdict[0] == c.REASON_DURATION_TOO_LONG
        assert "grantPolicy.maxDuration (8h)" in verdict[1]


def test_require_reason_refuses_absent_and_blank_reasons() -> None:
    service = _service(requireReason=True)
    for grant in (_grant(), _grant(reason="   ")):
        verdict = _judge(grant, service)
        assert verdict is not None
        assert verdict[0] == c.REASON_REASON_REQUIRED
        assert verdict[1].startswith("spec.reason:")
    assert _judge(_grant(reason="deploys from CI, ticket OPS-1"), service) is None


def test_allowed_issuers_refuses_a_token_subject_of_another_issuer() -> None:
    service = _service(allowedIssuers=["cluster"])
    verdict = _judge(_grant(issuer_name="ci"), service)
    assert verdict is not None
    assert verdict[0] == c.REASON_ISSUER_NOT_ALLOWED
    assert "spec.subjects[0].token.issuer: 'ci'" in verdict[1]
    assert _judge(_grant(issuer_name="ci"), _service(allowedIssuers=["ci"])) is None


def test_allowed_issuers_admit_service_accounts_only_through_a_kubernetes_issuer() -> None:
    subjects = [{"serviceAccount": {"namespace": NS, "name": "deployer"}}]
    refused = _judge(_grant(subjects=subjects), _service(allowedIssuers=["ci"]))
    assert refused is not None
    assert refused[0] == c.REASON_ISSUER_NOT_ALLOWED
    assert "spec.subjects[0].serviceAccount" in refused[1]
    assert _judge(_grant(subjects=subjects), _service(allowedIssuers=["cluster"])) is None


def test_allowed_issuers_refuse_spiffe_subjects() -> None:
    subjects = [{"token": {"issuer": "ci", "subject": "x"}}, {"spiffeId": "spiffe://x/y"}]
    verdict = _judge(_grant(subjects=subjects), _service(allowedIssuers=["ci"]))
    assert verdict is not None
    assert verdict[0] == c.REASON_ISSUER_NOT_ALLOWED
    assert "spec.subjects[1].spiffeId" in verdict[1]


def test_a_refused_grant_is_not_compiled_into_the_policy() -> None:
    service = _service(requireExpiry=True)
    kept = _grant(expiresAt=_stamp(NOW + timedelta(hours=1)))
    refused = RouteGrant.model_validate(route_grant(NS, "open-ended"))
    document = build_policy_document(service, _issuers(), [kept, refused], [], now=NOW)
    assert [g.name for g in document.grants] == [f"{NS}/g"]
