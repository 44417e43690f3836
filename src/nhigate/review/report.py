"""The review of a set of resources against an audit window: one pass, then judgements."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nhigate.api.compile import compile_grant
from nhigate.api.models import ProtectedService, RouteGrant
from nhigate.api.resources import ResourceSet
from nhigate.review.findings import (
    Finding,
    Kind,
    ReviewSettings,
    authentication_findings,
    lifetime_findings,
    usage_findings,
)
from nhigate.review.proposal import diff, narrowed_patterns, propose, today_manifest
from nhigate.review.records import AuditRecord, ReadStats
from nhigate.review.usage import DeniedCaller, GrantUsage, IdentityKey, Usage, build_usage


@dataclass(frozen=True, slots=True)
class GrantReview:
    """One grant: its usage, findings and proposed replacement."""

    grant: RouteGrant
    service: str
    """`namespace/name` of the target ProtectedService."""
    usage: GrantUsage
    findings: list[Finding]
    today: dict[str, Any]
    proposal: dict[str, Any] | None
    """The tightened manifest; None when the grant was unused (delete it)."""
    diff: str

    @property
    def key(self) -> str:
        return self.grant.key

    @property
    def changed(self) -> bool:
        return self.proposal != self.today


@dataclass(frozen=True, slots=True)
class CallerReview:
    """A caller denied at least `min_denials` times."""

    identity: IdentityKey
    denials: DeniedCaller
    finding: Finding


@dataclass(frozen=True, slots=True)
class Review:
    """The whole access review."""

    settings: ReviewSettings
    stats: ReadStats
    usage: Usage
    grants: list[GrantReview]
    callers: list[CallerReview]

    @property
    def services(self) -> list[str]:
        return sorted({g.service for g in self.grants})

    @property
    def finding_count(self) -> int:
        return sum(len(g.findings) for g in self.grants) + len(self.callers)


def describe_identity(identity: IdentityKey) -> str:
    """`issuer/subject` of an audit identity, `(unauthenticated)` without one."""
    issuer, subject, _kind = identity
    if subject is None:
        return "(unauthenticated)"
    return f"{issuer}/{subject}" if issuer else subject


def _service_of(grant: RouteGrant, services: Iterable[ProtectedService]) -> ProtectedService | None:
    target = grant.spec.target.protected_service
    return next((s for s in services if s.namespace == grant.namespace and s.name == target), None)


def _caller_finding(identity: IdentityKey, caller: DeniedCaller) -> Finding:
    reasons = ", ".join(f"{r} x{n}" for r, n in caller.reasons.most_common())
    tried = ", ".join(f"{m} {p} x{n}" for (m, p), n in caller.tried.most_common(5))
    return Finding(
        Kind.DENIED_REPEATEDLY,
        f"{describe_identity(identity)} denied {caller.denials} times ({reasons}); tried {tried}",
        {
            "denials": caller.denials,
            "reasons": dict(caller.reasons),
            "tried": [
                {"method": m, "path": p, "count": n} for (m, p), n in caller.tried.most_common()
            ],
            "otherTried": caller.other_tried,
            "grants": dict(caller.grants),
        },
    )


def review(
    resources: ResourceSet,
    records: Iterable[AuditRecord],
    stats: ReadStats,
    settings: ReviewSettings,
    *,
    service: str | None = None,
) -> Review:
    """Review the grants of `resources` (of one `namespace/name` service, if given)."""
    grants = [
        g
        for g in resources.grants
        if service is None or f"{g.namespace}/{g.spec.target.protected_service}" == service
    ]
    usage = build_usage((compile_grant(g) for g in grants), records)
    reviews: list[GrantReview] = []
    for grant in sorted(grants, key=lambda g: g.key):
        grant_usage = usage.grants[grant.key]
        narrowed = narrowed_patterns(grant_usage)
        target = _service_of(grant, resources.services)
        findings = [
            *usage_findings(grant_usage, narrowed),
            *lifetime_findings(grant, settings),
            *authentication_findings(grant, grant_usage.grant.subjects, target, resources.issuers),
        ]
        today = today_manifest(grant)
        proposal = propose(grant, grant_usage)
        reviews.append(
            GrantReview(
                grant=grant,
                service=f"{grant.namespace}/{grant.spec.target.protected_service}",
                usage=grant_usage,
                findings=findings,
                today=today,
                proposal=proposal,
                diff=diff(today, proposal, grant.key) if proposal != today else "",
            )
        )
    callers = sorted(
        (
            CallerReview(identity, caller, _caller_finding(identity, caller))
            for identity, caller in usage.denied_callers.items()
            if caller.denials >= settings.min_denials
        ),
        key=lambda c: (-c.denials.denials, describe_identity(c.identity)),
    )
    return Review(settings, stats, usage, reviews, callers)
