"""Judging each grant against its usage: what was granted and never used, what is wider than
the evidence, what lives too long, and who cannot authenticate (docs/access-review.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from nhigate.api.conditions import READY, TRUE
from nhigate.api.models import IdentityIssuer, ProtectedService, RouteGrant
from nhigate.policy import ServiceAccountSubject, SpiffeSubject, Subject, TokenSubject
from nhigate.policy.model import SERVICE_ACCOUNT_SUBJECT_PREFIX, service_account_subject
from nhigate.policy.times import format_seconds
from nhigate.review.usage import GrantUsage, IdentityKey

DAY = 86400.0
DEFAULT_MAX_WINDOW = 90 * DAY
DEFAULT_MIN_DENIALS = 3


class Kind(StrEnum):
    """The closed set of findings; docs/access-review.md says what each means."""

    UNUSED_GRANT = "unused_grant"
    UNUSED_RULE = "unused_rule"
    UNUSED_METHOD = "unused_method"
    UNUSED_PATH = "unused_path"
    WIDE_PATH = "wide_path"
    UNUSED_SUBJECT = "unused_subject"
    UNMATCHED_REQUESTS = "unmatched_requests"
    NO_EXPIRY = "no_expiry"
    LONG_WINDOW = "long_window"
    EXPIRED = "expired"
    SERVICE_MISSING = "service_missing"
    ISSUER_MISSING = "issuer_missing"
    ISSUER_NOT_TRUSTED = "issuer_not_trusted"
    ISSUER_NOT_READY = "issuer_not_ready"
    NO_CLIENT_CA = "no_client_ca"
    DENIED_REPEATEDLY = "denied_repeatedly"


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing the review found; `detail` is what `--output json` carries besides."""

    kind: Kind
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReviewSettings:
    """The thresholds of a review."""

    at: float
    """"Now": expiry and issuer readiness are judged at this time (epoch seconds)."""
    max_window: float = DEFAULT_MAX_WINDOW
    """A grant valid for longer than this (seconds) is a `long_window` finding."""
    min_denials: int = DEFAULT_MIN_DENIALS
    """A caller denied at least this often is a `denied_repeatedly` finding."""


def subject_seen(subject: Subject, identity: IdentityKey) -> bool:
    """Could this audit identity have matched `subject`? Errs towards yes: the audit does not
    carry claims or the service-account UID, so a subject is judged unused only when no
    caller could have been it."""
    issuer, name, kind = identity
    if isinstance(subject, ServiceAccountSubject):
        if kind != "serviceAccount" or name is None:
            return False
        expected = service_account_subject(subject.namespace, subject.name)
        return name == expected or not name.startswith(SERVICE_ACCOUNT_SUBJECT_PREFIX)
    if isinstance(subject, TokenSubject):
        return (
            kind in ("jwt", "serviceAccount")
            and issuer == subject.issuer
            and (subject.subject is None or name == subject.subject)
        )
    assert isinstance(subject, SpiffeSubject)
    return kind == "spiffe" and name == subject.spiffe_id


def seen_subjects(usage: GrantUsage) -> list[bool]:
    """Per subject of the grant: used in the window? All True when callers were not all kept."""
    subjects = usage.grant.subjects
    if not usage.identities_complete:
        return [True] * len(subjects)
    return [any(subject_seen(s, i) for i in usage.identities) for s in subjects]


def _days(seconds: float) -> str:
    return f"{seconds / DAY:.0f} days"


def usage_findings(usage: GrantUsage, narrowed: Sequence[Sequence[list[str]]]) -> list[Finding]:
    """Unused grant, rules, methods, paths and subjects; paths wider than the evidence.

    `narrowed[r][p]` are the patterns proposed for path pattern `p` of rule `r`."""
    grant = usage.grant
    if usage.requests == 0:
        return [
            Finding(
                Kind.UNUSED_GRANT,
                "no request used this grant in the window: delete it, or let it expire",
            )
        ]
    findings: list[Finding] = []
    if usage.unmatched:
        findings.append(
            Finding(
                Kind.UNMATCHED_REQUESTS,
                f"{usage.unmatched} allowed requests match none of today's rules (the grant "
                "changed during the window); the proposal does not keep them",
                {"requests": usage.unmatched},
            )
        )
    for index, (rule, rule_usage) in enumerate(zip(grant.rules, usage.rules, strict=True)):
        label = f"rule {index + 1}"
        if rule.mcp is not None:
            if usage.mcp_requests == 0:
                findings.append(
                    Finding(Kind.UNUSED_RULE, f"{label} (MCP) was never used", {"rule": index})
                )
            continue
        what = f"{label} ({','.join(sorted(rule.methods))} {' '.join(rule.paths)})"
        if rule_usage.requests == 0:
            findings.append(Finding(Kind.UNUSED_RULE, f"{what} was never used", {"rule": index}))
            continue
        used = sorted(rule_usage.methods)
        if "*" in rule.methods:
            findings.append(
                Finding(
                    Kind.UNUSED_METHOD,
                    f"{label} grants any method; only {', '.join(used)} were used",
                    {"rule": index, "granted": ["*"], "used": used},
                )
            )
        else:
            unused = sorted(rule.methods - set(used))
            if unused:
                findings.append(
                    Finding(
                        Kind.UNUSED_METHOD,
                        f"{label}: {', '.join(unused)} never used (used: {', '.join(used)})",
                        {"rule": index, "unused": unused, "used": used},
                    )
                )
        for position, pattern in enumerate(rule.paths):
            if not any(p == position for p, _ in rule_usage.shapes):
                findings.append(
                    Finding(
                        Kind.UNUSED_PATH,
                        f"{label}: path {pattern} was never used",
                        {"rule": index, "path": pattern},
                    )
                )
                continue
            narrower = narrowed[index][position]
            if narrower != [pattern]:
                findings.append(
                    Finding(
                        Kind.WIDE_PATH,
                        f"{label}: path {pattern} was only used as {', '.join(narrower)}",
                        {"rule": index, "path": pattern, "observed": narrower},
                    )
                )
    for subject, seen in zip(grant.subjects, seen_subjects(usage), strict=True):
        if not seen:
            findings.append(
                Finding(
                    Kind.UNUSED_SUBJECT,
                    f"subject {describe(subject)} never used this grant",
                    {"subject": describe(subject)},
                )
            )
    return findings


