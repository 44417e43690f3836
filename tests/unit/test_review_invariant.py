"""The access review's promise, checked with hypothesis against the real `decide()`:

1. replaying the window's audit through the proposed grants denies none of the requests
   that were allowed;
2. the proposed grants allow nothing today's grants do not (they only ever tighten);
3. every proposal is a valid RouteGrant (the models carry the CRD's schema and CEL rules).

The audit lines are written by the proxy's own `audit_line`, so the review reads exactly
what the proxy writes.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nhigate.api.models import RouteGrant
from nhigate.api.resources import ResourceSet, load_resources, parse_resource
from nhigate.policy import (
    Facts,
    Identity,
    IdentityKind,
    PathPattern,
    PathRejected,
    Policy,
    compile_policy,
    decide,
    normalise_path,
)
from nhigate.proxy.audit import audit_line
from nhigate.review.findings import ReviewSettings
from nhigate.review.records import ReadStats, read_records
from nhigate.review.report import review

EXAMPLES = load_resources([Path(__file__).resolve().parents[2] / "examples"])
NOW = datetime(2026, 6, 1, tzinfo=UTC).timestamp()
SPIFFE = "spiffe://example.org/ns/payments/sa/batch"

_PATTERN_SEGMENTS = ["v1", "items", "orders", "42", "a", "*"]
_PATH_SEGMENTS = [
    "v1", "items", "orders", "42", "7", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j",
    "a*b", "*", "**", "0f3a9c1e2b4d5f60a1b2", "123e4567-e89b-12d3-a456-426614174000",
]  # fmt: skip
_REQUEST_METHODS = ["GET", "POST", "DELETE", "PATCH", "PROPFIND"]


def _identity(who: str, team: str) -> Identity:
    if who == "spiffe":
        return Identity(kind=IdentityKind.SPIFFE, issuer="", subject=SPIFFE, spiffe_id=SPIFFE)
    return Identity(kind=IdentityKind.JWT, issuer="demo-issuer", subject=who, claims={"team": team})


@st.composite
def patterns(draw: st.DrawFn) -> str:
    segments = draw(st.lists(st.sampled_from(_PATTERN_SEGMENTS), max_size=3))
    text = "/" + "/".join(segments) + ("/**" if draw(st.booleans()) else "")
    text = text.replace("//**", "/**")
    try:
        PathPattern.compile(text)
    except ValueError:
        assume(False)
    return text


@st.composite
def paths(draw: st.DrawFn) -> str:
    segments = draw(st.lists(st.sampled_from(_PATH_SEGMENTS), min_size=1, max_size=4))
    text = "/" + "/".join(segments) + ("/" if draw(st.booleans()) else "")
    try:
        canonical = normalise_path(text)
    except PathRejected:
        assume(False)
    return canonical


@st.composite
def instances(draw: st.DrawFn, pattern: st.SearchStrategy[str]) -> str:
    """A path a pattern matches: each `*` filled, `**` expanded to 0-3 segments."""
    filler = st.sampled_from([s for s in _PATH_SEGMENTS if s])
    parts = []
    for part in draw(pattern)[1:].split("/"):
        if part == "*":
            parts.append(draw(filler))
        elif part == "**":
            parts.extend(draw(st.lists(filler, max_size=3)))
        else:
            parts.append(part)
    try:
        return normalise_path("/" + "/".join(parts))
    except PathRejected:
        assume(False)
        raise


@st.composite
def subjects(draw: st.DrawFn) -> dict[str, Any]:
    choice = draw(st.sampled_from(["alice", "bob", "carol", "claims-only", "spiffe"]))
    if choice == "spiffe":
        return {"spiffeId": SPIFFE}
    token: dict[str, Any] = {"issuer": "demo-issuer"}
    if choice != "claims-only":
        token["subject"] = choice
    if choice == "claims-only" or draw(st.booleans()):
        token["claims"] = {"team": draw(st.sampled_from(["red", "blue"]))}
    return {"token": token}


@st.composite
def grants(draw: st.DrawFn, index: int) -> RouteGrant:
    rules = draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "methods": st.lists(
                        st.sampled_from(["GET", "POST", "DELETE", "*"]),
                        min_size=1,
                        max_size=3,
                        unique=True,
                    ),
                    "paths": st.lists(patterns(), min_size=1, max_size=3, unique=True),
                }
            ),
            min_size=1,
            max_size=3,
        )
    )
    spec: dict[str, Any] = {
        "target": {"protectedService": "payments-api"},
        "subjects": draw(st.lists(subjects(), min_size=1, max_size=3)),
        "rules": rules,
    }
    if draw(st.booleans()):
        spec["expiresAt"] = "2026-12-01T00:00:00Z"
    manifest = {
        "apiVersion": "nhigate.io/v1alpha1",
        "kind": "RouteGrant",
        "metadata": {"name": f"grant-{index}", "namespace": "payments"},
        "spec": spec,
    }
    grant = parse_resource(manifest, f"grant-{index}")
    assert isinstance(grant, RouteGrant)
    return grant


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[RouteGrant], list[Facts]]:
    count = draw(st.integers(min_value=1, max_value=3))
    drawn = [draw(grants(i)) for i in range(count)]
    granted = sorted({p for g in drawn for r in g.spec.rules for p in r.paths or ()})
    requests = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["alice", "bob", "carol", "spiffe"]),
                st.sampled_from(["red", "blue"]),
                st.sampled_from(_REQUEST_METHODS),
                st.one_of(paths(), instances(st.sampled_from(granted))),
            ),
            min_size=1,
            max_size=60,
        )
    )
    facts = [
        Facts(identity=_identity(who, team), method=method, path=path, now=NOW + i)
        for i, (who, team, method, path) in enumerate(requests)
    ]
    return drawn, facts


def _policy(grant_list: list[RouteGrant]) -> Policy:
    resources = ResourceSet(
        issuers=EXAMPLES.issuers, services=EXAMPLES.services, grants=tuple(grant_list)
    )
    document = resources.policy_document_for("payments-api", datetime.fromtimestamp(NOW, UTC))
    return compile_policy(document)


def _audit(policy: Policy, facts: list[Facts]) -> bytes:
    lines = []
    for number, fact in enumerate(facts):
        decision = decide(policy, fact)
        lines.append(
            audit_line(
                fact.now,
                f"{number:016x}",
                "allow" if decision.allowed else "deny",
                decision.reason.value,
                fact.method,
                fact.path,
                "http://127.0.0.1:1",
                200 if decision.allowed else 403,
                0.5,
                policy.version,
                fact.identity,
                decision.grant,
            )
        )
    return b"".join(lines)


def _proposed(grant_list: list[RouteGrant], audit: bytes) -> list[RouteGrant]:
    stats = ReadStats()
    resources = ResourceSet(
        issuers=EXAMPLES.issuers, services=EXAMPLES.services, grants=tuple(grant_list)
    )
    result = review(
        resources, read_records([io.BytesIO(audit)], stats), stats, ReviewSettings(at=NOW)
    )
    assert stats.malformed == 0
    proposed = []
    for grant_review in result.grants:
        if grant_review.proposal is None:
            continue
        parsed = parse_resource(grant_review.proposal, f"proposal for {grant_review.key}")
        assert isinstance(parsed, RouteGrant)
        proposed.append(parsed)
    return proposed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(scenarios())
def test_the_proposal_allows_every_request_the_audit_shows_allowed_and_no_more(
    scenario: tuple[list[RouteGrant], list[Facts]],
) -> None:
    grant_list, facts = scenario
    today = _policy(grant_list)
    proposed = _policy(_proposed(grant_list, _audit(today, facts)))
    for fact in facts:
        before = decide(today, fact)
        after = decide(proposed, fact)
        if before.allowed:
            assert after.allowed, (fact, before)
            assert after.grant == before.grant or after.grant is not None
        else:
            assert not after.allowed, (fact, after)


def _near(path: str, position: int, segment: str, extend: bool) -> str | None:
    """`path` with one segment replaced, or one segment added: a request just outside what
    was observed, where a too-wide proposal would show."""
    parts = path[1:].split("/")
    if extend:
        parts.append(segment)
    else:
        parts[position % len(parts)] = segment
    try:
        return normalise_path("/" + "/".join(parts))
    except PathRejected:
        return None


@settings(max_examples=150, deadline=None)
@given(
    scenarios(),
    st.lists(
        st.tuples(
            st.sampled_from(_REQUEST_METHODS),
            st.integers(min_value=0, max_value=100),
            st.integers(min_value=0, max_value=4),
            st.sampled_from(_PATH_SEGMENTS),
            st.booleans(),
        ),
        max_size=30,
    ),
)
def test_the_proposal_never_allows_a_request_today_denies(
    scenario: tuple[list[RouteGrant], list[Facts]],
    probes: list[tuple[str, int, int, str, bool]],
) -> None:
    grant_list, facts = scenario
    today = _policy(grant_list)
    proposed = _policy(_proposed(grant_list, _audit(today, facts)))
    for method, which, position, segment, extend in probes:
        fact = facts[which % len(facts)]
        path = _near(fact.path, position, segment, extend)
        if path is None:
            continue
        for probe_method in (method, fact.method):
            probe = Facts(identity=fact.identity, method=probe_method, path=path, now=fact.now)
            if decide(proposed, probe).allowed:
                assert decide(today, probe).allowed, probe
