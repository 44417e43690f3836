"""Grant governance: does a RouteGrant keep its ProtectedService's `spec.grantPolicy`?

One pure judgement, used by the controller (a grant that breaks a rule is `Accepted=False`
with the rule as reason) and by `build_policy_document` (such a grant is never compiled, in
the cluster or standalone: fail closed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from nhigate.api import conditions as c
from nhigate.api.durations import parse_duration
from nhigate.api.models import IdentityIssuer, ProtectedService, RouteGrant


@dataclass(frozen=True, slots=True)
class PolicyBreach:
    """The first grantPolicy rule a grant breaks: a CamelCase reason and a message naming
    the rule and the grant field."""

    reason: str
    message: str


def grant_window_start(grant: RouteGrant, now: datetime) -> datetime:
    """Where a grant's window starts for `maxDuration`: the later of `notBefore` and its
    creation (`now` when neither is known, e.g. a standalone file without notBefore)."""
    starts = [t for t in (grant.spec.not_before, grant.metadata.creation_timestamp) if t]
    return max(starts) if starts else now


def judge_grant_policy(
    grant: RouteGrant,
    service: ProtectedService,
    issuers: Sequence[IdentityIssuer],
    *,
    now: datetime,
) -> PolicyBreach | None:
    """The first rule of `service.spec.grantPolicy` that `grant` breaks, or None."""
    policy = service.spec.grant_policy
    if policy is None:
        return None
    rules = f"ProtectedService {service.name} spec.grantPolicy"
    spec = grant.spec
    if spec.expires_at is None and (policy.require_expiry or policy.max_duration is not None):
        rule = "requireExpiry" if policy.require_expiry else "maxDuration"
        return PolicyBreach(c.REASON_EXPIRY_REQUIRED, f"spec.expiresAt: required by {rules}.{rule}")
    if policy.max_duration is not None and spec.expires_at is not None:
        limit = parse_duration(policy.max_duration)
        window = spec.expires_at - grant_window_start(grant, now)
        if window > limit:
            hours = window.total_seconds() / 3600
            return PolicyBreach(
                c.REASON_DURATION_TOO_LONG,
                f"spec.expiresAt: the grant opens a {hours:.1f}h window, longer than "
                f"{rules}.maxDuration ({policy.max_duration})",
            )
    if policy.require_reason and not (spec.reason or "").strip():
        return PolicyBreach(
            c.REASON_REASON_REQUIRED, f"spec.reason: required by {rules}.requireReason"
        )
    if policy.allowed_issuers is not None:
        breach = _issuer_breach(grant, policy.allowed_issuers, issuers, rules)
        if breach is not None:
            return breach
    return None


def _issuer_breach(
    grant: RouteGrant,
    allowed: Sequence[str],
    issuers: Sequence[IdentityIssuer],
    rules: str,
) -> PolicyBreach | None:
    kubernetes_allowed = any(
        i.name in allowed and i.spec.kubernetes is not None
        for i in issuers
        if i.namespace == grant.namespace
    )
    listed = ", ".join(allowed)
    for index, subject in enumerate(grant.spec.subjects):
        where = f"spec.subjects[{index}]"
        if subject.token is not None and subject.token.issuer not in allowed:
            return PolicyBreach(
                c.REASON_ISSUER_NOT_ALLOWED,
                f"{where}.token.issuer: {subject.token.issuer!r} is not in "
                f"{rules}.allowedIssuers [{listed}]",
            )
        if subject.service_account is not None and not kubernetes_allowed:
            return PolicyBreach(
                c.REASON_ISSUER_NOT_ALLOWED,
                f"{where}.serviceAccount: none of {rules}.allowedIssuers [{listed}] is a "
                "kubernetes issuer",
            )
        if subject.spiffe_id is not None:
            return PolicyBreach(
                c.REASON_ISSUER_NOT_ALLOWED,
                f"{where}.spiffeId: a SPIFFE ID has no issuer, and {rules}.allowedIssuers "
                "admits only the issuers it lists",
            )
    return None