def lifetime_findings(grant: RouteGrant, settings: ReviewSettings) -> list[Finding]:
    """No expiry, a validity window longer than `max_window`, or already expired."""
    spec = grant.spec
    if spec.expires_at is None:
        return [Finding(Kind.NO_EXPIRY, "the grant never expires: set spec.expiresAt")]
    expires = spec.expires_at.timestamp()
    if expires <= settings.at:
        return [
            Finding(
                Kind.EXPIRED,
                f"expired at {format_seconds(expires)}: it allows nothing; delete it",
            )
        ]
    start = spec.not_before.timestamp() if spec.not_before is not None else settings.at
    window = expires - start
    if window > settings.max_window:
        return [
            Finding(
                Kind.LONG_WINDOW,
                f"valid for {_days(window)} (more than {_days(settings.max_window)}), until "
                f"{format_seconds(expires)}",
                {"seconds": window},
            )
        ]
    return []


def _ready(issuer: IdentityIssuer) -> bool | None:
    """The issuer's Ready condition; None when the resource carries no status (a YAML file)."""
    for condition in issuer.status.conditions:
        if condition.type == READY:
            return condition.status.value == TRUE
    return None


def authentication_findings(
    grant: RouteGrant,
    subjects: Sequence[Subject],
    service: ProtectedService | None,
    issuers: Sequence[IdentityIssuer],
) -> list[Finding]:
    """Subjects that cannot authenticate to the target now: issuer missing, untrusted or not
    Ready; a SPIFFE subject on a proxy without a client CA."""
    if service is None:
        target = f"{grant.namespace}/{grant.spec.target.protected_service}"
        return [Finding(Kind.SERVICE_MISSING, f"the target ProtectedService {target} is missing")]
    here = {i.name: i for i in issuers if i.namespace == grant.namespace}
    trusted = list(service.spec.issuers)
    findings: list[Finding] = []
    for subject in subjects:
        who = describe(subject)
        if isinstance(subject, SpiffeSubject):
            tls = service.spec.proxy.tls
            if tls is None or tls.client_ca_secret_name is None:
                findings.append(
                    Finding(
                        Kind.NO_CLIENT_CA,
                        f"{who}: the service's proxy has no client CA, so no SPIFFE ID can "
                        "authenticate",
                        {"subject": who},
                    )
                )
            continue
        if isinstance(subject, TokenSubject):
            names = [subject.issuer]
        else:
            names = [n for n in trusted if n in here and here[n].spec.kubernetes is not None]
            if not names:
                findings.append(
                    Finding(
                        Kind.ISSUER_MISSING,
                        f"{who}: the service trusts no `kubernetes` IdentityIssuer",
                        {"subject": who},
                    )
                )
                continue
        for name in names:
            findings.extend(_issuer_findings(who, name, here.get(name), trusted))
    return findings


def _issuer_findings(
    who: str, name: str, issuer: IdentityIssuer | None, trusted: Sequence[str]
) -> list[Finding]:
    detail = {"subject": who, "issuer": name}
    if issuer is None:
        return [Finding(Kind.ISSUER_MISSING, f"{who}: IdentityIssuer {name} is missing", detail)]
    if name not in trusted:
        return [
            Finding(
                Kind.ISSUER_NOT_TRUSTED,
                f"{who}: the service does not list IdentityIssuer {name} in spec.issuers",
                detail,
            )
        ]
    if _ready(issuer) is False:
        return [
            Finding(Kind.ISSUER_NOT_READY, f"{who}: IdentityIssuer {name} is not Ready", detail)
        ]
    return []


def describe(subject: Subject) -> str:
    """A short name for a grant subject."""
    if isinstance(subject, ServiceAccountSubject):
        return f"serviceaccount:{subject.namespace}/{subject.name}"
    if isinstance(subject, SpiffeSubject):
        return subject.spiffe_id
    claims = ",".join(f"{k}={v}" for k, v in subject.claims)
    who = subject.subject if subject.subject is not None else "*"
    return f"token:{subject.issuer}/{who}" + (f"[{claims}]" if claims else "")
