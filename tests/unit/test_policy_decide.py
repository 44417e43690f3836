"""decide(), explain() and who_can(): deny by default, expiry, overlap, revocation, subjects."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nhigate.policy import (
    Facts,
    Grant,
    Identity,
    IdentityKind,
    PathPattern,
    Policy,
    RateLimit,
    Reason,
    Revocation,
    Rule,
    ServiceAccountRef,
    ServiceAccountSubject,
    ServiceConfig,
    SpiffeSubject,
    Subject,
    TokenSubject,
    compile_policy,
    decide,
    explain,
    make_document,
    who_can,
)
from nhigate.policy.index import subject_matches

BOUNDED = settings(max_examples=300, deadline=None)
SVC = ServiceConfig("payments", "payments-api", "payments", 8080)
T0 = 1_800_000_000.0

ALICE = Identity(kind=IdentityKind.JWT, issuer="idp", subject="alice", token_id="jti-1")
DEPLOYER = Identity(
    kind=IdentityKind.SERVICE_ACCOUNT,
    issuer="cluster",
    subject="system:serviceaccount:ci:deployer",
    service_account=ServiceAccountRef("ci", "deployer", "uid-123"),
)
AGENT = Identity(
    kind=IdentityKind.SPIFFE,
    issuer="",
    subject="spiffe://example.org/agent",
    spiffe_id="spiffe://example.org/agent",
)


def rule(methods: str, *paths: str) -> Rule:
    return Rule(methods=frozenset(methods.split(",")), paths=paths)


def grant(name: str, subjects: Iterable[Subject], *rules: Rule, **kw: object) -> Grant:
    return Grant(name=name, subjects=tuple(subjects), rules=rules, **kw)  # type: ignore[arg-type]


def policy(grants: Iterable[Grant], revocations: Iterable[Revocation] = ()) -> Policy:
    return compile_policy(make_document(SVC, [], grants, revocations))


def ask(
    pol: Policy,
    identity: Identity = ALICE,
    method: str = "GET",
    path: str = "/v1/items",
    now: float = T0,
    tenant: str | None = None,
) -> tuple[bool, Reason, str | None]:
    d = decide(pol, Facts(identity=identity, method=method, path=path, now=now, tenant=tenant))
    return d.allowed, d.reason, d.grant


ALICE_SUBJ = TokenSubject(issuer="idp", subject="alice")


def test_empty_policy_denies() -> None:
    assert ask(policy([])) == (False, Reason.NO_MATCHING_GRANT, None)


def test_allowed_carries_grant_and_rate_limit() -> None:
    rl = RateLimit(requests_per_second=5.0, burst=10)
    pol = policy([grant("ns/a", [ALICE_SUBJ], rule("GET", "/v1/items"), rate_limit=rl)])
    d = decide(pol, Facts(identity=ALICE, method="GET", path="/v1/items", now=T0))
    assert (d.allowed, d.reason, d.grant, d.rate_limit) == (True, Reason.ALLOWED, "ns/a", rl)
    pol = policy([grant("ns/a", [ALICE_SUBJ], rule("GET", "/v1/items"))])
    assert (
        decide(pol, Facts(identity=ALICE, method="GET", path="/v1/items", now=T0)).rate_limit
        is None
    )


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (T0 - 0.000001, (False, Reason.GRANT_NOT_YET_VALID, "ns/a")),
        (T0, (True, Reason.ALLOWED, "ns/a")),
        (T0 + 99.999999, (True, Reason.ALLOWED, "ns/a")),
        (T0 + 100, (False, Reason.GRANT_EXPIRED, "ns/a")),
        (T0 + 10_000, (False, Reason.GRANT_EXPIRED, "ns/a")),
    ],
)
def test_validity_boundaries_are_exact(now: float, expected: tuple[object, ...]) -> None:
    pol = policy(
        [grant("ns/a", [ALICE_SUBJ], rule("GET", "/v1/items"), not_before=T0, expires_at=T0 + 100)]
    )
    assert ask(pol, now=now) == expected


@pytest.mark.parametrize(
    ("method", "path", "rules", "allowed"),
    [
        ("GET", "/v1/items", [rule("GET", "/v1/items")], True),
        ("HEAD", "/v1/items", [rule("GET", "/v1/items")], False),
        ("HEAD", "/v1/items", [rule("GET,HEAD", "/v1/items")], True),
        ("get", "/v1/items", [rule("GET", "/v1/items")], False),
        ("DELETE", "/v1/items", [rule("*", "/v1/items")], True),
        ("POST", "/v1/items", [rule("GET", "/v1/items"), rule("POST", "/v1/other")], False),
        ("POST", "/v1/other", [rule("GET", "/v1/items"), rule("POST", "/v1/other")], True),
        ("GET", "/v1/items/7", [rule("GET", "/v1/items/*")], True),
        ("GET", "/v1/items/7/x", [rule("GET", "/v1/items/*")], False),
        ("GET", "/v1/items/7/x", [rule("GET", "/v1/items/**")], True),
        ("GET", "/v1/items", [rule("GET", "/v1/items/**")], True),
        ("GET", "/v1/itemsx", [rule("GET", "/v1/items/**")], False),
        ("GET", "/v1/Items", [rule("GET", "/v1/items")], False),
        ("GET", "/v1/items/", [rule("GET", "/v1/items")], False),
        ("GET", "/anything", [rule("GET", "/**")], True),
        ("GET", "/v1/a/b/c", [rule("GET", "/v1/*/b/**")], True),
        ("GET", "/v1/a/x/c", [rule("GET", "/v1/*/b/**")], False),
    ],
)
def test_method_and_path_matching(method: str, path: str, rules: list[Rule], allowed: bool) -> None:
    pol = policy([grant("ns/a", [ALICE_SUBJ], *rules)])
    assert ask(pol, method=method, path=path)[0] is allowed


def test_overlapping_grants_are_ored_and_first_valid_by_name_wins() -> None:
    g = [
        grant("ns/c-valid", [ALICE_SUBJ], rule("GET", "/v1/**")),
        grant("ns/a-expired", [ALICE_SUBJ], rule("GET", "/v1/items"), expires_at=T0 - 1),
        grant("ns/b-valid", [ALICE_SUBJ], rule("*", "/v1/items")),
    ]
    assert ask(policy(g)) == (True, Reason.ALLOWED, "ns/b-valid")
    assert ask(policy(g[:2])) == (True, Reason.ALLOWED, "ns/c-valid")


@pytest.mark.parametrize(
    ("grants", "expected"),
    [
        (
            [("ns/x", {"expires_at": T0 - 1}), ("ns/y", {"not_before": T0 + 1})],
            (Reason.GRANT_NOT_YET_VALID, "ns/y"),
        ),
        (
            [("ns/x", {"expires_at": T0 - 1}), ("ns/y", {"tenant": "blue"})],
            (Reason.TENANT_MISMATCH, "ns/y"),
        ),
        (
            [("ns/x", {"tenant": "blue"}), ("ns/y", {"not_before": T0 + 1})],
            (Reason.TENANT_MISMATCH, "ns/x"),
        ),
        (
            [("ns/x", {"tenant": "blue", "expires_at": T0 - 1})],
            (Reason.GRANT_EXPIRED, "ns/x"),
        ),
        (
            [("ns/x", {"tenant": "blue"}), ("ns/y", {"tenant": "red"})],
            (Reason.ALLOWED, "ns/y"),
        ),
    ],
)
def test_most_specific_deny_reason(
    grants: list[tuple[str, dict[str, object]]], expected: tuple[Reason, str]
) -> None:
    pol = policy(grant(n, [ALICE_SUBJ], rule("GET", "/v1/items"), **kw) for n, kw in grants)
    _, reason, name = ask(pol, tenant="red")
    assert (reason, name) == expected


def test_tenant_required_but_request_has_none() -> None:
    pol = policy([grant("ns/a", [ALICE_SUBJ], rule("GET", "/v1/items"), tenant="blue")])
    assert ask(pol, tenant=None)[1] is Reason.TENANT_MISMATCH
    assert ask(pol, tenant="blue")[0] is True
    untenanted = policy([grant("ns/a", [ALICE_SUBJ], rule("GET", "/v1/items"))])
    assert ask(untenanted, tenant="anything")[0] is True


def test_wrong_route_beats_nothing_it_is_no_matching_grant() -> None:
    pol = policy([grant("ns/a", [ALICE_SUBJ], rule("GET", "/v1/items"), expires_at=T0 - 1)])
    assert ask(pol, path="/v1/other") == (False, Reason.NO_MATCHING_GRANT, None)


# --- revocations ----------------------------------------------------------------------------

_OPEN = [
    grant("ns/a", [ALICE_SUBJ], rule("GET", "/**")),
    grant("ns/b", [ServiceAccountSubject("ci", "deployer")], rule("GET", "/**")),
]


@pytest.mark.parametrize(
    ("revocation", "identity", "revoked"),
    [
        (Revocation("r", issuer="idp", subject="alice"), ALICE, True),
        (Revocation("r", issuer="idp", subject="bob"), ALICE, False),
        (Revocation("r", issuer="other", subject="alice"), ALICE, False),
        (Revocation("r", token_id="jti-1"), ALICE, True),
        (Revocation("r", token_id="jti-2"), ALICE, False),
        (Revocation("r", service_account_uid="uid-123"), DEPLOYER, True),
        (Revocation("r", service_account_uid="uid-999"), DEPLOYER, False),
        (
            Revocation("r", issuer="cluster", subject="system:serviceaccount:ci:deployer"),
            DEPLOYER,
            True,
        ),
        (Revocation("r", issuer="idp", subject="alice", until=T0 + 1), ALICE, True),
        (Revocation("r", issuer="idp", subject="alice", until=T0), ALICE, False),
        (Revocation("r", issuer="idp", subject="alice", until=T0 - 60), ALICE, False),
        (Revocation("r", token_id="jti-1", until=T0 - 60), ALICE, False),
        (Revocation("r", service_account_uid="uid-123", until=T0 - 1), DEPLOYER, False),
    ],
)
def test_revocations(revocation: Revocation, identity: Identity, revoked: bool) -> None:
    allowed, reason, name = ask(policy(_OPEN, [revocation]), identity=identity)
    if revoked:
        assert (allowed, reason, name) == (False, Reason.REVOKED, None)
    else:
        assert allowed


def test_revocation_beats_everything_and_longest_one_counts() -> None:
    revs = [
        Revocation("short", issuer="idp", subject="alice", until=T0 - 1),
        Revocation("forever", issuer="idp", subject="alice"),
    ]
    assert ask(policy(_OPEN, revs))[1] is Reason.REVOKED
    assert ask(policy([], revs))[1] is Reason.REVOKED
    expl = explain(policy(_OPEN, revs), Facts(ALICE, "GET", "/x", T0))
    assert expl.revocation == "forever"
    assert expl.decision.reason is Reason.REVOKED


# --- subjects -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "identity", "allowed"),
    [
        (ServiceAccountSubject("ci", "deployer"), DEPLOYER, True),
        (ServiceAccountSubject("ci", "other"), DEPLOYER, False),
        (ServiceAccountSubject("cd", "deployer"), DEPLOYER, False),
        # a JWT whose claims merely look like a service account is not one
        (
            ServiceAccountSubject("ci", "deployer"),
            Identity(
                IdentityKind.JWT,
                "idp",
                "x",
                service_account=ServiceAccountRef("ci", "deployer"),
            ),
            False,
        ),
        (TokenSubject("cluster", "system:serviceaccount:ci:deployer"), DEPLOYER, True),
        (TokenSubject("idp", "alice"), ALICE, True),
        (TokenSubject("idp", "bob"), ALICE, False),
        (TokenSubject("other", "alice"), ALICE, False),
        (SpiffeSubject("spiffe://example.org/agent"), AGENT, True),
        (SpiffeSubject("spiffe://example.org/agent2"), AGENT, False),
        (SpiffeSubject("spiffe://example.org/agent"), ALICE, False),
        (TokenSubject("idp", "spiffe://example.org/agent"), AGENT, False),
    ],
)
def test_subject_kinds(subject: Subject, identity: Identity, allowed: bool) -> None:
    pol = policy([grant("ns/a", [subject], rule("GET", "/v1/items"))])
    assert ask(pol, identity=identity)[0] is allowed


def _with_claims(claims: dict[str, object], subject: str = "svc-1") -> Identity:
    return Identity(kind=IdentityKind.JWT, issuer="ci", subject=subject, claims=claims)


@pytest.mark.parametrize(
    ("required", "claims", "allowed"),
    [
        ((("repo", "org/app"),), {"repo": "org/app"}, True),
        ((("repo", "org/app"),), {"repo": "org/other"}, False),
        ((("repo", "org/app"),), {}, False),
        ((("repo", "org/app"), ("ref", "main")), {"repo": "org/app", "ref": "main"}, True),
        ((("repo", "org/app"), ("ref", "main")), {"repo": "org/app", "ref": "dev"}, False),
        ((("groups", "deployers"),), {"groups": ["readers", "deployers"]}, True),
        ((("groups", "deployers"),), {"groups": ["readers"]}, False),
        ((("verified", "true"),), {"verified": True}, True),
        ((("verified", "true"),), {"verified": "True"}, False),
        ((("level", "3"),), {"level": 3}, True),
        ((("level", "3"),), {"level": 3.0}, False),
        ((("x", "None"),), {"x": None}, False),
        ((("x", "{}"),), {"x": {}}, False),
    ],
)
def test_issuer_wide_claim_matchers(
    required: tuple[tuple[str, str], ...], claims: dict[str, object], allowed: bool
) -> None:
    pol = policy([grant("ns/a", [TokenSubject("ci", claims=required)], rule("GET", "/v1/items"))])
    assert ask(pol, identity=_with_claims(claims))[0] is allowed


def test_subject_plus_claims_needs_both() -> None:
    subj = TokenSubject("ci", "svc-1", claims=(("env", "prod"),))
    pol = policy([grant("ns/a", [subj], rule("GET", "/v1/items"))])
    assert ask(pol, identity=_with_claims({"env": "prod"}))[0] is True
    assert ask(pol, identity=_with_claims({"env": "dev"}))[0] is False
    assert ask(pol, identity=_with_claims({"env": "prod"}, subject="svc-2"))[0] is False


def test_non_canonical_path_is_rejected() -> None:
    pol = policy([grant("ns/a", [ALICE_SUBJ], rule("GET", "/**"))])
    for path in ["/v1/../admin", "/v1//items", "v1", "/a%2fb", "/%7e"]:
        assert ask(pol, path=path) == (False, Reason.PATH_REJECTED, None)


# --- explain and who-can ---------------------------------------------------------------------


def test_explain_says_why_each_candidate_did_not_match() -> None:
    g = [
        grant("ns/readonly", [ALICE_SUBJ], rule("GET,HEAD", "/v1/items/**")),
        grant("ns/old", [ALICE_SUBJ], rule("POST", "/v1/items"), expires_at=T0 - 3600),
        grant("ns/blue", [ALICE_SUBJ], rule("POST", "/v1/items"), tenant="blue"),
        grant("ns/bob", [TokenSubject("idp", "bob")], rule("*", "/**")),
    ]
    expl = explain(policy(g), Facts(ALICE, "POST", "/v1/items", T0, tenant="red"))
    assert expl.decision.reason is Reason.TENANT_MISMATCH
    by_name = {v.grant: v for v in expl.verdicts}
    assert set(by_name) == {"ns/readonly", "ns/old", "ns/blue"}
    assert by_name["ns/readonly"].why_not == ("method POST not in [GET, HEAD]",)
    assert by_name["ns/readonly"].outcome is Reason.NO_MATCHING_GRANT
    assert by_name["ns/old"].why_not == (
        "expired at 2027-01-15T07:00:00Z (now 2027-01-15T08:00:00Z)",
    )
    assert by_name["ns/old"].outcome is Reason.GRANT_EXPIRED
    assert by_name["ns/blue"].why_not == ("tenant 'red' does not match grant tenant 'blue'",)
    assert not any(v.matched for v in expl.verdicts)

    expl = explain(policy(g), Facts(ALICE, "GET", "/v2/x", T0))
    assert expl.verdicts[2].why_not == ("path /v2/x matches none of [/v1/items/**]",)

    expl = explain(policy(g), Facts(ALICE, "GET", "/v1/items/3", T0))
    assert expl.decision.allowed
    assert [v.grant for v in expl.verdicts if v.matched] == ["ns/readonly"]


def test_who_can_lists_valid_grants_and_subjects() -> None:
    sa = ServiceAccountSubject("ci", "deployer")
    g = [
        grant("ns/a", [ALICE_SUBJ, sa], rule("GET", "/v1/**")),
        grant("ns/b", [TokenSubject("idp", "bob")], rule("POST", "/v1/items")),
        grant("ns/c", [TokenSubject("idp", "carol")], rule("*", "/v1/*"), expires_at=T0),
        grant("ns/d", [TokenSubject("idp", "dave")], rule("GET", "/v1/items"), tenant="t"),
    ]
    got = [(gr.name, s) for gr, s in who_can(policy(g), "GET", "/v1//items", T0)]
    assert got == [("ns/a", sa), ("ns/a", ALICE_SUBJ), ("ns/d", TokenSubject("idp", "dave"))]
    assert [gr.name for gr, _ in who_can(policy(g), "POST", "/v1/items", T0 - 1)] == [
        "ns/b",
        "ns/c",
    ]


# --- the index agrees with the obvious definition --------------------------------------------

_SEGS = ["a", "b", "c"]
_pattern = st.lists(st.sampled_from([*_SEGS, "*"]), max_size=3).flatmap(
    lambda segs: st.sampled_from(
        ["/" + "/".join(segs), "/" + "/".join([*segs, "**"])]
        + (["/" + "/".join(segs) + "/"] if segs else [])
    )
)
_path = (
    st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=4)
    .flatmap(lambda segs: st.sampled_from(["/" + "/".join(segs), "/" + "/".join(segs) + "/"]))
    .map(lambda p: p.replace("//", "/"))
)
_subject = st.sampled_from(
    [
        TokenSubject("idp", "alice"),
        TokenSubject("idp", claims=(("team", "x"),)),
        TokenSubject("idp", "alice", claims=(("team", "y"),)),
        TokenSubject("cluster", "system:serviceaccount:ci:deployer"),
        ServiceAccountSubject("ci", "deployer"),
        SpiffeSubject("spiffe://example.org/agent"),
    ]
)
_time = st.sampled_from([None, T0 - 10, T0, T0 + 10])
_grant = st.builds(
    lambda subjects, rules, tenant, nb, exp: (subjects, rules, tenant, nb, exp),
    st.lists(_subject, min_size=1, max_size=2),
    st.lists(
        st.builds(
            lambda m, ps: Rule(frozenset(m), tuple(ps)),
            st.lists(st.sampled_from(["GET", "POST", "*"]), min_size=1, max_size=2),
            st.lists(_pattern, min_size=1, max_size=2),
        ),
        min_size=1,
        max_size=2,
    ),
    st.sampled_from([None, "red"]),
    _time,
    _time,
)
_identity = st.sampled_from(
    [
        ALICE,
        DEPLOYER,
        AGENT,
        Identity(IdentityKind.JWT, "idp", "alice", claims={"team": ["x", "y"]}),
        Identity(IdentityKind.JWT, "idp", "zed", claims={"team": "x"}),
    ]
)


def _reference(grants: list[Grant], facts: Facts) -> tuple[bool, Reason]:
    rank = {Reason.GRANT_EXPIRED: 1, Reason.GRANT_NOT_YET_VALID: 2, Reason.TENANT_MISMATCH: 3}
    best = Reason.NO_MATCHING_GRANT
    for g in grants:
        if not any(subject_matches(s, facts.identity) for s in g.subjects):
            continue
        if not any(
            (facts.method in r.methods or "*" in r.methods)
            and any(PathPattern.compile(p).matches(facts.path) for p in r.paths)
            for r in g.rules
        ):
            continue
        if g.not_before is not None and facts.now < g.not_before:
            status = Reason.GRANT_NOT_YET_VALID
        elif g.expires_at is not None and facts.now >= g.expires_at:
            status = Reason.GRANT_EXPIRED
        elif g.tenant is not None and g.tenant != facts.tenant:
            status = Reason.TENANT_MISMATCH
        else:
            return True, Reason.ALLOWED
        if rank[status] > rank.get(best, 0):
            best = status
    return False, best


@BOUNDED
@given(
    st.lists(_grant, max_size=6),
    _identity,
    st.sampled_from(["GET", "POST", "DELETE"]),
    _path,
    st.sampled_from([T0 - 10, T0, T0 + 10]),
    st.sampled_from([None, "red", "blue"]),
)
def test_decide_agrees_with_a_linear_reference(
    raw: list[tuple[list[Subject], list[Rule], str | None, float | None, float | None]],
    identity: Identity,
    method: str,
    path: str,
    now: float,
    tenant: str | None,
) -> None:
    grants = []
    for i, (subjects, rules, gt, nb, exp) in enumerate(raw):
        if nb is not None and exp is not None and exp <= nb:
            exp = None
        grants.append(
            Grant(f"ns/g{i}", tuple(subjects), tuple(rules), gt, not_before=nb, expires_at=exp)
        )
    pol = policy(grants)
    facts = Facts(identity=identity, method=method, path=path, now=now, tenant=tenant)
    decision = decide(pol, facts)
    assert (decision.allowed, decision.reason) == _reference(list(pol.grants), facts)
    expl = explain(pol, facts)
    assert expl.decision == decision
    assert decision.allowed == any(v.matched for v in expl.verdicts)
    if decision.allowed:
        assert decision.grant == next(v.grant for v in expl.verdicts if v.matched)


def test_many_grants_for_one_identity_do_not_leak_to_another() -> None:
    many = [grant(f"ns/g{i:05d}", [ALICE_SUBJ], rule("GET", f"/svc/{i}/**")) for i in range(2000)]
    pol = policy([*many, grant("ns/bob", [TokenSubject("idp", "bob")], rule("GET", "/bob"))])
    bob = Identity(IdentityKind.JWT, "idp", "bob")
    assert ask(pol, path="/svc/1999/x")[2] == "ns/g01999"
    assert ask(pol, path="/svc/2000/x")[0] is False
    assert ask(pol, identity=bob, path="/svc/5")[0] is False
    assert ask(pol, identity=bob, path="/bob")[0] is True
    assert ask(pol, path="/bob")[0] is False
