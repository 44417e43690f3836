"""Decisions on MCP endpoints: tools, resources and prompts (docs/mcp.md).

A ProtectedService declares which paths speak MCP (`ServiceConfig.mcp_endpoints`).
Requests to those paths are decided here, never by `decide()`: plain method + path
rules do not reach an MCP endpoint, only MCP rules do. The proxy builds one
`McpScope` per request (the caller's MCP grants on the endpoint, judged at the
request's time and tenant) and asks it about every JSON-RPC message in the body
and every item of a `*/list` result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from nhigate.policy.decide import (
    Explanation,
    GrantVerdict,
    chain_problem,
    explained_subject,
    grant_status,
    grant_verdict,
    time_tenant_problems,
)
from nhigate.policy.document import ServiceConfig
from nhigate.policy.index import (
    ALLOWED,
    EXPIRED,
    MCP_METHOD,
    NOT_YET_VALID,
    TENANT_MISMATCH,
    Policy,
    subject_delegation,
)
from nhigate.policy.model import Decision, Grant, Identity, McpRule, Reason, Subject
from nhigate.policy.names import any_name_matches, is_plain_name


class McpKind(StrEnum):
    """What an MCP message names: the thing a grant must list for it to be allowed."""

    TOOL = "tool"
    RESOURCE = "resource"
    PROMPT = "prompt"


def mcp_endpoint_of(service: ServiceConfig, path: str) -> str | None:
    """The MCP endpoint of `service` whose subtree holds the canonical `path`, else None.

    `/mcp` covers `/mcp`, `/mcp/` and `/mcp/...`, compared without regard to letter
    case: a backend that routes `/MCP/` or a sub-path to its MCP handler must not get
    there through a plain path rule.
    """
    endpoints = service.mcp_endpoints
    if not endpoints:
        return None
    lower = path.lower()
    for endpoint in endpoints:
        if endpoint == "/":
            return endpoint
        low = endpoint.lower()
        if lower == low or lower.startswith(low + "/"):
            return endpoint
    return None


def _rules_for(grant: Grant, endpoint: str) -> tuple[McpRule, ...]:
    return tuple(
        rule.mcp
        for rule in grant.rules
        if rule.mcp is not None and (not rule.mcp.endpoints or endpoint in rule.mcp.endpoints)
    )


def _patterns(rule: McpRule, kind: McpKind) -> tuple[str, ...]:
    if kind is McpKind.TOOL:
        return rule.tools
    if kind is McpKind.RESOURCE:
        return rule.resources
    return rule.prompts


def rules_allow(rules: tuple[McpRule, ...], kind: McpKind, name: str) -> bool:
    """Does one of `rules` list `name` (printable ASCII only) for `kind`?"""
    return is_plain_name(name) and any(any_name_matches(_patterns(r, kind), name) for r in rules)


_REVOKED = Decision(allowed=False, reason=Reason.REVOKED)
_RETIRED = Decision(allowed=False, reason=Reason.IDENTITY_RETIRED)
_NO_MATCHING_GRANT = Decision(allowed=False, reason=Reason.NO_MATCHING_GRANT)


@dataclass(frozen=True, slots=True)
class McpScope:
    """The caller's MCP grants on one endpoint, judged at one time and tenant."""

    policy: Policy
    endpoint: str
    valid: tuple[tuple[int, tuple[McpRule, ...]], ...]
    """(grant position, its MCP rules for the endpoint) of grants valid now, by position."""
    invalid: tuple[tuple[int, int, tuple[McpRule, ...]], ...]
    """(grant position, outcome rank, rules) of candidates not valid now (time, tenant)."""
    denial: Decision
    """The decision when nothing matches: chain reason, `revoked` or `no_matching_grant`."""

    def session(self) -> Decision:
        """The decision for messages any MCP grant on the endpoint allows (initialize,
        ping, notifications, `*/list`, responses to the server)."""
        if self.valid:
            return self.policy.decision(self.valid[0][0], ALLOWED)
        return self._best_invalid(lambda rules: bool(rules))

    def decide(self, kind: McpKind, name: str) -> Decision:
        """Allow or deny one `tools/call`, `resources/read` or `prompts/get` on `name`."""
        for pos, rules in self.valid:
            if rules_allow(rules, kind, name):
                return self.policy.decision(pos, ALLOWED)
        return self._best_invalid(lambda rules: rules_allow(rules, kind, name))

    def allows(self, kind: McpKind, name: str) -> bool:
        """`decide(kind, name).allowed` without building reasons (list filtering)."""
        return any(rules_allow(rules, kind, name) for _, rules in self.valid)

    def _best_invalid(self, covers: Callable[[tuple[McpRule, ...]], bool]) -> Decision:
        best: Decision | None = None
        best_rank = ALLOWED
        for pos, rank, rules in self.invalid:
            if covers(rules) and rank > best_rank:
                best, best_rank = self.policy.decision(pos, rank), rank
        if best is not None:
            return best
        return self.denial


