"""The authorisation decision: `decide()` per request, `explain()` and `who_can()` for people.

Semantics (docs/policy-document.md, "Decision"):

1. A revocation in force for the credential denies with `revoked`, whatever the grants say;
   a token of a service account or pod that no longer exists denies with `identity_retired`
   (`retirement.py`).
2. Candidates are the grants with a subject matching the identity and a rule
   matching the method and the (canonical) path.
   A subject accepts an actor chain (RFC 8693 `act`) only as its `delegation` says;
   with no candidate because of the chain, the chain's reason is reported
   (`delegation_not_allowed`, `delegation_too_deep`, `actor_not_allowed`, `actor_required`).
3. A candidate that is valid now (`not_before <= now < expires_at`) and whose
   tenant agrees allows; the first such grant by name is reported.
4. Otherwise the most specific deny reason among candidates wins:
   `tenant_mismatch` > `grant_not_yet_valid` > `grant_expired`; with no
   candidate, `no_matching_grant`. Deny is the default.
"""

from __future__ import annotations

from dataclasses import dataclass

from nhigate.policy.encoding import format_time
from nhigate.policy.index import (
    ALLOWED,
    EXPIRED,
    NOT_YET_VALID,
    TENANT_MISMATCH,
    Policy,
    chain_verdict,
    subject_delegation,
    subject_matches,
)
from nhigate.policy.model import Decision, Delegation, Facts, Grant, Identity, Reason, Subject
from nhigate.policy.paths import PathPattern, is_canonical_path, normalise_path, path_segments


def grant_status(grant: Grant, now: float, tenant: str | None) -> Reason:
    """Time and tenant verdict for a grant whose subject and rule already match."""
    if grant.not_before is not None and now < grant.not_before:
        return Reason.GRANT_NOT_YET_VALID
    if grant.expires_at is not None and now >= grant.expires_at:
        return Reason.GRANT_EXPIRED
    if grant.tenant is not None and tenant != grant.tenant:
        return Reason.TENANT_MISMATCH
    return Reason.ALLOWED


_REVOKED = Decision(allowed=False, reason=Reason.REVOKED)
_RETIRED = Decision(allowed=False, reason=Reason.IDENTITY_RETIRED)
_PATH_REJECTED = Decision(allowed=False, reason=Reason.PATH_REJECTED)
_NO_MATCHING_GRANT = Decision(allowed=False, reason=Reason.NO_MATCHING_GRANT)
_CHAIN_DENIALS = {
    reason: Decision(allowed=False, reason=reason)
    for reason in (
        Reason.DELEGATION_NOT_ALLOWED,
        Reason.DELEGATION_TOO_DEEP,
        Reason.ACTOR_NOT_ALLOWED,
        Reason.ACTOR_REQUIRED,
    )
}


def decide(policy: Policy, facts: Facts) -> Decision:
    """Allow or deny one request. Pure; never raises for well-typed input.

    `facts.path` must be the output of `normalise_path`; any other path is
    denied with `path_rejected` (fail closed). On denial, `Decision.grant`
    names the candidate grant behind the reason (None for `no_matching_grant`,
    `revoked` and `path_rejected`). Decisions are shared immutable objects.
    """
    return decide_request(policy, facts.identity, facts.method, facts.path, facts.now, facts.tenant)


def decide_request(
    policy: Policy, identity: Identity, method: str, path: str, now: float, tenant: str | None
) -> Decision:
    """`decide()` with the `Facts` fields as arguments: the same decision, without building
    a frozen `Facts` per request (the proxy's hot path)."""
    if policy.revocation(identity, now) is not None:
        return _REVOKED
    if policy.retirement(identity) is not None:
        return _RETIRED
    if not is_canonical_path(path):
        return _PATH_REJECTED
    segments = path[1:].split("/")
    candidates = policy.candidates(identity, method, segments)
    if not candidates:
        chain = policy.chain_denial(identity, method, segments)
        return _NO_MATCHING_GRANT if chain is None else _CHAIN_DENIALS[chain]
    best = _NO_MATCHING_GRANT
    best_rank = ALLOWED
    grants = policy.grants
    for pos in candidates:
        grant = grants[pos]
        if grant.not_before is not None and now < grant.not_before:
            rank = NOT_YET_VALID
        elif grant.expires_at is not None and now >= grant.expires_at:
            rank = EXPIRED
        elif grant.tenant is not None and tenant != grant.tenant:
            rank = TENANT_MISMATCH
        else:
            return policy.decision(pos, ALLOWED)
        if rank > best_rank:
            best, best_rank = policy.decision(pos, rank), rank
    return best


