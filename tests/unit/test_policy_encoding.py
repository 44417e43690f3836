"""The policy document: canonical JSON, content-hash version, strict decoding."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nhigate.policy import (
    DOCUMENT_API_VERSION,
    Grant,
    IdentityAssertion,
    IssuerConfig,
    PolicyDocumentError,
    RateLimit,
    Revocation,
    Rule,
    ServiceAccountSubject,
    ServiceConfig,
    SpiffeSubject,
    TenantMapping,
    TokenSubject,
    UpstreamCredential,
    decode_document,
    encode_document,
    make_document,
)
from nhigate.policy.encoding import format_time, parse_time

BOUNDED = settings(max_examples=300, deadline=None)

SERVICE = ServiceConfig(
    namespace="payments",
    name="payments-api",
    backend_service="payments",
    backend_port=8080,
    tenant=TenantMapping(header="X-Tenant", claim="tenant"),
    rate_limit=RateLimit(requests_per_second=50.0, burst=100),
    upstream_credential=UpstreamCredential("Authorization", "/var/run/secret/token", "Bearer "),
    identity_assertion=IdentityAssertion(audience="payments"),
)
ISSUERS = [
    IssuerConfig("idp", "https://idp.example", ("payments",), ("RS256", "ES256"), 3600, 30,
                 jwks={"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "BB"}]}),
    IssuerConfig("cluster", "https://kubernetes.default.svc", ("nhigate",), ("RS256",), 3600, 0,
                 jwks_uri="https://kubernetes.default.svc/openid/v1/jwks", kubernetes=True),
]  # fmt: skip
GRANTS = [
    Grant(
        name="payments/ci-deploy",
        subjects=(
            TokenSubject("idp", claims=(("repo", "org/app"), ("env", "prod"))),
            ServiceAccountSubject("ci", "deployer"),
            SpiffeSubject("spiffe://example.org/agent"),
        ),
        rules=(
            Rule(frozenset({"POST", "GET"}), ("/v1/deploy", "/v1/status/*")),
            Rule(frozenset({"*"}), ("/v1/items/**",)),
        ),
        tenant="blue",
        not_before=1_800_000_000.0,
        expires_at=1_800_003_600.5,
        rate_limit=RateLimit(2.5, 5),
        reason="JIRA-123",
    ),
    Grant("payments/a-read", (TokenSubject("idp", "alice"),), (Rule(frozenset({"GET"}), ("/",)),)),
]
REVOCATIONS = [
    Revocation("payments/leaked", token_id="abc"),
    Revocation("payments/alice", issuer="idp", subject="alice", until=1_800_000_000.0),
    Revocation("payments/pod", service_account_uid="uid-1"),
]


def doc() -> Any:
    return make_document(SERVICE, ISSUERS, GRANTS, REVOCATIONS)


def test_round_trip_is_exact() -> None:
    d = doc()
    data = encode_document(d)
    assert decode_document(data) == d
    assert encode_document(decode_document(data)) == data
    assert d.version.startswith("sha256:")
    assert len(d.version) == len("sha256:") + 16


def test_canonical_json_shape() -> None:
    data = encode_document(doc())
    assert b" " not in data.replace(b"Bearer ", b"")
    obj = json.loads(data)
    assert obj["apiVersion"] == DOCUMENT_API_VERSION
    assert list(obj) == sorted(obj)
    assert [g["name"] for g in obj["grants"]] == ["payments/a-read", "payments/ci-deploy"]
    ci = obj["grants"][1]
    assert ci["notBefore"] == "2027-01-15T08:00:00Z"
    assert ci["expiresAt"] == "2027-01-15T09:00:00.500000Z"
    assert ci["rules"][0]["methods"] == ["*"]
    assert ci["rules"][1] == {"methods": ["GET", "POST"], "paths": ["/v1/deploy", "/v1/status/*"]}
    assert ci["subjects"][2] == {"token": {"claims": {"env": "prod", "repo": "org/app"},
                                           "issuer": "idp", "subject": None}}  # fmt: skip
    assert obj["service"]["rateLimit"] == {"burst": 100, "requestsPerSecond": 50.0}


def test_version_ignores_input_order_but_not_content() -> None:
    base = doc().version
    rng = random.Random(7)
    for _ in range(5):
        grants = [
            Grant(
                g.name,
                tuple(rng.sample(g.subjects, len(g.subjects))),
                tuple(rng.sample(g.rules, len(g.rules))),
                g.tenant,
                g.not_before,
                g.expires_at,
                g.rate_limit,
                g.reason,
            )
            for g in rng.sample(GRANTS, len(GRANTS))
        ]
        revs = rng.sample(REVOCATIONS, len(REVOCATIONS))
        assert make_document(SERVICE, ISSUERS[::-1], grants, revs).version == base
    changed = [GRANTS[0], Grant("payments/a-read", GRANTS[1].subjects, GRANTS[1].rules, "red")]
    assert make_document(SERVICE, ISSUERS, changed, REVOCATIONS).version != base
    assert make_document(SERVICE, ISSUERS, GRANTS, REVOCATIONS[:2]).version != base


def _mutated(mutate: Any) -> bytes:
    obj = json.loads(encode_document(doc()))
    mutate(obj)
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda o: o.update(apiVersion="nhigate.io/policy-v2"), "apiVersion"),
        (lambda o: o.pop("apiVersion"), "apiVersion"),
        (lambda o: o.update(version="sha256:0000000000000000"), "version"),
        (lambda o: o.update(version="17"), "version"),
        (lambda o: o["grants"][0].update(reason="edited"), "version"),
        (lambda o: o.pop("grants"), "grants: missing field"),
        (lambda o: o.update(extra=1), "extra: unknown field"),
        (lambda o: o["grants"][0].pop("rules"), "grants[0].rules: missing field"),
        (lambda o: o["grants"][0].update(rules=[]), "grants[0].rules: must not be empty"),
        (lambda o: o["grants"][0].update(name=7), "grants[0].name: expected a string"),
        (lambda o: o["grants"][1].update(notBefore="yesterday"), "grants[1].notBefore"),
        (lambda o: o["grants"][1].update(notBefore=1800000000), "grants[1].notBefore"),
        (
            lambda o: o["grants"][1].update(notBefore="2027-01-15T08:00:00+00:00"),
            "grants[1].notBefore",
        ),
        (
            lambda o: o["grants"][1].update(expiresAt="2027-01-15T08:00:00Z"),
            "grants[1].expiresAt: must be after notBefore",
        ),
        (lambda o: o["grants"][0]["rules"][0].update(paths=["/a/../b"]), "rules[0].paths[0]"),
        (lambda o: o["grants"][0]["rules"][0].update(paths=["a"]), "rules[0].paths[0]"),
        (lambda o: o["grants"][0]["rules"][0].update(methods=["get"]), "rules[0].methods[0]"),
        (lambda o: o["grants"][0].update(subjects=[{}]), "grants[0].subjects[0]"),
        (
            lambda o: o["grants"][0].update(subjects=[{"group": "x"}]),
            "grants[0].subjects[0].group: unknown subject kind",
        ),
        (
            lambda o: o["grants"][0].update(subjects=[{"spiffeId": "https://x"}]),
            "grants[0].subjects[0].spiffeId",
        ),
        (
            lambda o: o["grants"][0].update(
                subjects=[{"token": {"issuer": "idp", "subject": None, "claims": {}}}]
            ),
            "grants[0].subjects[0].token: set subject, claims, or both",
        ),
        (
            lambda o: o["grants"][0]["subjects"][0]["token"].update(claims={"a": 1}),
            "token.claims.a",
        ),
        (lambda o: o["grants"].append(o["grants"][0]), "grants[2].name: duplicate name"),
        (
            lambda o: o["grants"][1].update(rateLimit={"requestsPerSecond": 0, "burst": 1}),
            "grants[1].rateLimit.requestsPerSecond",
        ),
        (
            lambda o: o["grants"][1].update(rateLimit={"requestsPerSecond": 1, "burst": True}),
            "grants[1].rateLimit.burst: expected an integer",
        ),
        (lambda o: o["revocations"][0].update(tokenId="x"), "revocations[0]: set exactly one"),
        (lambda o: o["revocations"][0].update(subject=None), "revocations[0]: issuer and subject"),
        (lambda o: o["service"].update(backendPort=0), "service.backendPort"),
        (lambda o: o["service"].update(backendPort="80"), "service.backendPort"),
        (lambda o: o["service"].pop("tenant"), "service.tenant: missing field"),
        (lambda o: o["issuers"][0].update(algorithms=["none"]), "issuers[0].algorithms[0]"),
        (lambda o: o["issuers"][1].update(jwksUri="https://x"), "issuers[1]: set at most one"),
        (lambda o: o["issuers"][0].update(kubernetes="yes"), "issuers[0].kubernetes"),
    ],
)
def test_decode_rejects_and_names_the_field(mutate: Any, field: str) -> None:
    with pytest.raises(PolicyDocumentError, match=field.replace("[", r"\[").replace("]", r"\]")):
        decode_document(_mutated(mutate))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b"\xff\xfe",
        b'{"apiVersion": "nhigate.io/policy-v1", "apiVersion": "nhigate.io/policy-v1"}',
        b'{"x": NaN}',
    ],
)
def test_decode_rejects_garbage(data: bytes) -> None:
    with pytest.raises(PolicyDocumentError):
        decode_document(data)


def test_make_document_validates() -> None:
    bad = Grant("ns/x", (TokenSubject("idp", "a"),), (Rule(frozenset({"GET"}), ("/a//b",)),))
    with pytest.raises(PolicyDocumentError, match=r"grants\[0\]\.rules\[0\]\.paths\[0\]"):
        make_document(SERVICE, [], [bad], [])
    nan = Grant("ns/x", (TokenSubject("idp", "a"),), (Rule(frozenset({"GET"}), ("/",)),),
                expires_at=float("nan"))  # fmt: skip
    with pytest.raises(PolicyDocumentError, match="finite"):
        make_document(SERVICE, [], [nan], [])
    conflicting = TokenSubject("idp", claims=(("a", "1"), ("a", "2")))
    with pytest.raises(PolicyDocumentError, match="conflicting"):
        make_document(SERVICE, [], [Grant("ns/x", (conflicting,), GRANTS[1].rules)], [])


@pytest.mark.parametrize(
    ("t", "text"),
    [
        (0.0, "1970-01-01T00:00:00Z"),
        (1_800_000_000.0, "2027-01-15T08:00:00Z"),
        (1_800_000_000.25, "2027-01-15T08:00:00.250000Z"),
        (1_800_000_000.000001, "2027-01-15T08:00:00.000001Z"),
        (-1.5, "1969-12-31T23:59:58.500000Z"),
    ],
)
def test_times(t: float, text: str) -> None:
    assert format_time(t) == text
    assert parse_time(text) == t


@pytest.mark.parametrize(
    "text", ["2027-01-15T08:00:00", "2027-01-15 08:00:00Z", "2027-01-15T08:00:00.000000Z",
             "2027-01-15T08:00:00.5Z", "2027-13-01T00:00:00Z", "2027-01-15t08:00:00z"]
)  # fmt: skip
def test_non_canonical_times_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="2027"):
        parse_time(text)


_name = st.text(alphabet="abcxyz-/", min_size=1, max_size=8)
_epoch = st.floats(min_value=-1e9, max_value=4e9, allow_nan=False)
_hyp_grant = st.builds(
    lambda name, subjects, rules, tenant, nb, rl, reason: Grant(
        name, tuple(subjects), tuple(rules), tenant, nb, None if nb is None else nb + 60, rl, reason
    ),
    _name,
    st.lists(
        st.one_of(
            st.builds(ServiceAccountSubject, _name, _name),
            st.builds(
                TokenSubject,
                _name,
                st.one_of(st.none(), _name),
                st.lists(st.tuples(_name, st.text(max_size=5)), min_size=1, max_size=3).map(
                    lambda pairs: tuple(dict(pairs).items())
                ),
            ),
            st.builds(SpiffeSubject, _name.map(lambda n: "spiffe://td/" + n)),
        ),
        min_size=1,
        max_size=3,
    ),
    st.lists(
        st.builds(
            Rule,
            st.frozensets(st.sampled_from(["GET", "POST", "*", "PATCH"]), min_size=1),
            st.lists(st.sampled_from(["/", "/a", "/a/*", "/a/**", "/%7B"]), min_size=1).map(tuple),
        ),
        min_size=1,
        max_size=3,
    ),
    st.one_of(st.none(), _name),
    st.one_of(st.none(), _epoch),
    st.one_of(st.none(), st.builds(RateLimit, st.floats(0.001, 1e6), st.integers(1, 10**6))),
    st.text(max_size=20),
)


@BOUNDED
@given(st.lists(_hyp_grant, max_size=5, unique_by=lambda g: g.name))
def test_round_trip_property(grants: list[Grant]) -> None:
    d = make_document(SERVICE, ISSUERS, grants, REVOCATIONS)
    data = encode_document(d)
    assert decode_document(data) == d
    assert encode_document(decode_document(data)) == data
    assert make_document(SERVICE, ISSUERS, list(reversed(grants)), REVOCATIONS) == d