def mcp_scope(
    policy: Policy, identity: Identity, endpoint: str, now: float, tenant: str | None
) -> McpScope:
    """The caller's MCP grants on `endpoint` (one of the service's `mcp_endpoints`)."""
    if policy.revocation(identity, now) is not None:
        return McpScope(policy, endpoint, (), (), _REVOKED)
    if policy.retirement(identity) is not None:
        return McpScope(policy, endpoint, (), (), _RETIRED)
    segments = endpoint[1:].split("/")
    valid: list[tuple[int, tuple[McpRule, ...]]] = []
    invalid: list[tuple[int, int, tuple[McpRule, ...]]] = []
    for pos in policy.candidates(identity, MCP_METHOD, segments):
        grant = policy.grants[pos]
        rules = _rules_for(grant, endpoint)
        if not rules:  # a `*`-method path rule on the endpoint: not an MCP grant
            continue
        if grant.not_before is not None and now < grant.not_before:
            invalid.append((pos, NOT_YET_VALID, rules))
        elif grant.expires_at is not None and now >= grant.expires_at:
            invalid.append((pos, EXPIRED, rules))
        elif grant.tenant is not None and tenant != grant.tenant:
            invalid.append((pos, TENANT_MISMATCH, rules))
        else:
            valid.append((pos, rules))
    denial = _NO_MATCHING_GRANT
    if not valid and not invalid:
        chain = policy.chain_denial(identity, MCP_METHOD, segments)
        if chain is not None:
            denial = Decision(allowed=False, reason=chain)
    return McpScope(policy, endpoint, tuple(valid), tuple(invalid), denial)


def decide_mcp(
    policy: Policy,
    identity: Identity,
    endpoint: str,
    kind: McpKind | None,
    name: str,
    now: float,
    tenant: str | None = None,
) -> Decision:
    """One MCP decision: `kind=None` for the session-level methods, else the named item."""
    scope = mcp_scope(policy, identity, endpoint, now, tenant)
    return scope.session() if kind is None else scope.decide(kind, name)


def _listed(rules: tuple[McpRule, ...], kind: McpKind) -> str:
    names = sorted({p for r in rules for p in _patterns(r, kind)})
    return "[" + ", ".join(names) + "]"


def explain_mcp(
    policy: Policy,
    identity: Identity,
    endpoint: str,
    kind: McpKind | None,
    name: str,
    now: float,
    tenant: str | None = None,
) -> Explanation:
    """Every grant whose subject matches the caller, and why it does or does not allow
    the MCP message. `decision` is exactly `decide_mcp(...)`."""
    decision = decide_mcp(policy, identity, endpoint, kind, name, now, tenant)
    revocation = policy.revocation(identity, now)
    retired = policy.retirement(identity)
    verdicts: list[GrantVerdict] = []
    for pos in policy.subject_grants(identity):
        grant = policy.grants[pos]
        subject, chain = explained_subject(grant, identity)
        problems: list[str] = []
        if chain is not None:
            problems.append(chain_problem(chain, subject_delegation(subject), identity.actors))
        declared = endpoint in policy.document.service.mcp_endpoints
        rules = _rules_for(grant, endpoint) if declared else ()
        if not rules:
            problems.append(f"no MCP rule for endpoint {endpoint}")
        elif kind is not None and not rules_allow(rules, kind, name):
            if not is_plain_name(name):
                problems.append(f"{kind.value} {name!r} is not a printable-ASCII name")
            else:
                problems.append(f"{kind.value} {name} matches none of {_listed(rules, kind)}")
        covered = bool(rules) and chain is None and (kind is None or rules_allow(rules, kind, name))
        time_problems = time_tenant_problems(grant, now, tenant)
        problems.extend(time_problems)
        if not covered:
            outcome = chain if chain is not None else Reason.NO_MATCHING_GRANT
        else:
            outcome = grant_status(grant, now, tenant)
        verdicts.append(grant_verdict(grant, subject, outcome, problems, revocation, retired))
    return Explanation(decision=decision, verdicts=tuple(verdicts), revocation=revocation)


def who_can_mcp(
    policy: Policy, endpoint: str, kind: McpKind | None, name: str, now: float
) -> list[tuple[Grant, Subject]]:
    """Every (grant, subject) that may send the MCP message at `now` (tenants listed,
    revocations and actor chains not considered: they are per credential)."""
    if endpoint not in policy.document.service.mcp_endpoints:
        return []
    answer: list[tuple[Grant, Subject]] = []
    for grant in policy.grants:
        if grant_status(grant, now, grant.tenant) is not Reason.ALLOWED:
            continue
        rules = _rules_for(grant, endpoint)
        if rules and (kind is None or rules_allow(rules, kind, name)):
            answer.extend((grant, subject) for subject in grant.subjects)
    return answer


__all__ = [
    "McpKind",
    "McpScope",
    "decide_mcp",
    "explain_mcp",
    "mcp_endpoint_of",
    "mcp_scope",
    "rules_allow",
    "who_can_mcp",
]