@dataclass(frozen=True, slots=True)
class GrantVerdict:
    """How one grant whose subject matches the caller judged the request."""

    grant: str
    """The grant's `namespace/name`."""
    matched: bool
    """True when this grant alone would allow the request."""
    outcome: Reason
    """`allowed`, `no_matching_grant` (no rule matched), or the time/tenant reason."""
    why_not: tuple[str, ...]
    """Human-readable reasons this grant does not allow the request (empty when matched)."""
    subject: Subject | None = None
    """The grant subject that matched the caller."""


@dataclass(frozen=True, slots=True)
class Explanation:
    """`decide()`'s answer plus the verdict of every grant naming the caller."""

    decision: Decision
    verdicts: tuple[GrantVerdict, ...]
    revocation: str | None = None
    """Name of the revocation that denied the credential, if any."""


def _methods_text(methods: frozenset[str]) -> str:
    return "[" + ", ".join(sorted(methods)) + "]"


def _rule_problems(
    grant: Grant, patterns: tuple[tuple[PathPattern, ...], ...], method: str, path: str
) -> tuple[bool, list[str]]:
    problems: list[str] = []
    several = len(grant.rules) > 1
    for index, (rule, rule_patterns) in enumerate(zip(grant.rules, patterns, strict=True)):
        if rule.mcp is not None:
            prefix = f"rule {index + 1}: " if several else ""
            problems.append(f"{prefix}an MCP rule (it reaches MCP endpoints only)")
            continue
        method_ok = "*" in rule.methods or method in rule.methods
        path_ok = any(p.matches(path) for p in rule_patterns)
        if method_ok and path_ok:
            return True, []
        prefix = f"rule {index + 1}: " if several else ""
        if not method_ok:
            problems.append(f"{prefix}method {method} not in {_methods_text(rule.methods)}")
        if not path_ok:
            listed = ", ".join(p.pattern for p in rule_patterns)
            problems.append(f"{prefix}path {path} matches none of [{listed}]")
    return False, problems


def chain_problem(reason: Reason, delegation: Delegation | None, actors: tuple[str, ...]) -> str:
    """A readable sentence for a `chain_verdict` denial."""
    chain = " -> ".join(actors) if actors else "(none)"
    if reason is Reason.DELEGATION_NOT_ALLOWED:
        return f"token is used by actor chain {chain}; the subject accepts no delegation"
    if delegation is None:  # the other reasons come from a delegation
        return reason.value
    if reason is Reason.ACTOR_REQUIRED:
        return "the subject requires an actor (delegation.required) and the token has none"
    if reason is Reason.DELEGATION_TOO_DEEP:
        return f"actor chain {chain} is {len(actors)} deep; maxDepth is {delegation.max_depth}"
    allowed = ", ".join(delegation.actors)
    return f"actor chain {chain} has an actor matching none of [{allowed}]"


def time_tenant_problems(grant: Grant, now: float, tenant: str | None) -> list[str]:
    """Readable reasons the grant's time window or tenant does not admit the request."""
    return _time_tenant_problems(grant, now, tenant)


def _time_tenant_problems(grant: Grant, now: float, tenant: str | None) -> list[str]:
    problems: list[str] = []
    if grant.not_before is not None and now < grant.not_before:
        problems.append(
            f"not valid before {format_time(grant.not_before)} (now {format_time(now)})"
        )
    if grant.expires_at is not None and now >= grant.expires_at:
        problems.append(f"expired at {format_time(grant.expires_at)} (now {format_time(now)})")
    if grant.tenant is not None and tenant != grant.tenant:
        if tenant is None:
            problems.append(f"request has no tenant; grant requires tenant {grant.tenant!r}")
        else:
            problems.append(f"tenant {tenant!r} does not match grant tenant {grant.tenant!r}")
    return problems


def explain(policy: Policy, facts: Facts) -> Explanation:
    """Explain a decision: every grant whose subject matches the caller, and why it did or
    did not allow the request. `decision` is exactly `decide(policy, facts)`."""
    decision = decide(policy, facts)
    identity = facts.identity
    revocation = policy.revocation(identity, facts.now)
    retired = policy.retirement(identity)
    canonical = is_canonical_path(facts.path)
    verdicts: list[GrantVerdict] = []
    actors = identity.actors
    for pos in policy.subject_grants(identity):
        grant = policy.grants[pos]
        subject, chain = explained_subject(grant, identity)
        if canonical:
            rule_ok, problems = _rule_problems(
                grant, policy.patterns[pos], facts.method, facts.path
            )
        else:
            rule_ok, problems = False, [f"path {facts.path!r} is not a canonical path"]
        if chain is not None:
            problems.insert(0, chain_problem(chain, subject_delegation(subject), actors))
        problems.extend(_time_tenant_problems(grant, facts.now, facts.tenant))
        if chain is not None:
            outcome = chain
        else:
            outcome = (
                grant_status(grant, facts.now, facts.tenant)
                if rule_ok
                else Reason.NO_MATCHING_GRANT
            )
        verdicts.append(grant_verdict(grant, subject, outcome, problems, revocation, retired))
    return Explanation(decision=decision, verdicts=tuple(verdicts), revocation=revocation)


def explained_subject(grant: Grant, identity: Identity) -> tuple[Subject, Reason | None]:
    """The subject of `grant` that explain judges for `identity` (the first matching one whose
    delegation accepts the caller's actor chain, else the first matching one) and that
    chain's verdict (None: accepted)."""
    matching = [s for s in grant.subjects if subject_matches(s, identity)]
    subject = next(
        (s for s in matching if chain_verdict(subject_delegation(s), identity.actors) is None),
        matching[0],
    )
    return subject, chain_verdict(subject_delegation(subject), identity.actors)


def grant_verdict(
    grant: Grant,
    subject: Subject,
    outcome: Reason,
    problems: list[str],
    revocation: str | None,
    retired: str | None,
) -> GrantVerdict:
    """One grant's verdict; a grant that would allow still names a revocation or a retired
    identity that denies the request anyway."""
    matched = outcome is Reason.ALLOWED
    if matched and revocation is not None:
        problems.append(f"credential revoked by {revocation}")
    if matched and retired is not None:
        problems.append(f"identity retired: {retired}")
    return GrantVerdict(
        grant=grant.name, matched=matched, outcome=outcome, why_not=tuple(problems),
        subject=subject,
    )  # fmt: skip


def who_can(policy: Policy, method: str, path: str, now: float) -> list[tuple[Grant, Subject]]:
    """Every (grant, subject) that may call `method path` at `now`.

    `path` is a raw path and is normalised here (raises `PathRejected`).
    Grants with a tenant are listed (the tenant is per request); revocations
    are per credential and not considered. Linear in the number of grants:
    an offline question, not a per-request one.
    """
    canonical = normalise_path(path)
    segments = path_segments(canonical)
    answer: list[tuple[Grant, Subject]] = []
    for grant, rule_patterns in zip(policy.grants, policy.patterns, strict=True):
        if grant_status(grant, now, grant.tenant) is not Reason.ALLOWED:
            continue
        if any(
            ("*" in rule.methods or method in rule.methods)
            and any(p.matches_segments(segments) for p in patterns)
            for rule, patterns in zip(grant.rules, rule_patterns, strict=True)
        ):
            answer.extend((grant, subject) for subject in grant.subjects)
    return answer
